"""What a person sees while a command works: one line per epoch, a line before each slow
step, and a plots artifact small enough for Prefect's events (issue 24, item 2)."""

import base64
import io
import logging
import re

import torch
from PIL import Image

from retrain.tasks import engine_gate, reports
from retrain.tasks.datastore import index_images, split_each_label
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.preprocessing import Augmentation, load_images
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.loop import train
from retrain.tasks.training.options import TrainingOptions

SPEC = get_spec("squeezenet-caffe")
EPOCH_LINE = re.compile(r"epoch (\d)/3: loss \d+\.\d{4}, val loss (\d+\.\d{4}), val accuracy \d\.\d{4}, \d+\.\d s$")


def test_one_line_per_epoch_with_validation_figures_and_the_schedule_untouched(shapes_dir, caplog):
    split = split_each_label(index_images(shapes_dir).images, (0.75, 0.25, 0.0), seed=0)
    classes = sorted(split["label"].unique())

    def part(name):
        rows = split[split["split"] == name]
        images = load_images(list(rows["path"]), SPEC.preprocessing.input_size)
        return images, torch.tensor([classes.index(c) for c in rows["label"]])

    torch.manual_seed(0)
    model, _ = build_network(SPEC.name, 3, weights="none")
    # 18 training images in mini-batches of 8: 2 iterations an epoch, validations at 3 and 6,
    # so epochs 1 and 2 end between validations.
    options = TrainingOptions(mini_batch_size=8, max_epochs=3, validation_frequency=3, feature_cache_views=0)
    logger = logging.getLogger("retrain.test_epochs")
    with caplog.at_level(logging.INFO, logger=logger.name):
        outcome = train(
            model, SPEC, SPEC.preprocessing, TrainingData(*part("train"), *part("val")), "transfer", options,
            Augmentation(), logger=logger, progress=True,  # the lines written under the bar too
        )  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch")]
    found = [EPOCH_LINE.match(line) for line in lines]
    assert all(found) and [m.group(1) for m in found] == ["1", "2", "3"], lines
    validated = outcome.history.dropna(subset=["val_loss"])
    assert validated["iteration"].tolist() == [3, 6]  # the lines' own validations are not scheduled ones
    assert found[-1].group(2) == f"{validated['val_loss'].iloc[-1]:.4f}"


def test_the_engine_check_is_announced_before_it_starts(monkeypatch, capsys, tmp_path):
    said = []
    monkeypatch.setattr(
        engine_gate, "validate_engines", lambda *a, **k: said.append(capsys.readouterr().err) or {"speeds": {}}
    )
    engine_gate.engine_record(str(tmp_path / "model.pt"), "0" * 64, torch.device("cpu"))
    assert said and "checking the engines for this model" in said[0]


def test_photos_travel_as_jpeg_small_enough_for_prefect_events(tmp_path):
    noise = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    url = reports.montage(noise, ["shape"] * 16, str(tmp_path / "montage.png"))  # photo-like: the worst case
    png, jpeg = reports.png_markdown(url, "Sample images"), reports.jpeg_markdown(url, "Sample images")
    assert jpeg.startswith("![Sample images](data:image/jpeg;base64,") and len(jpeg) < len(png) / 3
    decoded = Image.open(io.BytesIO(base64.b64decode(jpeg.split(",", 1)[1].rstrip(")"))))
    assert decoded.size == Image.open(url).size
