"""Decode admission: hostile inputs are refused or decoded within a bounded cost, real photos
decode as before, and the EXIF orientation is applied on every decode path."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.hostile_images import hostile_corpus, jpeg_many_scans, measure_decode_costs, png
from catcascade.cnn_stage.decode_budget import inspect_structure
from catcascade.cnn_stage.preprocessing import DecodeLimits, InvalidImageError, PreprocessConfig, decode_image, preprocess

# Generous against the goal (about 0.5 s and 150 MB at 224 px): this machine is shared and noisy.
CPU_BOUND_S = 2.0
PEAK_BOUND_MB = 200.0

# Inputs whose refusal, and its reason, are known.
EXPECTED_REFUSALS = {
    "PNG 1x12000": "aspect ratio of 12000:1",
    "JPEG 8x12000": "aspect ratio",
    "WebP 12000x2": "aspect ratio",
    "PNG header 100000x100000": "each side must be",
    "JPEG header 65500x65500": "each side must be",
    "WebP header 16383x16383": "each side must be",
    "PNG 6300x6300 RGB zeros": "would take about 151 MB; the limit is 128 MB",
    "PNG 6300x6300 palette": "would take about",
    "WebP 5000x5000 lossless": "would take about",
    "JPEG 5000x5000 progressive 4:4:4": "would take about",
    "JPEG 4000x4000, 20000 empty scans": "more than 100 scans",
    "JPEG 2 million empty comments": "more than 20000 marker segments",
    "JPEG 15 MB of junk between segments": "extraneous bytes",
    "PNG 1.5 million private chunks": "more than 20000 chunks",
    "GIF 500 frames": "accepted format",
    "TIFF 2000x2000 deflate": "accepted format",
    "JPEG truncated": "truncated",
}
EXPECTED_DECODED = ("PNG 5600x5600 RGB (just under the memory budget)", "JPEG 7000x5500 progressive 4:2:0",
                    "JPEG 4000x4000, 99 empty scans", "JPEG 19 MB progressive noise (4000x4000, q95)",
                    "JPEG EXIF IFD cycle", "JPEG EXIF orientation 9")


@pytest.mark.skipif(sys.platform != "linux", reason="peak memory is read from /proc")
def test_every_hostile_input_is_refused_or_decoded_within_budget():
    """Each corpus input, decoded at 224 px in a child process: refused with InvalidImageError
    or decoded, within the CPU and peak-memory bounds; the known ones for their reason."""
    corpus = hostile_corpus()
    assert all(len(data) <= DecodeLimits().max_bytes for data in corpus.values())
    costs = {c.name: c for c in measure_decode_costs(corpus, image_size=224, timeout_s=30)}
    for name, c in costs.items():
        assert c.outcome == "decoded" or c.refused, f"{name}: {c.outcome}"
        assert c.cpu_s <= CPU_BOUND_S, f"{name}: {c.cpu_s:.2f} s CPU ({c.outcome})"
        assert c.peak_mb <= PEAK_BOUND_MB, f"{name}: {c.peak_mb:.0f} MB peak ({c.outcome})"
    for name, needle in EXPECTED_REFUSALS.items():
        assert costs[name].refused and needle in costs[name].outcome, (name, costs[name].outcome)
    for name in EXPECTED_DECODED:
        assert costs[name].outcome == "decoded", (name, costs[name].outcome)


@pytest.mark.parametrize("data,reason", [
    (png(1, 12000), "aspect"),
    (png(6300, 6300), "memory"),
    (jpeg_many_scans(256, 150), "scans"),
    (png(16, 16, before_idat=b"\0\0\0\0prVt\0\0\0\0" * 30_000), "segments"),
])
def test_refusals_carry_a_reason_label(data, reason):
    with pytest.raises(InvalidImageError) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_limits_are_configurable():
    tall = png(10, 400)  # 40:1
    with pytest.raises(InvalidImageError, match="aspect ratio of 40:1; the limit is 20:1"):
        decode_image(tall)
    assert decode_image(tall, DecodeLimits(max_aspect_ratio=50)).size == (10, 400)
    scans = jpeg_many_scans(64, 20)
    with pytest.raises(InvalidImageError, match="more than 10 scans"):
        decode_image(scans, DecodeLimits(max_jpeg_scans=10))
    with pytest.raises(InvalidImageError, match="8x8 blocks"):
        decode_image(scans, DecodeLimits(max_jpeg_scan_blocks=500))
    assert decode_image(scans).size == (64, 64)


def test_jpeg_walk_counts_scans_and_skips_segment_payloads():
    """A progressive JPEG's scans are counted from the entropy data; bytes that look like a
    scan marker inside an APP segment (an EXIF thumbnail) are skipped with the segment."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    s = inspect_structure(data, DecodeLimits())
    assert (s.format, s.width, s.height) == ("JPEG", 64, 48)
    assert s.jpeg_scans == data.count(b"\xff\xda") and s.jpeg_scans >= 6
    payload = b"Exif\0\0" + b"\xff\xda\x00\x08" * 2000
    with_app1 = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    assert inspect_structure(with_app1, DecodeLimits()).jpeg_scans == s.jpeg_scans
    assert decode_image(with_app1).size == (64, 48)


