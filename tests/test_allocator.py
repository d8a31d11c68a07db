import subprocess
import sys

import pytest

from retrain.tasks import allocator

# Each check runs in a fresh interpreter: the settings are process-wide and applied once.
PROBE = """
import sys
from retrain.tasks.allocator import tune_allocator
print(tune_allocator(sys.argv[1]), tune_allocator(sys.argv[1]))
"""


def probe(workload: str, **env: str) -> str:
    import os

    done = subprocess.run(
        [sys.executable, "-c", PROBE, workload], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
@pytest.mark.parametrize("workload", ["inference", "training"])
def test_settings_are_applied_once_per_process(workload):
    assert probe(workload) == "True False"


def test_retrain_malloc_tuning_0_leaves_the_defaults():
    assert probe("training", RETRAIN_MALLOC_TUNING="0") == "False False"


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="inference"):
        allocator.tune_allocator("gaming")
