"""Training in several processes (tasks/training/distributed.py): the parts of a batch, dropout
keyed by sample, and the must-show: 2 CPU processes on gloo end with the same weights as one
process with the same global batch; a checkpoint of one count resumes in another."""

import dataclasses
import os
import shutil

import pandas as pd
import pytest
import torch
from torch import nn

from retrain.tasks.datastore import index_stage, split_stage
from retrain.tasks.model_file import load_model_file
from retrain.tasks.networks import build_network
from retrain.tasks.preprocessing import Augmentation
from retrain.tasks.runs import RunConfig, read_run, start_run, update_run
from retrain.tasks.storage import RunLayout
from retrain.tasks.training.checkpoints import list_checkpoints
from retrain.tasks.training.distributed import Ranks, resolve_processes
from retrain.tasks.training.dropout import KeyedDropout, keep_mask
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.training.schedule import seeded_generator
from retrain.tasks.training.stage import train_run

# Largest absolute difference allowed between final weights trained in 1 and in 2 processes.
# Measured (4 iterations, SGD with momentum, random SqueezeNet, mini-batches of 7 cut 4 + 3):
# 5.3e-5, as large as one process gets from 1 thread against 2 (6.3e-5: float rounding in
# another order). With each process drawing its own nn.Dropout masks instead: 2.1e-2.
TOLERANCE = 1e-3


