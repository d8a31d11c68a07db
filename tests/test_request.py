"""The run request (tasks/request.py): one object whose defaults are the CLI's, the flow's and
the deployments'; validated once; and a command line that answers --help and argument errors
without importing torch, Prefect, Dask or pandas. Also: the one `retrain` package."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from retrain.tasks import request as request_module
from retrain.tasks.request import DEFAULTS, RunRequest
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.vocabulary import MODES, parse_fractions

HEAVY = ("torch", "torchvision", "prefect", "dask", "distributed", "pandas")


def test_the_vocabulary_matches_the_registry_and_the_augmenter():
    from retrain.tasks import networks
    from retrain.tasks.preprocessing import Augmentation

    assert {"squeezenet", "squeezenet-caffe", "resnet18", "mobilenet_v3_small"} <= set(networks.network_names())
    assert networks.MODES is MODES
    assert DEFAULTS.augmentation == Augmentation().to_dict()


def test_the_flags_make_the_request():
    from retrain.cli import build_parser
    from retrain.tasks.request import request_from_args

    args = build_parser().parse_args(
        ["run", "--classic-loop", "--feature-cache-views", "3", "--feature-cache-memory-mb", "100", "--no-reflect"]
        + ["--network", "squeezenet-caffe", "--mode", "finetune", "--split", "0.8,0.2,0", "--max-epochs", "2"]
    )
    request = request_from_args(args)
    assert (request.network, request.mode, request.split_fractions) == ("squeezenet-caffe", "finetune", "0.8,0.2,0")
    assert request.augmentation == {"reflect": False, "max_translation": DEFAULTS.augmentation["max_translation"]}
    options = request.check(fetch_weights=False).options
    assert options.classic_loop and options.feature_cache_views == 3 and options.feature_cache_memory_mb == 100
    assert options.max_epochs == 2
    plain = request_from_args(build_parser().parse_args(["run"]))
    assert plain == DEFAULTS
    assert plain.check(fetch_weights=False).options == TrainingOptions()


def test_the_flow_and_the_deployments_take_their_defaults_from_the_request():
    from retrain import deploy
    from retrain.flows.pipeline import retrain_flow

    signature = inspect.signature(retrain_flow.fn)
    for name in ("network", "weights", "mode", "split_fractions"):
        assert signature.parameters[name].default == getattr(DEFAULTS, name), name
    placeholders = deploy.placeholder_defaults()
    assert placeholders["RETRAIN_NETWORK"][0] == DEFAULTS.network
    assert placeholders["RETRAIN_WEIGHTS"][0] == DEFAULTS.weights
    assert placeholders["RETRAIN_MODE"][0] == DEFAULTS.mode


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"network": "alexnet9000"}, "unknown network 'alexnet9000'"),
        ({"mode": "partial"}, "mode must be one of"),
        ({"split_fractions": "0.5,0.5"}, "split must be three fractions"),
        ({"options": {"max_epochs": 0}}, "max_epochs=0"),
        ({"options": {"epochs": 3}}, "unknown training option"),
        ({"augmentation": {"rotate": 10}}, "unknown augmentation setting"),
        ({"augmentation": {"max_translation": -1}}, "max_translation=-1"),
        ({"augmentation": {"reflect": "yes"}}, "reflect='yes'"),
    ],
)
def test_a_bad_choice_is_refused_with_a_clear_message(changes, message):
    with pytest.raises(ValueError, match=message):
        RunRequest(**changes).check(fetch_weights=False)


def test_parse_fractions():
    assert parse_fractions("0.8,0.2,0") == (0.8, 0.2, 0.0)
    for bad in ("0.5,0.5", "a,b,c", "0,0.5,0.5", "0.5,0.6,0.1"):
        with pytest.raises(ValueError):
            parse_fractions(bad)


def test_a_request_is_checked_once_and_its_weights_without_building_the_network(tmp_path, monkeypatch):
    from retrain.tasks import networks

    weights = tmp_path / "squeezenet.pth"
    torch.save(networks.build_network("squeezenet-caffe", 2, "none")[0].state_dict(), weights)
    # the state dict of a 2-class head does not fit the 1000-class ImageNet architecture
    with pytest.raises(networks.WeightsUnavailableError, match="does not fit network 'squeezenet-caffe'"):
        RunRequest(network="squeezenet-caffe", weights=str(weights)).check()
    full = tmp_path / "full.pth"
    state = networks.build_network("squeezenet-caffe", 2, "none")[0].state_dict()
    state["classifier.1.weight"] = torch.zeros(1000, 512, 1, 1)
    state["classifier.1.bias"] = torch.zeros(1000)
    torch.save(state, full)

    built, checked = [], []
    monkeypatch.setattr(networks, "build_network", lambda *a, **k: built.append(a))
    real_check = networks.check_weights
    monkeypatch.setattr(networks, "check_weights", lambda *a: checked.append(a) or real_check(*a))
    request = RunRequest(network="squeezenet-caffe", weights=str(full), options={"seed": 7})
    first = request.check()
    assert request.check() is first and RunRequest(**vars(request)).check() is first
    assert checked == [("squeezenet-caffe", str(full))] and built == []
    assert first.weights == str(full) and first.options.seed == 7
    # scratch mode needs no weights: none are looked for
    assert RunRequest(mode="scratch", weights="/nowhere.pth").check().weights == "none"
    assert len(checked) == 1
    # a failed check is not remembered: the file may appear
    missing = RunRequest(network="squeezenet-caffe", weights=str(tmp_path / "later.pth"))
    with pytest.raises(networks.WeightsUnavailableError, match="not found"):
        missing.check()
    os.replace(full, tmp_path / "later.pth")
    assert missing.check().weights == str(tmp_path / "later.pth")
    assert request_module._CHECKED  # the memo the flow's check hits after the CLI's


def _cli_in_fresh_python(argv: list[str], cwd: str) -> dict:
    """Run the CLI with ``argv`` in a new interpreter; its exit status and heavy imports."""
    code = (
        "import json, sys\n"
        "from retrain.cli import main\n"
        "try:\n    status = main(sys.argv[1:])\n"
        "except SystemExit as exit:\n    status = exit.code\n"
        f"print(json.dumps({{'status': status, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["run", "--help"], 0),
        (["run", "--mode", "partial"], 2),
        (["run", "--max-epochs", "many"], 2),
        (["frobnicate"], 2),
        ([], 2),
    ],
)
def test_help_and_argument_errors_import_nothing_heavy(argv, status, tmp_path):
    assert _cli_in_fresh_python(argv, str(tmp_path)) == {"status": status, "heavy": []}


def test_one_retrain_package_and_no_generic_top_level_ones(tmp_path):
    """From outside the checkout: `tasks` and `flows` are not importable, `retrain` offers the
    notebook API."""
    code = (
        "import importlib.util, json, retrain\n"
        "print(json.dumps({'tasks': importlib.util.find_spec('tasks') is not None,\n"
        "  'flows': importlib.util.find_spec('flows') is not None,\n"
        "  'api': [n for n in ('run', 'evaluate', 'classify', 'score') if callable(getattr(retrain, n, None))]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"tasks": False, "flows": False, "api": ["run", "evaluate", "classify", "score"]}


def test_a_cluster_request_takes_a_worker_count_of_zero_or_more():
    from retrain.tasks.training.cluster import ClusterRequest

    assert ClusterRequest.from_dict({"workers": 0}) == ClusterRequest()  # 0: in the training process
    assert ClusterRequest.from_dict({"address": "tcp://h:8786", "workers": 2}).wanted
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"--dask-workers\) must be an integer >= 0"):
            ClusterRequest.from_dict({"workers": bad})


# ---- one typed run configuration -----------------------------------------------------------------

# run.json's "config" as the version before the typed RunConfig wrote it, and its fingerprint then:
# a rerun of that run must still find it (same fingerprint) and train from it.
EARLIER_CONFIG = {
    "augmentation": {"max_translation": 30, "reflect": True},
    "content": "c0ffee",
    "data": "/data/shapes",
    "dataset": "/data/shapes",
    "extra": {"split_seed": 0},
    "mode": "transfer",
    "network": "squeezenet-caffe",
    "options": {**TrainingOptions(max_epochs=3, mini_batch_size=8, processes=2).to_dict()},
    "split": [0.7, 0.15, 0.15],
    "weights": "none",
}
EARLIER_FINGERPRINT = "b4fa6edbb44143ee"


def test_a_run_config_written_before_reads_back_with_its_fingerprint():
    from retrain.tasks.runs import RunConfig

    config = RunConfig.from_record(json.loads(json.dumps(EARLIER_CONFIG)))
    assert config.fingerprint() == EARLIER_FINGERPRINT
    assert config.options == TrainingOptions(max_epochs=3, mini_batch_size=8, processes=2)
    assert config.augmentation.to_dict() == EARLIER_CONFIG["augmentation"] and config.split == (0.7, 0.15, 0.15)
    # read back with what a config of today adds: label issues found, as by default
    assert config.to_record() == {**EARLIER_CONFIG, "split": (0.7, 0.15, 0.15), "label_issues": "find"}
    # the processes are left out of the fingerprint: a run resumes with another count
    other = RunConfig.from_record({**EARLIER_CONFIG, "options": {**EARLIER_CONFIG["options"], "processes": 1}})
    assert other.fingerprint() == EARLIER_FINGERPRINT
    # an older record without extra and content
    bare = {k: v for k, v in EARLIER_CONFIG.items() if k not in ("extra", "content")}
    assert RunConfig.from_record(bare).extra == {} and RunConfig.from_record(bare).content == ""


def test_the_checked_request_is_the_run_config_the_flow_records():
    from dataclasses import replace

    from retrain.tasks.vocabulary import AugmentationSettings

    request = RunRequest(
        network="squeezenet-caffe", weights="none", options={"max_epochs": 3, "mini_batch_size": 8, "processes": 2}
    )
    checked = request.check(fetch_weights=False)
    assert checked.augmentation == AugmentationSettings() and checked.split == (0.7, 0.15, 0.15)
    config = replace(checked, data="/data/shapes", dataset="/data/shapes", extra={"split_seed": 0}, content="c0ffee")
    assert config.fingerprint() == EARLIER_FINGERPRINT
    with pytest.raises(AttributeError):
        config.options.max_epochs = 4  # frozen: what run.json says is what trains


def test_the_vocabulary_is_one_home_for_its_words():
    from retrain import cli
    from retrain.tasks import engine_gate, inference, vocabulary
    from retrain.tasks.experiments import AUGMENTATION_KEYS
    from retrain.tasks.preprocessing import Augmentation

    assert cli.ENGINE_CHOICES is inference.ENGINE_CHOICES is engine_gate.ENGINE_CHOICES is vocabulary.ENGINE_CHOICES
    assert AUGMENTATION_KEYS is vocabulary.AUGMENTATION_KEYS == {"reflect": bool, "max_translation": int}
    assert Augmentation().to_dict() == vocabulary.AugmentationSettings().to_dict() == DEFAULTS.augmentation
    assert Augmentation.from_dict({"reflect": False}) == Augmentation(False, 30)
    with pytest.raises(ValueError, match="workers must be at least 1, not 0"):
        vocabulary.check_workers(0)
