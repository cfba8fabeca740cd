"""Image decoding and eval preprocessing, shared by training, serving and benchmarks.

One function turns untrusted bytes into a bounded RGB image (`decode_image`), one turns an
image into the CNN's input (`preprocess`). Both are numpy/Pillow only, so the serving path
needs no torch. The constants come from timm's data config and travel in the bundle.
"""
from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from catcascade.cnn_stage.decode_budget import (DecodeLimits, InvalidImageError, check_dimensions, estimated_decode_bytes,
                                     exif_orientation, inspect_structure, jpeg_draft_scale)

__all__ = ["DecodeLimits", "InvalidImageError", "PreprocessConfig", "decode_image", "preprocess", "load_and_preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Upscaling resizes the whole image up to this many times scale_size^2 pixels (aspect ratios up
# to 32:1), the crop's source box beyond.
_MAX_UPSCALED_AREA = 32
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessConfig:
    """Eval preprocessing: resize the short side to image_size / crop_pct, center-crop, normalise."""

    image_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    limits: DecodeLimits = field(default_factory=DecodeLimits)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.1, 1], got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}")

    @property
    def scale_size(self) -> int:
        return math.floor(self.image_size / self.crop_pct)

    @classmethod
    def from_timm(cls, model, image_size: int | None = None) -> "PreprocessConfig":
        """Reads mean/std/crop/interpolation from the timm model's pretrained config."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        size = image_size or cfg["input_size"][-1]
        return cls(
            image_size=size,
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic") if cfg.get("interpolation") in _INTERPOLATION else "bicubic",
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("limits")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            image_size=int(d["image_size"]),
            crop_pct=float(d["crop_pct"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bicubic"),
        )


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), draft_size: int | None = None) -> Image.Image:
    """Decodes untrusted bytes into an upright RGB image, or raises InvalidImageError.

    Everything that bounds the cost is checked before any pixel is decoded: byte size, the
    container's structure (JPEG segments and scans, PNG chunks: cnn_stage.decode_budget),
    dimensions, pixel count and aspect ratio, then the memory the decode will take. With
    ``draft_size`` a JPEG is decoded at the smallest DCT scale that still covers that size.
    The EXIF orientation is applied, so a phone photo tagged "rotate 90" comes out upright.
    """
    if not data:
        raise InvalidImageError("image is empty (0 bytes)", "empty")
    if len(data) > limits.max_bytes:
        raise InvalidImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}", "bytes")
    structure = inspect_structure(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": the EXIF is then ignored
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"bytes are not a decodable image in an accepted format ({', '.join(limits.formats)})", "format"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"image refused as a decompression bomb: {e}", "pixels") from None
    except Exception as e:  # Pillow raises many types on hostile headers
        raise InvalidImageError(f"cannot read image header (truncated or corrupt): {e}", "corrupt") from None
    width, height = img.size
    check_dimensions(width, height, limits)
    transpose = exif_orientation(img)
    is_jpeg = img.format == "JPEG"
    scale = jpeg_draft_scale(width, height, draft_size) if is_jpeg else 1
    fast = is_jpeg and img.mode in ("RGB", "L") and scale == 1 and _simplejpeg() is not None
    need = estimated_decode_bytes(img, structure, scale, fast, transpose is not None)
    if need > limits.max_decode_mb * 2**20:
        raise InvalidImageError(
            f"decoding this {width}x{height} {img.format} ({img.mode}) would take about {need / 2**20:.0f} MB; "
            f"the limit is {limits.max_decode_mb:g} MB", "memory")
    out = _decode_jpeg_turbo(data) if fast else None
    if out is None:
        try:
            if scale > 1:
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            out = img if img.mode == "RGB" else img.convert("RGB")
        except Exception as e:
            raise InvalidImageError(f"image data is truncated or corrupt ({img.format}): {e}", "corrupt") from None
    return out.transpose(transpose) if transpose is not None else out


@functools.cache
def _simplejpeg():
    """The simplejpeg module, or None when it is not installed (looked up once, not per image)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _decode_jpeg_turbo(data: bytes) -> Image.Image | None:
    """Full-scale JPEG decode with simplejpeg (libjpeg-turbo straight into an RGB array): the
    same pixels as Pillow's decoder (checked bit for bit on the sample photos), about 20% less
    time. Used for RGB and greyscale JPEGs where Pillow's draft mode would not shrink the image
    anyway (CMYK converts differently); returns None for whatever it does not decode cleanly
    (damaged files), so that Pillow decides those."""
    simplejpeg = _simplejpeg()
    if simplejpeg is None:  # optional speed-up; Pillow decodes the same pixels
        return None
    try:
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True), mode="RGB")
    except (ValueError, TypeError):
        return None


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image -> float32 CHW array, matching timm's eval transform for the same config.

    When downscaling, resize-short-side-then-center-crop is one resize of just the crop's
    source box (Pillow samples the same positions and reads neighbours outside the box for
    the filter), which skips resampling the pixels the crop would throw away. Upscaling
    resizes the whole image (exactly torchvision's pixels) unless the aspect ratio would make
    that large (a 1x12000 image would become 256x3072000): then the crop's source box is
    resampled in two passes, within one grey level of the whole resize.
    """
    w, h = img.size
    s = cfg.scale_size  # torchvision's Resize(int): short side to s, long side truncated
    new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    left = int(round((new_w - cfg.image_size) / 2.0))
    top = int(round((new_h - cfg.image_size) / 2.0))
    size = cfg.image_size
    resample = _INTERPOLATION[cfg.interpolation]
    if new_w < w:  # downscaling: resample only the crop's source box
        sx, sy = w / new_w, h / new_h
        img = img.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    elif new_w * new_h > _MAX_UPSCALED_AREA * s * s:  # bounded: size x h, then size x size
        sx, sy = w / new_w, h / new_h
        img = img.resize((size, h), resample, box=(left * sx, 0, (left + size) * sx, h))
        img = img.resize((size, size), resample, box=(0, top * sy, size, (top + size) * sy))
    else:
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")
    # (x / 255 - mean) / std as one multiply-add per channel.
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    x *= 1.0 / (255.0 * std)
    x -= (np.asarray(cfg.mean, dtype=np.float32) / np.asarray(cfg.std, dtype=np.float32)).reshape(3, 1, 1)
    return x


def load_and_preprocess(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """Bytes -> CNN input, decoding JPEGs in draft mode at the resize target."""
    return preprocess(decode_image(data, cfg.limits, draft_size=cfg.scale_size), cfg)
