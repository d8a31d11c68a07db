"""The command line a newcomer meets (issue 24): a location missing or of the wrong kind is
refused before anything starts (one line, exit 2, no log file, nothing heavy imported), naming
the likely mistake; the error line is the last on stderr; flags have did-you-mean, aliases and
one name per concept; the help is grouped; ``retrain.run`` takes training options flat. No
Prefect starts here: what these tests prove happens before it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retrain.checks import run_settings
from retrain.cli import build_parser

HEAVY = ("torch", "torchvision", "prefect", "dask", "distributed", "pandas")


@pytest.fixture(scope="module")
def places(tmp_path_factory, shapes_dir, random_model_file) -> dict[str, str]:
    """A store with a run ``r0``, an image, a one-class folder, an ONNX file, a folder."""
    root = tmp_path_factory.mktemp("usage")
    run = root / "store" / "runs" / "r0"
    run.mkdir(parents=True)
    shutil.copy(random_model_file, run / "model.pt")
    one = root / "one" / "circle"
    one.mkdir(parents=True)
    image = next(Path(shapes_dir, "circle").glob("*.jpg"))
    shutil.copy(image, one / "a.jpg")
    (root / "model.onnx").write_bytes(b"not read: the name says what it is")
    (root / "folder").mkdir()
    return {
        "store": str(root / "store"),
        "images": shapes_dir,
        "image": str(image),
        "one": str(root / "one"),
        "onnx": str(root / "model.onnx"),
        "folder": str(root / "folder"),
        "missing": str(root / "nope"),
        "logs": str(root / "logs"),
    }


# (arguments, with {place} filled in; what the error says)
MISTAKES = [
    (["run", "{missing}"], r"DATA .*/nope not found"),
    (["run", "{one}"], r"only one class folder, circle \(in .*\): a classifier needs two or more"),
    (["run", "{image}"], r"DATA .* is an image: give a zip or a folder of class folders"),
    (["run", "{images}", "--max-epochs", "0"], r"^training option max_epochs=0: expected a positive integer$"),
    (["experiment", "{images}", "--experiment-id", "../x"], r"^experiment id '../x': use letters"),
    (["score", "{images}", "r0"], r"MODEL .* is a folder of images, not a model; arguments swapped\? .*MODEL IMAGES"),
    (["classify", "{image}", "r0"], r"MODEL .* is an image, not a model; arguments swapped\?"),
    (["score", "{onnx}", "{images}"], r"MODEL .* is an ONNX file: .*give that file, its run id"),
    (["classify", "nosuchrun", "{image}"], r"MODEL 'nosuchrun' not found: .*`retrain runs`"),
    (["evaluate", "r0", "{missing}"], r"DATA .* not found"),
    (["score", "r0", "{missing}"], r"IMAGES .* not found"),
    (["score", "r0", "{images}", "--out", "{image}"], r"--score-out .* is a file"),
    (["export", "r0", "--out", "{folder}"], r"--out .* is a folder: give the file to write"),
]


def test_each_mistake_is_refused_up_front_in_one_line(places):
    """All of them in one fresh interpreter: the statuses, the messages, no log file, and no
    torch, Prefect or Dask imported to say so."""
    calls = [[a.format(**places) for a in args] + ["--store", places["store"], "--json"] for args, _ in MISTAKES]
    code = (
        "import contextlib, io, json, sys\n"
        "from retrain.cli import main\n"
        "answers = []\n"
        f"for argv in {calls!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):\n"
        "        status = main(argv)\n"
        "    answers.append([status, json.loads(out.getvalue().splitlines()[-1])])\n"
        f"print(json.dumps({{'answers': answers, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    env = {**os.environ, "RETRAIN_LOG_DIR": places["logs"]}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["heavy"] == []
    for (args, message), (status, answer) in zip(MISTAKES, found["answers"]):
        assert status == 2 and answer["type"] == "UsageError" and answer["log"] is None, (args, answer)
        assert "\n" not in answer["error"]
        assert re.search(message, answer["error"]), (args, answer["error"])
    assert not Path(places["logs"]).exists()


def test_the_program_ends_with_its_error_line_after_the_exit_handlers(places):
    """Prefect's exit handlers log while they send the last events ("EventsWorker - Still
    processing items"): the program's error line still comes last."""
    code = (
        "import atexit, sys\n"
        "from retrain import cli\n"
        "atexit.register(lambda: print('EventsWorker - Still processing items', file=sys.stderr))\n"
        "cli.finish(cli.main(sys.argv[1:], watch_api=True))\n"
    )
    argv = ["classify", places["image"], "r0", "--store", places["store"]]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[0].startswith("EventsWorker"), done.stderr
    assert lines[-1].startswith("retrain classify: error: MODEL ") and "swapped" in lines[-1], done.stderr


