"""The one image loader, the one normalisation, training augmentation.

Preprocessing travels with the weights: the Caffe SqueezeNet that MATLAB imports wants BGR,
0-255, mean-subtracted 227x227 input; torchvision's ImageNet weights want RGB scaled to 0-1,
ImageNet mean/std, 224x224. A :class:`Preprocessing` record says which, and is stored in
every model file; :class:`InputAffine` derived from it is the one normalisation training,
features, evaluation, the engine gate, explanations and scoring apply.

:func:`load_image` (and :func:`load_images` for a batch) is the one way a file becomes
pixels: URL or bytes -> uint8 tensor (3 x H x W, RGB) at the network's input size, with the
exact decoder or the DCT-scaled JPEG decoder; a file that cannot be used raises
:class:`ImageDecodeError` naming it. :func:`load_jpegs` does the same for a batch of JPEG
bytes in one call, on a GPU with nvJPEG (what scoring on a GPU decodes with). Images stay uint8 until the last moment: that is 4x
smaller than float and lets augmentation work on whole batches.
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
from retrain.tasks.vocabulary import IMAGE_EXTENSIONS, AugmentationSettings  # noqa: F401 (re-exported)

try:  # libjpeg-turbo with DCT scaling: decodes a 1000 px photo meant for 227 px at 1/4 size
    import simplejpeg
except ImportError:  # optional: the scaled decoder then decodes the exact way
    simplejpeg = None

try:  # deprecated since torchvision 0.29 in favour of TorchCodec; PIL decodes everything without it
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode_image
    from torchvision.io import decode_jpeg as tv_decode_jpeg
except ImportError:  # a torchvision that has removed them
    tv_decode_image = tv_decode_jpeg = None

# Far above any photo (a 100-megapixel image is 1e8) but stops a decompression bomb from
# allocating gigabytes: a 1 KB PNG can claim to be 100,000 x 100,000 pixels.
MAX_IMAGE_PIXELS = 120_000_000
_TORCHVISION_FORMATS = frozenset({"JPEG", "PNG"})  # fast native decoders; PIL for the rest
DECODERS = ("exact", "scaled")  # scaled: JPEG decoded at a reduced size by DCT scaling

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
    """The bytes are not an image retrain can use (corrupt, truncated, empty, too large...).
    ``reason`` says why; the message names the file too when it is known (``source``)."""

    def __init__(self, reason: str, source: str | None = None) -> None:
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason, self.source = reason, source


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
        """uint8 RGB batch (N x 3 x H x W) -> the float input the network expects
        (channels_last, on the batch's device): :class:`InputAffine` on the batch."""
        affine = InputAffine.of(self, images.device)
        return affine(images[:, affine.channels], images.device)


@dataclass(frozen=True)
class InputAffine:
    """The one normalisation: a :class:`Preprocessing`'s channel order, scale, mean and std as
    one channel reorder and one multiply-add per channel, ``x * scale / std - mean / std`` (two
    passes over the batch instead of five). Where the scale and std are 1 (Caffe), it is the
    exact ``x - mean``."""

    channels: list[int]  # RGB -> the network's channel order
    mul: torch.Tensor  # 1 x 3 x 1 x 1
    add: torch.Tensor
    identity_mul: bool

    @classmethod
    def of(cls, prep: Preprocessing, device: torch.device) -> InputAffine:
        mean = torch.tensor(prep.mean, dtype=torch.float32)
        std = torch.tensor(prep.std, dtype=torch.float32)
        mul = (prep.scale / std).view(1, 3, 1, 1).to(device)
        add = (-mean / std).view(1, 3, 1, 1).to(device)
        channels = [2, 1, 0] if prep.channel_order == "BGR" else [0, 1, 2]
        return cls(channels, mul, add, bool(torch.all(mul == 1.0)))

    def __call__(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 batch (N x 3 x H x W) already in the network's channel order -> float
        channels_last input on ``device``. To a GPU it travels as uint8, a quarter of the bytes."""
        pixels = pixels.to(device, non_blocking=True)
        x = torch.empty(pixels.shape, dtype=torch.float32, device=device, memory_format=torch.channels_last)
        x.copy_(pixels)
        if not self.identity_mul:
            x.mul_(self.mul)
        return x.add_(self.add)


def decode_image(data: bytes) -> torch.Tensor:
    """The exact decoder: image bytes -> uint8 RGB tensor (3 x H x W) at the file's own size,
    EXIF orientation applied (:func:`load_image` brings it to the network's input size).

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


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a uint8 image (3 x H x W, or a batch of one size, N x 3 x H x W) to exactly
    ``size`` (H, W), like MATLAB's augmentedImageDatastore: the aspect ratio is not kept.
    Bilinear with antialiasing, for every decoder, on the image's device."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return TF.resize(image, list(size), antialias=True)


def _upright(data: bytes) -> bool:
    """True when PIL reads the header and its EXIF orientation asks for no rotation (simplejpeg
    ignores EXIF). A header PIL cannot read is left to the exact decoder, which says why."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.getexif().get(0x0112, 1) in (1, None)
    except Exception:
        return False


# Decoded at no less than twice the network's input, with the accurate DCT and upsampling, the
# antialiased resize that follows hides the scaling: on hymenoptera's held-out photos it agreed
# with the exact decoder on every label (at 1x with the fast DCT: 98.6 %, which the gate refuses).
SCALED_MARGIN = 2


def scaled_decoder_applies(data: bytes) -> bool:
    """Whether the scaled decoder decodes ``data`` its own way: a complete JPEG with no EXIF
    rotation, with simplejpeg installed. Anything else (PNG, EXIF-rotated, damaged) it decodes
    the exact way, to the same pixels."""
    return simplejpeg is not None and data[:2] == b"\xff\xd8" and not _jpeg_truncated(data) and _upright(data)


def _decode_scaled(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """A JPEG decoded by DCT scaling at the smallest of 1/1, 1/2, 1/4, 1/8 of its size that is
    still at least twice ``size`` (1.1-1.3x faster than the exact decoder on photos of 300-1000
    px); the exact decoder for anything it does not apply to or cannot decode (CMYK, say)."""
    if not scaled_decoder_applies(data):
        return decode_image(data)
    try:
        array = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            fastdct=False,
            fastupsample=False,
            min_height=size[0] * SCALED_MARGIN,
            min_width=size[1] * SCALED_MARGIN,
        )
    except (ValueError, RuntimeError):
        return decode_image(data)
    return torch.from_numpy(array).permute(2, 0, 1)


def load_image(source: str | bytes, size: tuple[int, int], decoder: str = "exact") -> torch.Tensor:
    """The one image loader: a file's URL or its bytes -> uint8 RGB tensor (3 x H x W) at the
    network's input ``size``, EXIF orientation applied. ``decoder``: ``exact`` (every format)
    or ``scaled`` (a JPEG decoded at a reduced size by DCT scaling, then resized the same way).
    A file that cannot be used raises :class:`ImageDecodeError` naming it; a file that cannot
    be read raises what the store raised (FileNotFoundError, IsADirectoryError...)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    if isinstance(source, str):
        try:
            return load_image(storage.read_bytes(source), size, decoder)
        except ImageDecodeError as exc:
            raise ImageDecodeError(exc.reason, source) from None
    image = _decode_scaled(source, size) if decoder == "scaled" else decode_image(source)
    return _resize(image, size)


def jpeg_batch_applies(data: bytes) -> bool:
    """Whether :func:`load_jpegs` takes ``data`` into its batch: a complete JPEG (baseline or
    progressive) in YCbCr or grey, upright, within MAX_IMAGE_PIXELS, which torchvision's JPEG
    decoder gives the exact decoder's image of. Not a CMYK, YCCK or RGB-coded (Adobe) one
    (nvJPEG does not convert them as PIL does), nor an EXIF-rotated one (torchvision applies
    EXIF orientation on the CPU only), nor a truncated or unreadable one: :func:`decode_image`
    decodes those, or says why not."""
    if tv_decode_jpeg is None or data[:2] != b"\xff\xd8" or _jpeg_truncated(data):
        return False
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            return (
                probe.format == "JPEG"
                and probe.mode in ("RGB", "L")
                and not (probe.mode == "RGB" and probe.info.get("adobe_transform") == 0)
                and 0 < probe.width * probe.height <= MAX_IMAGE_PIXELS
                and probe.getexif().get(0x0112, 1) in (1, None)
            )
    except Exception:
        return False


def load_jpegs(
    data: list[bytes], size: tuple[int, int], device: torch.device | str = "cpu"
) -> list[torch.Tensor | ImageDecodeError]:
    """JPEGs that :func:`jpeg_batch_applies` to -> uint8 RGB images (3 x H x W) at ``size`` on
    ``device``, decoded in one torchvision call: on a CUDA device by nvJPEG (batched, in the
    GPU's hardware JPEG decoder where it has one), on the CPU by libjpeg-turbo (the exact
    decoder's pixels); then resized on ``device`` as :func:`load_image` resizes.

    torchvision fails the whole batch for one bad file (it returns no partial results): then
    each file is decoded alone, and one that fails alone too goes to :func:`decode_image` on the
    CPU, whose :class:`ImageDecodeError` (the reason) takes its place in the list. The list has
    one entry per file, in order: no image is lost."""
    if not data:
        return []
    device = torch.device(device)
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        if tv_decode_jpeg is None:
            raise RuntimeError("this torchvision has no JPEG decoder")
        images: list[torch.Tensor | ImageDecodeError] = tv_decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [_decode_jpeg_alone(e, d, device) for e, d in zip(encoded, data)]
    return _resize_each(images, size)


def _decode_jpeg_alone(encoded: torch.Tensor, data: bytes, device: torch.device) -> torch.Tensor | ImageDecodeError:
    if tv_decode_jpeg is not None:
        try:
            return tv_decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # the CPU's decoders know more variants, and say why a file is unusable
    try:
        return decode_image(data).to(device)
    except ImageDecodeError as exc:
        return exc


def _resize_each(
    images: list[torch.Tensor | ImageDecodeError], size: tuple[int, int]
) -> list[torch.Tensor | ImageDecodeError]:
    """:func:`_resize` for each image, in one call per image size (on a GPU each call is a few
    kernel launches; photos from one camera share one size)."""
    out = list(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            by_shape.setdefault(tuple(image.shape), []).append(i)
    for rows in by_shape.values():
        resized = _resize(torch.stack([images[i] for i in rows]), size)
        for i, image in zip(rows, resized):
            out[i] = image
    return out


def load_images(urls: list[str], size: tuple[int, int], decoder: str = "exact", threads: int = 4) -> torch.Tensor:
    """:func:`load_image` for many files, into one uint8 batch (N x 3 x H x W).

    Threads overlap file reads with decoding (both release the GIL). Decoded once, a training
    batch is reused every epoch: decoding is the cost, augmentation on uint8 is cheap.
    """
    out = torch.empty((len(urls), 3, *size), dtype=torch.uint8)
    with ThreadPoolExecutor(threads) as pool:
        for i, image in enumerate(pool.map(lambda url: load_image(url, size, decoder), urls)):
            out[i] = image
    return out


@dataclass(frozen=True)
class Augmentation(AugmentationSettings):
    """The seed's imageAugmenter: random reflection in X and translation in X and Y (its
    settings and their defaults: :class:`tasks.vocabulary.AugmentationSettings`)."""

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
