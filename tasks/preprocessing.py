"""Decoding, per-weights normalisation, training augmentation and the evaluation resize.

Preprocessing travels with the weights: the Caffe SqueezeNet that MATLAB imports wants BGR,
0-255, mean-subtracted 227x227 input; torchvision's ImageNet weights want RGB scaled to 0-1,
ImageNet mean/std, 224x224. A :class:`Preprocessing` record says which, and is stored in
every model file so training, evaluation, ``classify`` and batch scoring all agree.

Images are kept as uint8 tensors (3 x H x W, RGB) resized to the network input until the
last moment: that is 4x smaller than float and lets augmentation work on whole batches.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from retrain.tasks import storage

try:  # deprecated since torchvision 0.29 in favour of TorchCodec; PIL decodes everything without it
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode_image
except ImportError:  # a torchvision that has removed them
    tv_decode_image = None

# Far above any photo (a 100-megapixel image is 1e8) but stops a decompression bomb from
# allocating gigabytes: a 1 KB PNG can claim to be 100,000 x 100,000 pixels.
MAX_IMAGE_PIXELS = 120_000_000
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_TORCHVISION_FORMATS = frozenset({"JPEG", "PNG"})  # fast native decoders; PIL for the rest

# Filters set once, here, and not with warnings.catch_warnings() around each decode: that swaps
# the process-wide filter list, is not thread-safe (load_images and the scoring workers decode in
# threads), and overlapping decodes could leave every warning of the process silenced.
# PIL warns of decompression bombs from 89 Mpixel; MAX_IMAGE_PIXELS decides here.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# torchvision 0.29 says on every call that its decoders are deprecated.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


class ImageDecodeError(ValueError):
    """The bytes are not an image retrain can use (corrupt, truncated, empty, too large...)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a network wants its input: size, channel order, scale and normalisation."""

    input_size: tuple[int, int]  # (height, width)
    channel_order: str = "RGB"  # "RGB" or "BGR"
    scale: float = 1.0 / 255.0  # applied to 0-255 pixel values before mean/std
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # in channel_order, after scale
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, not {self.channel_order!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            channel_order=str(d["channel_order"]),
            scale=float(d["scale"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB batch (N x 3 x H x W) -> the float tensor the network expects."""
        x = images.float()
        if self.channel_order == "BGR":
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * self.scale - mean) / std


IMAGENET_RGB = dict(channel_order="RGB", scale=1.0 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# The original Caffe SqueezeNet: BGR, 0-255, per-channel mean (B 104, G 117, R 123), no std.
CAFFE_BGR = dict(channel_order="BGR", scale=1.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0))


def decode_image(data: bytes) -> torch.Tensor:
    """Decode image bytes to a uint8 RGB tensor (3 x H x W), EXIF orientation applied.

    JPEG and PNG go through torchvision's native decoders (about 2x PIL's speed); anything
    else, or a JPEG the native decoder rejects (CMYK, say), goes through PIL. Raises
    :class:`ImageDecodeError` with the reason for anything unusable.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            fmt, (width, height) = probe.format, probe.size
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large, a decompression bomb? ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown or unsupported format)") from None
    except Exception as exc:
        raise ImageDecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"image too large: {width}x{height} pixels (limit {MAX_IMAGE_PIXELS:,}), a decompression bomb?"
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if fmt in _TORCHVISION_FORMATS and tv_decode_image is not None:
        try:
            image = tv_decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
            if image.dtype == torch.uint16:  # 16-bit PNG
                image = (image.to(torch.int32) >> 8).to(torch.uint8)
            if fmt == "JPEG" and _jpeg_truncated(data):
                raise ImageDecodeError("truncated JPEG (no end-of-image marker)")
            return image
        except ImageDecodeError:
            raise
        except Exception:
            pass  # fall back to PIL, which knows more JPEG variants
    return _decode_with_pil(data)


def _jpeg_truncated(data: bytes) -> bool:
    # libjpeg pads a truncated JPEG with grey and only warns; a complete one ends in FFD9
    # (some writers append a few padding bytes after it).
    return b"\xff\xd9" not in data[-64:]


def _decode_with_pil(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _high_depth_to_l(im) if im.mode in ("I", "F") or im.mode.startswith("I;16") else im
            rgb = rgb.convert("RGB")
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images as 8-bit grey: PIL's own conversion clips
    them (a 16-bit TIFF turns white, a 0-1 float one black). 16-bit modes scale by 1/257; the
    32-bit ones, whose range the mode does not say, by their values: 0-1 floats by 255, up
    to 255 as they are, up to 65535 by 1/257, anything wider by its maximum."""
    values = np.asarray(im, dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    low = float(finite.min()) if finite.size else 0.0
    if im.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif im.mode == "F" and low >= 0 and top <= 1.0:
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    out = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(out, "L")


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a uint8 image (3 x H x W) to exactly ``size`` (H, W), like MATLAB's
    augmentedImageDatastore: the aspect ratio is not kept."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return TF.resize(image, list(size), antialias=True)


def load_image(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """Bytes -> uint8 RGB tensor at the network's input size (what validation and test use)."""
    return resize(decode_image(data), size)


@dataclass(frozen=True)
class Augmentation:
    """The seed's imageAugmenter: random reflection in X and translation in X and Y."""

    reflect: bool = True
    max_translation: int = 30  # pixels, at the network's input size

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, first: int = 0, total: int | None = None
    ) -> torch.Tensor:
        """Augment a uint8 batch (N x 3 x H x W); the generator makes it repeatable. ``images``
        may be the part of a batch of ``total`` starting at ``first`` (one training process's
        share): its images get the draws they would get in the whole batch."""
        n, _, h, w = images.shape
        total = n if total is None else total
        mine = slice(first, first + n)
        out = images
        if self.reflect:
            flip = (torch.rand(total, generator=generator) < 0.5)[mine]
            if flip.any():
                out = out.clone()
                out[flip] = out[flip].flip(-1)
        t = self.max_translation
        if t > 0:
            # Zero fill like MATLAB's imageAugmenter: pad, then crop at a random offset.
            padded = torch.nn.functional.pad(out, (t, t, t, t))
            offsets = torch.randint(0, 2 * t + 1, (total, 2), generator=generator)[mine]
            out = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
        return out


def load_images(urls: list[str], size: tuple[int, int], threads: int = 4) -> torch.Tensor:
    """Read, decode and resize many images into one uint8 batch (N x 3 x H x W).

    Threads overlap file reads with decoding (both release the GIL). Decoded once, the batch
    is reused every epoch: decoding is the cost, augmentation on uint8 is cheap.
    """

    def one(url: str) -> torch.Tensor:
        try:
            return load_image(storage.read_bytes(url), size)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{url}: {exc}") from None

    out = torch.empty((len(urls), 3, *size), dtype=torch.uint8)
    with ThreadPoolExecutor(threads) as pool:
        for i, image in enumerate(pool.map(one, urls)):
            out[i] = image
    return out