# ---- flags ------------------------------------------------------------------------------------


def test_fastai_names_are_aliases_and_old_spellings_still_work():
    run = build_parser("run").parse_args(["run", "--epochs", "3", "--lr", "0.01", "--batch-size", "8"])
    assert (run.max_epochs, run.initial_learn_rate, run.mini_batch_size) == (3, 0.01, 8)
    for flags in (["--dask-workers", "2", "--score-out", "x"], ["--workers", "2", "--out", "x"]):
        score = build_parser("score").parse_args(["score", "m", "i", *flags])
        assert (score.dask_workers, score.score_out) == (2, "x")
    help_text = _help("score")
    assert "--dask-workers" in help_text and "--score-out" in help_text
    assert " --workers" not in help_text and " --out" not in help_text


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "--max-epocs", "3"], "unrecognized argument: --max-epocs (did you mean --max-epochs?)"),
        (["run", "--learning-rate", "0.1"], "did you mean --initial-learn-rate"),
        (["score", "m", "i", "--dask-wrkers", "2"], "did you mean --dask-workers"),
    ],
)
def test_an_unknown_flag_gets_the_commands_usage_and_the_closest_flags(argv, said, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser(argv[0]).parse_args(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"usage: retrain {argv[0]} "), err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"retrain {argv[0]}: error: unrecognized argument") and said in last, err


@pytest.mark.parametrize(
    ("word", "said"),
    [("rnu", "did you mean run or runs?"), ("scroe", "did you mean score?"), ("xyz", "the commands: run")],
)
def test_an_unknown_command_gets_the_closest_commands(word, said, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([word, "data"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit.value.code == 2 and last.startswith(f"retrain: error: unknown command '{word}' (") and said in last


def _help(*argv: str) -> str:
    """What ``retrain ARGV --help`` prints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(argv[0] if argv else "").parse_args([*argv, "--help"])
    return out.getvalue()


def test_help_reads_like_a_manual(capsys):
    with pytest.raises(SystemExit):
        build_parser("").parse_args(["--version"])
    assert re.fullmatch(r"retrain \d+\.\d+\S*\n", capsys.readouterr().out)
    top = _help()
    assert "``" not in top and ":mod:" not in top
    run = _help("run")
    titles = ["data:", "network:", "training (MATLAB", "augmentation (MATLAB", "cluster:", "advanced:"]
    at = [run.index("\n" + title) for title in titles]
    assert at == sorted(at), "the sections in order"
    advanced = run[at[-1] :]
    assert "--classic-loop" in advanced and "--processes" in advanced and "--classic-loop" not in run[: at[-1]]
    flat = " ".join(run.split())  # argparse wraps the help lines
    for shown in ("(default transfer)", "{transfer,finetune,scratch}", "(default squeezenet)", "(default 30)"):
        assert shown in flat, shown
    assert "(default 0.7,0.15,0.15)" in flat and "--max-epochs N, --epochs N" in flat


# ---- the Python API -----------------------------------------------------------------------------


def test_retrain_run_takes_training_options_flat():
    parameters = ["network", "options", "run_id"]
    assert run_settings({"max_epochs": 3, "network": "resnet18"}, parameters) == {
        "network": "resnet18",
        "options": {"max_epochs": 3},
    }
    assert run_settings({"seed": 1, "options": {"max_epochs": 2}}, parameters)["options"] == {
        "max_epochs": 2,
        "seed": 1,
    }
    with pytest.raises(TypeError, match=r"'max_epoch' \(did you mean 'max_epochs'\?\)"):
        run_settings({"max_epoch": 3}, parameters)
    with pytest.raises(TypeError, match="max_epochs given both flat and in options"):
        run_settings({"max_epochs": 3, "options": {"max_epochs": 2}}, parameters)


def test_retrain_run_takes_split_as_the_flag_names_it():
    parameters = ["split_fractions", "options"]  # the flow's parameter keeps its name
    assert run_settings({"split": "0.8,0.1,0.1"}, parameters) == {"split_fractions": "0.8,0.1,0.1"}
    with pytest.warns(DeprecationWarning, match="use split="):  # the old keyword, for one release
        assert run_settings({"split_fractions": "0.8,0.1,0.1"}, parameters) == {"split_fractions": "0.8,0.1,0.1"}
    with pytest.raises(TypeError, match="split given twice"):
        run_settings({"split": "1,0,0", "split_fractions": "1,0,0"}, parameters)
