import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from retrain.tasks.networks import CAFFE_SQUEEZENET
from retrain.tasks.preprocessing import (
    Augmentation,
    ImageDecodeError,
    InputAffine,
    Preprocessing,
    decode_image,
    load_image,
    load_images,
    scaled_decoder_applies,
)
from tests.conftest import encode


def test_decoding_in_threads_leaves_the_warning_filters_alone():
    # load_images and the scoring workers decode in threads; swapping the process-wide filter
    # list around each decode (warnings.catch_warnings) raced and could leave it changed
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    blobs = [encode(rgb, "JPEG"), encode(rgb, "PNG"), encode(rgb, "BMP"), encode(rgb.convert("CMYK"), "JPEG")]
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        decoded = list(pool.map(decode_image, blobs * 100))
    assert all(image.shape == (3, 64, 48) for image in decoded)
    assert warnings.filters == before


def test_caffe_preprocessing_is_bgr_0_255_mean_subtracted():
    pre = CAFFE_SQUEEZENET.preprocessing
    pixel = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)  # R G B
    out = pre.normalize(pixel).flatten().tolist()
    assert out == pytest.approx([30 - 104, 20 - 117, 10 - 123])  # B G R


def test_imagenet_preprocessing_roundtrips_through_dict():
    pre = Preprocessing(input_size=(224, 224))
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    out = pre.normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten()
    assert out[0] == pytest.approx((1 - 0.485) / 0.229)


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("RGB", "GIF"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
    ],
)
def test_decode_gives_rgb_uint8_for_many_kinds(mode, fmt):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    image = (
        rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    )  # 16-bit grey
    out = decode_image(encode(image, fmt))
    assert out.dtype == torch.uint8 and out.shape == (3, 20, 30)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert out.shape == (3, 40, 20)


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty"), (b"hello world", "not a readable image"), (b"\xff\xd8\xff\xe0" + b"\0" * 50, "image")],
)
def test_undecodable_bytes_raise_a_clear_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_decompression_bomb_is_refused():
    header = encode(Image.new("1", (20000, 20000)), "PNG")  # 400 Mpixel, a few KB
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(header)


def test_load_image_resizes_to_network_input():
    data = encode(Image.new("RGB", (500, 300), "blue"), "JPEG")
    assert load_image(data, (227, 227)).shape == (3, 227, 227)


def test_load_image_takes_a_url_or_bytes_and_names_the_file_it_cannot_use(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(Image.new("RGB", (50, 40), "blue"), "JPEG"))
    assert torch.equal(load_image(str(photo), (32, 32)), load_image(photo.read_bytes(), (32, 32)))
    assert torch.equal(load_images([str(photo)] * 2, (32, 32))[1], load_image(str(photo), (32, 32)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"hello world")
    with pytest.raises(ImageDecodeError, match="broken.jpg: not a readable image") as caught:
        load_images([str(photo), str(broken)], (32, 32))
    assert caught.value.source == str(broken) and caught.value.reason.startswith("not a readable image")
    with pytest.raises(FileNotFoundError):  # what the store says: no file is not a bad image
        load_image(str(tmp_path / "gone.jpg"), (32, 32))


def test_the_scaled_decoder_is_a_parameter_of_the_one_loader():
    rng = np.random.default_rng(2)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((800, 600))
    jpeg, png = encode(photo, "JPEG", quality=95), encode(photo, "PNG")
    exact, scaled = load_image(jpeg, (100, 100)), load_image(jpeg, (100, 100), "scaled")
    assert scaled.shape == exact.shape and (scaled.float() - exact.float()).abs().mean() < 4  # of 255
    assert not scaled_decoder_applies(png)  # anything but a JPEG: the exact decoder, the same pixels
    assert torch.equal(load_image(png, (100, 100), "scaled"), load_image(png, (100, 100)))
    assert not scaled_decoder_applies(b"\xff\xd8 not a JPEG at all \xff\xd9")  # the exact decoder says why
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_image(b"\xff\xd8 not a JPEG at all \xff\xd9", (100, 100), "scaled")
    with pytest.raises(ValueError, match="decoder must be one of"):
        load_image(jpeg, (100, 100), "fast")


@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_one_normalisation_for_training_and_inference(channel_order):
    pre = Preprocessing((6, 5), channel_order, scale=1 / 255, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (3, 3, 6, 5), dtype=torch.uint8)
    affine = InputAffine.of(pre, torch.device("cpu"))
    x = pre.normalize(pixels)  # training's and the features' call
    assert torch.equal(x, affine(pixels[:, affine.channels], torch.device("cpu")))  # the predictors'
    assert x.is_contiguous(memory_format=torch.channels_last)
    ordered = pixels.float().flip(1) if channel_order == "BGR" else pixels.float()
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (ordered * pre.scale - mean) / std, atol=1e-6)


def test_augmentation_is_repeatable_and_translates_with_zero_fill():
    images = torch.full((8, 3, 50, 50), 200, dtype=torch.uint8)
    augment = Augmentation(reflect=True, max_translation=10)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape
    assert (a == 0).any()  # shifted images show zero fill at the edges
    assert torch.equal(Augmentation(False, 0)(images, torch.Generator()), images)


def test_reflection_flips_horizontally():
    image = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    image[..., 0] = 255
    flips = {bool(Augmentation(True, 0)(image, torch.Generator().manual_seed(s))[0, 0, 0, 3] == 255) for s in range(20)}
    assert flips == {True, False}