def test_parts_of_a_batch_are_disjoint_consecutive_and_even():
    for batch, size in ((7, 2), (8, 2), (10, 3), (3, 3)):
        parts = [Ranks(r, size).part(batch) for r in range(size)]
        assert parts[0][0] == 0 and parts[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_a_part_is_augmented_as_in_the_whole_batch():
    images = torch.randint(0, 256, (7, 3, 20, 20), dtype=torch.uint8)
    augment = Augmentation(reflect=True, max_translation=5)
    whole = augment(images, seeded_generator(0, 1, 2))
    part = augment(images[4:], seeded_generator(0, 1, 2), first=4, total=7)
    assert torch.equal(part, whole[4:]) and not torch.equal(whole, images)


def test_keyed_dropout_masks_a_sample_alike_however_the_batch_is_split():
    whole = keep_mask((10, 4, 3, 3), 0.5, 1234, torch.arange(10), torch.device("cpu"))
    part = keep_mask((4, 4, 3, 3), 0.5, 1234, torch.arange(3, 7), torch.device("cpu"))
    assert torch.equal(part, whole[3:7])
    assert not torch.equal(whole[0], whole[1])  # each sample its own mask
    big = keep_mask((64, 512, 13, 13), 0.3, 7, torch.arange(64), torch.device("cpu"))
    assert abs(big.float().mean().item() - 0.7) < 0.002


def test_keyed_dropout_replaces_nn_dropout_only_while_keyed():
    model = nn.Sequential(nn.Identity(), nn.Dropout(0.5))
    keyed = KeyedDropout(model)
    x = torch.ones(6, 100)
    model.train()
    keyed.train_mode()
    with keyed.keyed(0, 3, torch.arange(6)):
        whole = model(x)
    with keyed.keyed(0, 3, torch.arange(2, 4)):
        part = model(x[2:4])
    assert torch.equal(part, whole[2:4]) and set(whole.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(model(x), x)  # validation: no dropout
    keyed.remove()
    model.train()
    assert set(model(x).unique().tolist()) == {0.0, 2.0}  # nn.Dropout's own again


def test_processes_option_and_automatic_count(monkeypatch):
    for bad in (0, -1, True, 33):
        with pytest.raises(ValueError, match="processes"):
            TrainingOptions(processes=bad).validate()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_processes(None, "finetune", cpu) == 1 and resolve_processes(3, "scratch", cpu) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_processes(None, "finetune", cuda) == 4 and resolve_processes(2, "finetune", cuda) == 2
    assert resolve_processes(None, "transfer", cuda) == 1  # the feature cache's single process
    with pytest.raises(ValueError, match="only 4 GPU"):
        resolve_processes(8, "finetune", cuda)


def _config(shapes_dir: str, processes: int) -> RunConfig:
    return RunConfig(
        data=shapes_dir,
        dataset=shapes_dir,
        network="squeezenet-caffe",
        weights="none",  # random weights, SqueezeNet: no batch norm, dropout before the head
        mode="finetune",
        split=(0.75, 0.25, 0.0),
        options={
            "max_epochs": 2,
            "mini_batch_size": 7,  # 18 training images: 2 iterations an epoch, parts of 4 and 3
            "solver": "sgdm",
            "initial_learn_rate": 1e-4,
            "validation_frequency": 2,
            "checkpoint_frequency": 2,
            "checkpoint_frequency_unit": "iteration",
            "output_network": "last-iteration",
            "processes": processes,
        },
        augmentation={"reflect": True, "max_translation": 30},
    )


def _started(store: str, config: RunConfig) -> str:
    """A run folder made (or reopened) as the flow does, its lock released: the stages are
    driven here, one after the other, as the flow would."""
    run, lock = start_run(store, config)
    lock.release()
    return run


def test_the_number_of_processes_is_not_part_of_the_run_fingerprint(shapes_dir, tmp_path):
    one, two = _config(shapes_dir, 1), _config(shapes_dir, 2)
    assert one.fingerprint() == two.fingerprint()
    run = _started(str(tmp_path), one)
    assert _started(str(tmp_path), two) == run  # resumed, with the new count
    assert read_run(run)["config"]["options"]["processes"] == 2


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    """The same run trained in 1 process and in 2 (gloo): {processes: (run URL, summary,
    weights, histories the launching process received)}."""
    out = {}
    for processes in (1, 2):
        run = _started(str(tmp_path_factory.mktemp(f"store{processes}")), _config(shapes_dir, processes))
        index_stage(shapes_dir, run)
        split_stage(run, (0.75, 0.25, 0.0), 0)
        histories = []
        summary = train_run(run, on_validation=histories.append)
        out[processes] = (run, summary, load_model_file(summary["trained"]).model.state_dict(), histories)
    return out


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_gloo_processes_give_the_weights_of_one(trained):
    (_, one, weights_one, _), (run, two, weights_two, histories) = trained[1], trained[2]
    assert one["processes"] == 1 and two["processes"] == 2 and two["iterations"] == one["iterations"] == 4
    assert read_run(run)["config"]["options"]["processes"] == 2  # recorded in the run
    torch.manual_seed(0)  # the stage's seed: the initial weights both started from
    initial = build_network("squeezenet-caffe", 3, "none")[0].state_dict()
    assert _max_difference(weights_one, initial) > 100 * TOLERANCE  # they trained
    difference = _max_difference(weights_one, weights_two)
    print(f"max abs weight difference, 1 vs 2 processes: {difference:.3g}")
    assert difference < TOLERANCE
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=5e-3)  # large: random weights
    # rank 0's validations reached the launching process (the flow's live progress), and
    # its history holds the global batch's loss
    assert [len(h) for h in histories] == [2, 4]
    losses = {p: pd.read_csv(RunLayout(trained[p][0]).history)["loss"].tolist() for p in (1, 2)}
    assert losses[2] == pytest.approx(losses[1], rel=1e-3)


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_a_checkpoint_resumes_with_another_number_of_processes(trained, tmp_path, before, after):
    """What a run killed after its iteration-2 checkpoint leaves, resumed with the other count."""
    source, _, weights, _ = trained[before]
    run = str(tmp_path / "run")
    shutil.copytree(source, run)
    layout = RunLayout(run)
    for url in (layout.trained, layout.training, layout.history):
        os.remove(url)
    for iteration, url in list_checkpoints(layout.checkpoints):
        if iteration > 2:
            os.remove(url)
    config = read_run(run)["config"]
    config["options"]["processes"] = after
    update_run(run, config=config)
    summary = train_run(run)
    assert summary["resumed_from"] == 2 and summary["processes"] == after and summary["iterations"] == 4
    assert _max_difference(weights, load_model_file(summary["trained"]).model.state_dict()) < TOLERANCE


@pytest.mark.services  # kills a process
def test_kill_9_of_the_launcher_ends_its_ranks_and_the_run_resumes_in_one_process(shapes_dir, tmp_path):
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    import psutil

    config = _config(shapes_dir, 2)
    options = dataclasses.replace(config.options, max_epochs=8, mini_batch_size=6, checkpoint_frequency=1)
    config = dataclasses.replace(config, options=options)  # 24 iterations
    run = _started(str(tmp_path / "store"), config)
    index_stage(shapes_dir, run)
    split_stage(run, (0.75, 0.25, 0.0), 0)
    checkpoints = RunLayout(run).checkpoints
    code = "import sys; from retrain.tasks.training.stage import train_run; train_run(sys.argv[1])"
    log = open(tmp_path / "launcher.log", "w")
    ranks = []
    # Started with SIGINT ignored, as under nohup or as a background job: torch's own
    # parent-death signal for its ranks (SIGINT) is then lost.
    launcher = subprocess.Popen(
        [sys.executable, "-c", code, run],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 600
        while not any(i >= 2 for i, _ in list_checkpoints(checkpoints)):
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        ranks = psutil.Process(launcher.pid).children()
        assert len(ranks) >= 2  # the two ranks (and multiprocessing's resource tracker)
        launcher.send_signal(9)
        launcher.wait()
        _, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, "a rank outlived its launcher"
    finally:
        for process in [launcher, *ranks]:  # nothing left behind, whatever failed
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()
        log.close()
    killed_at = list_checkpoints(checkpoints)[-1][0]
    assert killed_at < 24
    config_now = read_run(run)["config"]
    config_now["options"]["processes"] = 1
    update_run(run, config=config_now)
    summary = train_run(run)
    assert summary["resumed_from"] == killed_at and summary["iterations"] == 24 and summary["processes"] == 1
