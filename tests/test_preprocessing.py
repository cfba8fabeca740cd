from __future__ import annotations

import functools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from catcascade.cnn_stage.preprocessing import DecodeLimits, InvalidImageError, PreprocessConfig, decode_image, preprocess
from tests.conftest import jpeg_bytes


def test_matches_timm_eval_transform():
    import timm
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    cfg = PreprocessConfig.from_timm(model, image_size=96)
    data_cfg = resolve_model_data_config(model)
    tf = create_transform(input_size=(3, 96, 96), crop_pct=data_cfg["crop_pct"], mean=data_cfg["mean"],
                          std=data_cfg["std"], interpolation=data_cfg["interpolation"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 211, 3), dtype=np.uint8))
    ours = preprocess(img, cfg)
    ref = tf(img).numpy()
    assert ours.shape == ref.shape == (3, 96, 96)
    assert np.abs(ours - ref).max() < 0.02  # 8-bit rounding inside torchvision's pipeline


def test_output_is_normalised_float_chw():
    x = preprocess(decode_image(jpeg_bytes((300, 200))), PreprocessConfig(image_size=64))
    assert x.dtype == np.float32 and x.shape == (3, 64, 64) and x.flags["C_CONTIGUOUS"]


def test_draft_mode_decodes_large_jpeg_smaller():
    img = decode_image(jpeg_bytes((2000, 1600), seed=1), draft_size=146)
    assert 146 <= min(img.size) < 800


def _pillow_decode(data: bytes, draft_size: int | None = None) -> np.ndarray:
    import io

    img = Image.open(io.BytesIO(data))
    if draft_size:
        img.draft("RGB", (draft_size, draft_size))
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("size,draft_size", [((500, 375), 256), ((320, 240), None), ((2000, 1600), 256)])
def test_jpeg_pixels_are_pillows_whichever_decoder_runs(size, draft_size):
    """Small JPEGs go through simplejpeg (libjpeg-turbo), large ones through Pillow's draft
    mode: either way the pixels are exactly what Pillow alone would produce."""
    data = jpeg_bytes(size, seed=3)
    assert np.array_equal(np.asarray(decode_image(data, draft_size=draft_size)), _pillow_decode(data, draft_size))


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_jpegs_simplejpeg_declines_still_decode_like_pillow(mode):
    import io

    buf = io.BytesIO()
    Image.new(mode, (64, 48), 90 if mode == "L" else (10, 80, 160, 20)).save(buf, format="JPEG")
    img = decode_image(buf.getvalue(), draft_size=32)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), _pillow_decode(buf.getvalue(), 32))


def test_without_simplejpeg_pillow_decodes(monkeypatch):
    import sys

    from catcascade.cnn_stage import preprocessing

    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import fails as if not installed
    monkeypatch.setattr(preprocessing, "_simplejpeg", functools.cache(preprocessing._simplejpeg.__wrapped__))
    data = jpeg_bytes((120, 90), seed=4)
    assert np.array_equal(np.asarray(decode_image(data)), _pillow_decode(data))


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, I am text", "not a decodable image"),
    (jpeg_bytes((200, 200), seed=2)[:3000], "truncated or corrupt"),
    (jpeg_bytes((200, 200), seed=2)[:300], "truncated or corrupt"),
    (_png_header_only(60000, 60000), "pixels|each side|bomb"),
    (jpeg_bytes(fmt="GIF"), "not a decodable image"),
    (jpeg_bytes(fmt="BMP"), "not a decodable image"),
])
def test_bad_inputs_raise_clear_errors(data, match):
    with pytest.raises(InvalidImageError, match=match):
        decode_image(data)


def test_size_limit():
    with pytest.raises(InvalidImageError, match="bytes; the limit"):
        decode_image(jpeg_bytes(), DecodeLimits(max_bytes=100))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_pixel_and_side_limits_are_the_projects_own(fmt):
    """Below Pillow's bomb guard (89 Mpx), the header checks against DecodeLimits refuse."""
    data = jpeg_bytes((50, 40), fmt=fmt)  # 2,000 pixels
    with pytest.raises(InvalidImageError, match="^image has 2000 pixels; the limit is 1999$"):
        decode_image(data, DecodeLimits(max_pixels=1999))
    assert decode_image(data, DecodeLimits(max_pixels=2000)).size == (50, 40)
    with pytest.raises(InvalidImageError, match="^image is 50x40; each side must be 1..49 px$"):
        decode_image(data, DecodeLimits(max_side=49))
    assert decode_image(data, DecodeLimits(max_side=50)).size == (50, 40)
    header = _png_header_only(20_000, 2_000)  # 40 Mpx: under Pillow's guard, over the default limits
    with pytest.raises(InvalidImageError, match="^image is 20000x2000; each side must be 1..12000 px$"):
        decode_image(header)
    with pytest.raises(InvalidImageError, match="^image has 40000000 pixels; the limit is 39999999$"):
        decode_image(header, DecodeLimits(max_pixels=39_999_999, max_side=20_000))


def test_config_validation():
    with pytest.raises(ValueError, match="crop_pct"):
        PreprocessConfig(crop_pct=2.0)
    cfg = PreprocessConfig(image_size=80)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("hw", [(150, 211), (211, 150), (375, 500), (500, 375), (256, 300), (100, 90), (1200, 1600)])
@pytest.mark.parametrize("size", [64, 224])
def test_matches_torchvision_resize_and_crop_for_many_shapes(hw, size):
    """Short side truncation and crop offsets as torchvision's Resize(int) + CenterCrop."""
    from timm.data import create_transform

    tf = create_transform(input_size=(3, size, size), crop_pct=0.875, interpolation="bicubic")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (*hw, 3), dtype=np.uint8))
    ours = preprocess(img, PreprocessConfig(image_size=size))
    assert ours.flags["C_CONTIGUOUS"] and ours.dtype == np.float32
    assert np.abs(ours - tf(img).numpy()).max() < 0.02
