import pytest
import torch

from retrain.tasks.datastore import index_images, split_each_label
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.preprocessing import Augmentation, load_images
from retrain.tasks.training.checkpoints import list_checkpoints
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.loop import train
from retrain.tasks.training.options import TrainingOptions

SPEC = get_spec("squeezenet-caffe")


@pytest.fixture(scope="module")
def data(shapes_dir) -> TrainingData:
    split = split_each_label(index_images(shapes_dir).images, (0.75, 0.25, 0.0), seed=0)
    classes = sorted(split["label"].unique())

    def part(name):
        rows = split[split["split"] == name]
        return (
            load_images(list(rows["path"]), SPEC.preprocessing.input_size),
            torch.tensor([classes.index(c) for c in rows["label"]]),
        )

    return TrainingData(*part("train"), *part("val"))


def fresh_model(seed=0):
    torch.manual_seed(seed)
    model, _ = build_network(SPEC.name, 3, weights="none")
    return model


def run(data, mode="transfer", checkpoints=None, on_validation=None, **options):
    opts = TrainingOptions(
        **{"mini_batch_size": 8, "max_epochs": 2, "validation_frequency": 2, "initial_learn_rate": 1e-3, **options}
    ).validate()
    model = fresh_model()
    outcome = train(
        model,
        SPEC,
        SPEC.preprocessing,
        data,
        mode,
        opts,
        Augmentation(),
        checkpoints=checkpoints,
        on_validation=on_validation,
    )
    return model, outcome


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"solver": "rmsprop"}, "solver"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
        ({"validation_patience": 0}, "validation_patience"),
        ({"initial_learn_rate": -1.0}, "initial_learn_rate"),
        ({"execution_environment": "tpu"}, "execution_environment"),
        ({"validation_frequency_unit": "epochs"}, "validation_frequency_unit"),
        ({"l2_regularization": 2.0}, "l2"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainingOptions(**bad).validate()


def test_unknown_option_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown training option.*max_epoch"):
        TrainingOptions.from_dict({"max_epoch": 3})


def test_transfer_trains_only_the_head_and_validates_on_schedule(data):
    before = fresh_model().state_dict()
    model, outcome = run(data)
    assert outcome.iterations == 4 and outcome.epochs_completed == 2  # 18 train images / 8 = 2 per epoch
    validated = outcome.history.dropna(subset=["val_loss"])["iteration"].tolist()
    assert validated == [2, 4]
    after = outcome.state_dict
    assert torch.equal(after["features.0.weight"], before["features.0.weight"])
    assert not torch.equal(after["classifier.1.weight"], before["classifier.1.weight"])


def test_validation_frequency_in_epochs(data):
    _, outcome = run(data, max_epochs=3, validation_frequency=2, validation_frequency_unit="epoch")
    validated = outcome.history.dropna(subset=["val_loss"])["iteration"].tolist()
    assert validated == [4, 6]  # 2 iterations an epoch: after epoch 2, and at the end


def test_finetune_changes_the_body(data):
    before = fresh_model().state_dict()
    _, outcome = run(data, mode="finetune", max_epochs=1)
    assert not torch.equal(outcome.state_dict["features.0.weight"], before["features.0.weight"])


def test_resume_after_interruption_matches_an_uninterrupted_run(data, tmp_path):
    settings = dict(max_epochs=3, validation_frequency=1, checkpoint_frequency=1, checkpoint_frequency_unit="iteration")
    _, full = run(data, checkpoints=str(tmp_path / "a"), **settings)

    class Interrupt(Exception):
        pass

    def stop_at_3(history):
        if len(history) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(data, checkpoints=str(tmp_path / "b"), on_validation=stop_at_3, **settings)
    assert [i for i, _ in list_checkpoints(str(tmp_path / "b"))] == [1, 2]  # keeps the newest two
    _, resumed = run(data, checkpoints=str(tmp_path / "b"), **settings)
    assert resumed.resumed_from == 2
    assert resumed.iterations == full.iterations == 6
    for key, value in full.state_dict.items():
        assert torch.allclose(value.float(), resumed.state_dict[key].float(), atol=1e-6), key
    assert resumed.history["loss"].tolist() == pytest.approx(full.history["loss"].tolist(), abs=1e-5)


def test_early_stopping_on_validation_patience(data, monkeypatch):
    # A validation loss that never improves: training must stop after `patience` more checks.
    flat = torch.full((len(data.val_targets), 3), 1 / 3)
    monkeypatch.setattr("retrain.tasks.training.steps.predict_scores", lambda *a, **k: flat)
    _, outcome = run(
        data, max_epochs=20, validation_frequency=1, validation_patience=2, classic_loop=True
    )  # the loop that validates through predict_scores
    assert outcome.stopped_early and outcome.iterations == 3 and outcome.best_iteration == 1


def test_best_validation_vs_last_iteration_output(data):
    _, best = run(data, max_epochs=3, validation_frequency=1)
    val = best.history.dropna(subset=["val_loss"])
    assert best.best_iteration == int(val.loc[val["val_loss"].idxmin(), "iteration"])
    assert best.final_val_loss == pytest.approx(val["val_loss"].min())
    _, last = run(data, max_epochs=3, validation_frequency=1, output_network="last-iteration")
    assert last.best_iteration == last.iterations


def test_piecewise_schedule_and_sgdm(data):
    _, outcome = run(
        data,
        solver="sgdm",
        max_epochs=4,
        learn_rate_schedule="piecewise",
        learn_rate_drop_factor=0.5,
        learn_rate_drop_period=2,
        initial_learn_rate=0.01,
    )
    rates = outcome.history.groupby("epoch")["learn_rate"].first().tolist()
    assert rates == pytest.approx([0.01, 0.01, 0.005, 0.005])
