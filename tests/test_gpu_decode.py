"""Scoring on a GPU decodes JPEGs in batches there (nvJPEG: tasks.preprocessing.load_jpegs) and
runs one Dask worker per GPU. The batch function runs on the CPU too: there it must give the
exact decoder's pixels, and a batch assembled from it the per-file path's batch; on a GPU
(skipped without one), pixels within nvJPEG's rounding of the CPU's."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from retrain.tasks.inference import Predictor
from retrain.tasks.preprocessing import (
    ImageDecodeError,
    InputAffine,
    Preprocessing,
    jpeg_batch_applies,
    load_image,
    load_jpegs,
)
from retrain.tasks.scoring import cluster
from retrain.tasks.scoring.partition import _load_batch, warm_gpu

SIZE = (40, 48)


def jpeg(width: int, height: int, mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A smooth image with edges (a photo, roughly), as JPEG bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = 1 if mode == "L" else 4 if mode == "CMYK" else 3
    planes = [(np.sin(x / (7 + 3 * c)) + np.cos(y / (5 + 2 * c))) * 60 + 128 for c in range(channels)]
    array = np.clip(np.stack(planes, -1) + rng.normal(0, 8, (height, width, channels)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def corrupt(data: bytes) -> bytes:
    """A bogus Huffman table: the header reads (the screen takes it), every decoder fails."""
    at = data.find(b"\xff\xc4") + 5
    return data[:at] + b"\xff" * 16 + data[at + 16 :]


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [
        jpeg(120, 90),
        jpeg(120, 90, seed=1),  # the same size: resized in one call with the first
        jpeg(200, 150, progressive=True),
        jpeg(61, 47, "L"),
        jpeg(33, 200, subsampling=0),  # 4:4:4
    ]


def test_the_batch_decoder_takes_only_the_jpegs_it_decodes_as_the_exact_decoder_does(photos):
    assert all(jpeg_batch_applies(p) for p in photos)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(photos[0])).save(rotated, "JPEG", exif=exif)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for other in (jpeg(30, 20, "CMYK"), rotated.getvalue(), photos[0][:-200], png.getvalue(), b"", b"\xff\xd8junk"):
        assert not jpeg_batch_applies(other)


def test_the_batch_decoder_on_the_cpu_gives_the_exact_decoders_pixels_and_keeps_every_file(photos):
    bad = corrupt(photos[0])
    assert jpeg_batch_applies(bad)
    batch = [*photos[:2], bad, *photos[2:]]
    out = load_jpegs(batch, SIZE, "cpu")
    assert len(out) == len(batch)
    with pytest.raises(ImageDecodeError) as expected:
        load_image(bad, SIZE)
    assert isinstance(out[2], ImageDecodeError) and out[2].reason == expected.value.reason
    for data, image in zip(batch, out):
        if data is not bad:
            assert torch.equal(image, load_image(data, SIZE))
    assert load_jpegs([], SIZE) == []


def predictor(device: str) -> Predictor:
    prep = Preprocessing(SIZE, channel_order="BGR")  # the batch comes back in the network's order
    return Predictor(["a", "b"], prep, "torch", torch.device(device), None, InputAffine.of(prep, torch.device(device)))


def score_folder(tmp_path, photos) -> list[str]:
    files = {f"p{i}.jpg": data for i, data in enumerate(photos)}
    png = io.BytesIO()
    Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3)).save(png, "PNG")
    files.update({"corrupt.jpg": corrupt(photos[0]), "cmyk.jpg": jpeg(30, 20, "CMYK"), "x.png": png.getvalue()})
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [str(tmp_path / n) for n in sorted(files)] + [str(tmp_path / "gone.jpg")]


def test_a_worker_batch_from_the_batch_decoder_equals_the_per_file_one(tmp_path, photos):
    paths = score_folder(tmp_path, photos)
    cpu = predictor("cpu")
    each = _load_batch(paths, 10, cpu, None)
    batched = _load_batch(paths, 10, cpu, None, torch.device("cpu"))
    assert batched.rows == each.rows and batched.errors == each.errors
    assert set(batched.errors) == {10 + paths.index(str(tmp_path / n)) for n in ("corrupt.jpg", "gone.jpg")}
    assert torch.equal(batched.pixels, each.pixels) and batched.pixels.is_contiguous(memory_format=torch.channels_last)
    assert batched.batch_decoded == len(photos) + 1  # the JPEGs; not the CMYK one, the PNG, the missing file


def test_local_workers_are_one_per_gpu_each_pinned_to_its_own(monkeypatch):
    for visible, gpus in (("1,3", ["1", "3"]), ("", []), ("0,-1,2", ["0"]), ("GPU-5f1e", ["GPU-5f1e"])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert cluster.visible_gpus() == gpus
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    devices = ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1"]
    monkeypatch.setattr(cluster.glob, "glob", lambda pattern: devices if pattern == "/dev/nvidia*" else [])
    assert cluster.visible_gpus() == ["0", "1"]
    assert cluster._worker_count(None, ["1", "3"]) == 2 and cluster._worker_count(3, ["1", "3"]) == 3
    nanny = cluster._gpu_pinned_nanny(["1", "3"])
    pins = [nanny("tcp://127.0.0.1:1", name=i, env={"KEPT": "yes"}).env for i in range(3)]
    assert [p["CUDA_VISIBLE_DEVICES"] for p in pins] == ["1", "3", "1"] and pins[0]["KEPT"] == "yes"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_nvjpeg_gives_the_cpu_decoders_pixels_within_rounding(tmp_path, photos):
    warm_gpu()  # what each GPU worker does as it starts
    bad = corrupt(photos[0])
    out = load_jpegs([*photos, bad], SIZE, "cuda")
    assert isinstance(out[-1], ImageDecodeError)  # one bad file: the others still decoded
    for data, image in zip(photos, out):
        assert image.device.type == "cuda" and image.shape == (3, *SIZE)
        difference = (image.cpu().int() - load_image(data, SIZE).int()).abs().float()
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: off by a level or two
        assert difference.mean() < 1.5, difference.mean()
    paths = score_folder(tmp_path, photos)
    on_gpu = _load_batch(paths, 0, predictor("cuda"), None, torch.device("cuda"))
    on_cpu = _load_batch(paths, 0, predictor("cpu"), None)
    assert on_gpu.pixels.device.type == "cuda" and (on_gpu.rows, on_gpu.errors) == (on_cpu.rows, on_cpu.errors)
    assert (on_gpu.pixels.cpu().int() - on_cpu.pixels.int()).abs().float().mean() < 1.5