@pytest.mark.parametrize("wh", [(3, 600), (600, 3), (7, 1000)])
def test_extreme_aspect_upscale_is_bounded_and_matches_the_whole_resize(wh, monkeypatch):
    """preprocess itself (without DecodeLimits) resizes only the crop's source box when the
    whole upscaled image would be large, within one grey level of the whole resize."""
    from catcascade.cnn_stage import preprocessing

    w, h = wh
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    cfg = PreprocessConfig(image_size=224)
    bounded = preprocess(img, cfg)
    monkeypatch.setattr(preprocessing, "_MAX_UPSCALED_AREA", 10**9)  # force the whole resize
    whole = preprocess(img, cfg)
    one_level = 1.0 / (255 * min(cfg.std)) + 1e-5
    assert bounded.shape == whole.shape == (3, 224, 224)
    assert np.abs(bounded - whole).max() <= one_level


def test_real_photos_decode_exactly_as_pillow_does(sample_data):
    """The structure walk accepts every real photo and changes no pixel."""
    cfg = PreprocessConfig()
    photos = sorted(sample_data.rglob("*.jpg"))
    assert len(photos) >= 20
    for path in photos:
        data = path.read_bytes()
        ref = Image.open(io.BytesIO(data))
        ref.draft("RGB", (cfg.scale_size, cfg.scale_size))
        assert np.array_equal(np.asarray(decode_image(data, draft_size=cfg.scale_size)),
                              np.asarray(ref.convert("RGB"))), path.name


# ------------------------------------------------------------------------ EXIF orientation

# The transpose that stores an upright photo the way a camera tagged with each orientation does.
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def _tagged(img: Image.Image, fmt: str, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, fmt, exif=exif.tobytes(), **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def upright_photo(sample_data) -> Image.Image:
    return Image.open(sorted(sample_data.rglob("*.jpg"))[0]).convert("RGB")


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_gives_the_upright_tensor_exactly(upright_photo, fmt, orientation):
    cfg = PreprocessConfig()
    stored = upright_photo.transpose(STORED[orientation])
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = _tagged(stored, fmt, orientation, **kw)
    decoded = decode_image(data, draft_size=cfg.scale_size)
    assert decoded.size == upright_photo.size
    assert np.array_equal(preprocess(decoded, cfg), preprocess(upright_photo, cfg))
    if orientation in (5, 6, 7, 8):  # without the tag the tensor would be the sideways one
        untagged = io.BytesIO()
        stored.save(untagged, fmt, **kw)
        assert not np.array_equal(preprocess(decode_image(untagged.getvalue()), cfg), preprocess(upright_photo, cfg))


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("scale_up", [1, 3], ids=["simplejpeg", "pillow-draft"])
def test_exif_orientation_on_both_jpeg_paths(upright_photo, orientation, scale_up):
    """Small JPEGs decode through simplejpeg, large ones through Pillow's draft mode: both
    give exactly Pillow's pixels transposed upright, and a tensor close to that of the upright
    photo saved the same way (JPEG coding of rotated pixels is lossy, so not bit-equal)."""
    cfg = PreprocessConfig()
    upright = upright_photo.resize((upright_photo.width * scale_up, upright_photo.height * scale_up))
    data = _tagged(upright.transpose(STORED[orientation]), "JPEG", orientation, quality=100, subsampling=0)
    decoded = decode_image(data, draft_size=cfg.scale_size)
    ref = Image.open(io.BytesIO(data))
    ref.draft("RGB", (cfg.scale_size, cfg.scale_size))
    want = ref.convert("RGB").transpose(
        {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation])
    assert np.array_equal(np.asarray(decoded), np.asarray(want))
    plain = io.BytesIO()
    upright.save(plain, "JPEG", quality=100, subsampling=0)
    x, up = preprocess(decoded, cfg), preprocess(decode_image(plain.getvalue(), draft_size=cfg.scale_size), cfg)
    sideways = preprocess(decoded.transpose(Image.Transpose.ROTATE_90), cfg)
    assert np.abs(x - up).mean() < 0.06 < 0.2 < np.abs(sideways - up).mean()


@pytest.mark.parametrize("name,rotated", [
    ("JPEG EXIF orientation 9", False), ("JPEG EXIF orientation 0", False), ("JPEG EXIF IFD cycle", True),
    ("JPEG EXIF 65535 entries declared", False), ("PNG eXIf 65535 entries", False), ("WebP EXIF orientation 6", True),
])
def test_bogus_exif_is_ignored_and_valid_tags_apply(name, rotated):
    """Invalid orientations and malformed blocks leave the image as stored; a valid tag
    inside an IFD that points at itself still applies (only the first IFD is read)."""
    from benchmarks.hostile_images import CORPUS

    import warnings

    data = CORPUS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data"
        w, h = Image.open(io.BytesIO(data)).size
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == ((h, w) if rotated else (w, h))


def test_vlm_copy_is_upright_too(upright_photo):
    """The copy the pipeline keeps for the VLM comes from the same oriented decode."""
    from catcascade.serving.pipeline import CascadePipeline

    pipe = CascadePipeline(["a"], PreprocessConfig(), cnn=None, policy=None, blender=None)
    try:
        img, x = pipe._decode(_tagged(upright_photo.transpose(STORED[6]), "PNG", 6), keep_for_vlm=True)
    finally:
        pipe.close()
    vlm_copy = upright_photo.copy()
    vlm_copy.thumbnail((448, 448), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(img), np.asarray(vlm_copy))
    assert np.array_equal(x, preprocess(upright_photo, PreprocessConfig()))
