"""What decoding an image will cost, worked out from its bytes before any pixel is decoded.

Byte size and pixel count do not bound decode cost: a 300 KB progressive JPEG of empty scans
costs seconds (the decoder visits every 8x8 block once per scan), two million empty JPEG
comments or PNG chunks cost seconds of Python in Pillow's header parser, and a 40 MP image
expands to 4 bytes a pixel in Pillow plus whatever the decoder holds beside it (a progressive
JPEG keeps every DCT coefficient: 2 bytes a sample; Pillow's WebP path holds the canvas, a
copy of it and the image). This module walks the container structure at C speed where it can
(regular expressions over JPEG entropy data) and stops as soon as a limit is passed, so the
walk itself is bounded; ``estimated_decode_bytes`` turns the header into the memory the
decode will take. ``cnn_stage.preprocessing.decode_image`` refuses what exceeds the budget.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

from PIL import Image

from catcascade.errors import CatcascadeError


class InvalidImageError(CatcascadeError, ValueError):
    """The bytes are not an image this service accepts; the message says why. ``reason`` is a
    short label for metrics (format, corrupt, dimensions, aspect, memory, scans, segments...)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied to untrusted image bytes before and while decoding."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    max_aspect_ratio: float = 20.0
    """Longest side / shortest side. Beyond it the centre crop would keep a sliver of the image."""
    max_decode_mb: float = 128.0
    """Memory the decode may take, estimated from the header (pixels x bytes per pixel of the
    decoded, converted and rotated copies, plus a progressive JPEG's coefficient buffer)."""
    max_jpeg_scans: int = 100
    """Scans in one JPEG (encoders write 1 baseline, about 10 progressive)."""
    max_jpeg_scan_blocks: int = 40_000_000
    """8x8 blocks a JPEG's scans visit in total (each scan visits every block of its
    components, with or without data): bounds the work of many-scan files (~3-6 ns a block)."""
    max_segments: int = 20_000
    """JPEG marker segments or PNG chunks in one file (Pillow parses each in Python)."""


# Extraneous bytes Pillow's JPEG header parser steps over one at a time in Python.
MAX_JPEG_JUNK_BYTES = 4096
# EXIF blocks larger than a JPEG APP1 segment can hold are not parsed for the orientation.
MAX_EXIF_BYTES = 65_536 + 6

# Bytes per pixel of Pillow's in-memory modes (RGB is stored in 4 bytes).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def mode_bytes(mode: str) -> int:
    return _MODE_BYTES.get(mode, 4)


@dataclass(frozen=True)
class ImageStructure:
    """What the container says, read without decoding pixels."""

    format: str | None
    width: int = 0
    height: int = 0
    segments: int = 0
    jpeg_scans: int = 0
    jpeg_scan_blocks: int = 0
    """8x8 blocks visited over all scans."""
    jpeg_coefficient_bytes: int = 0
    """The whole-image DCT coefficient buffer libjpeg allocates for multi-scan files."""


def sniff_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def inspect_structure(data: bytes, limits: DecodeLimits) -> ImageStructure:
    """Walks a JPEG's segments and scans or a PNG's chunks, or reads a WebP's canvas size;
    raises InvalidImageError as soon as a structural limit is passed. Unknown formats get an
    empty ImageStructure (Pillow's allow-list decides)."""
    fmt = sniff_format(data)
    if fmt == "JPEG":
        s = _walk_jpeg(data, limits)
    elif fmt == "PNG":
        s = _walk_png(data, limits)
    elif fmt == "WEBP":
        s = ImageStructure("WEBP", *_webp_size(data))
    else:
        return ImageStructure(None)
    if s.width and s.height:
        check_dimensions(s.width, s.height, limits)
    return s


def check_dimensions(width: int, height: int, limits: DecodeLimits) -> None:
    if width < 1 or height < 1 or max(width, height) > limits.max_side:
        raise InvalidImageError(f"image is {width}x{height}; each side must be 1..{limits.max_side} px", "dimensions")
    if width * height > limits.max_pixels:
        raise InvalidImageError(f"image has {width * height} pixels; the limit is {limits.max_pixels}", "pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise InvalidImageError(f"image is {width}x{height}, an aspect ratio of {ratio:.0f}:1; the limit is "
                                f"{limits.max_aspect_ratio:g}:1 (a centre crop would keep a sliver of it)", "aspect")


# ---------------------------------------------------------------------------------- JPEG

# A marker: 0xFF (any fill 0xFF before it) then a byte that is neither stuffing (0x00) nor fill.
_MARKER = re.compile(rb"\xff([^\x00\xff])")
# The end of entropy-coded data: a marker other than stuffing, fill or a restart marker.
_SCAN_END = re.compile(rb"\xff([^\x00\xff\xd0-\xd7])")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}


def _walk_jpeg(data: bytes, limits: DecodeLimits) -> ImageStructure:
    pos, junk, segments, scans, scan_blocks = 2, 0, 0, 0, 0
    width = height = 0
    progressive = False
    comp_blocks: dict[int, int] = {}  # component id -> 8x8 blocks
    coefficient_bytes = 0
    n = len(data)
    while pos < n:
        m = _MARKER.search(data, pos)
        if m is None:
            break
        if scans == 0:
            junk += m.start() - pos
            if junk > MAX_JPEG_JUNK_BYTES:
                raise InvalidImageError(f"JPEG has more than {MAX_JPEG_JUNK_BYTES} extraneous bytes between its "
                                        "header segments", "segments")
        marker, pos = m.group(1)[0], m.end()
        if marker == 0xD9:  # end of image
            break
        if marker in _STANDALONE:
            continue
        if pos + 2 > n:
            break
        length = (data[pos] << 8) | data[pos + 1]
        body = data[pos + 2:pos + length] if length >= 2 else b""
        segments += 1
        if segments > limits.max_segments:
            raise InvalidImageError(f"JPEG has more than {limits.max_segments} marker segments", "segments")
        if marker in _SOF and len(body) >= 6:
            height, width, nf = struct.unpack_from(">HHB", body, 1)
            if height:  # 0 = defined later by a DNL marker; Pillow's size check decides
                check_dimensions(width, height, limits)
            progressive = marker in _PROGRESSIVE_SOF
            sampling = [(body[6 + 3 * i], body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15)
                        for i in range(nf) if 8 + 3 * i < len(body)]
            hmax = max((h for _, h, _ in sampling), default=1) or 1
            vmax = max((v for _, _, v in sampling), default=1) or 1
            comp_blocks = {cid: math.ceil(math.ceil(width * h / hmax) / 8) * math.ceil(math.ceil(height * v / vmax) / 8)
                           for cid, h, v in sampling}
        elif marker == 0xDA:  # start of scan: count it, then skip its entropy-coded data
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise InvalidImageError(f"JPEG has more than {limits.max_jpeg_scans} scans", "scans")
            ns = body[0] if body else 0
            in_scan = [body[1 + 2 * i] for i in range(ns) if 1 + 2 * i < len(body)]
            if scans == 1 and (progressive or len(in_scan) < len(comp_blocks)):
                coefficient_bytes = sum(comp_blocks.values()) * 64 * 2  # whole-image coefficient buffer
            scan_blocks += sum(comp_blocks.get(c, 0) for c in in_scan)
            if scan_blocks > limits.max_jpeg_scan_blocks:
                raise InvalidImageError(f"JPEG scans visit more than {limits.max_jpeg_scan_blocks:,} 8x8 blocks "
                                        f"({scans} scans of a {width}x{height} image so far)", "scans")
            end = _SCAN_END.search(data, pos + length)
            if end is None:
                break
            pos = end.start()
            continue
        pos += length
    return ImageStructure("JPEG", width, height, segments, scans, scan_blocks, coefficient_bytes)


# ----------------------------------------------------------------------------------- PNG


def _walk_png(data: bytes, limits: DecodeLimits) -> ImageStructure:
    pos, chunks, width, height = 8, 0, 0, 0
    n = len(data)
    unpack = struct.Struct(">I4s").unpack_from
    while pos + 8 <= n:
        length, kind = unpack(data, pos)
        chunks += 1
        if chunks > limits.max_segments:
            raise InvalidImageError(f"PNG has more than {limits.max_segments} chunks", "segments")
        if kind == b"IHDR" and length >= 8 and pos + 16 <= n:
            width, height = struct.unpack_from(">II", data, pos + 8)
        elif kind == b"IEND":
            break
        pos += 12 + length
    return ImageStructure("PNG", width, height, chunks)


# ---------------------------------------------------------------------------------- WebP


def _webp_size(data: bytes) -> tuple[int, int]:
    """Canvas size from the first chunk (VP8X, lossy VP8 or lossless VP8L); (0, 0) if unreadable."""
    kind, body = data[12:16], data[20:40]
    try:
        if kind == b"VP8X" and len(body) >= 10:
            return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
        if kind == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            w, h = struct.unpack_from("<HH", body, 6)
            return w & 0x3FFF, h & 0x3FFF
        if kind == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
            bits = int.from_bytes(body[1:5], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    except (IndexError, struct.error):
        pass
    return 0, 0


# ------------------------------------------------------------------------------ estimates


def jpeg_draft_scale(width: int, height: int, draft_size: int | None) -> int:
    """The DCT scale Pillow's ``draft`` picks for a requested size (1, 2, 4 or 8)."""
    if not draft_size:
        return 1
    scale = min(width // draft_size, height // draft_size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def estimated_decode_bytes(img: Image.Image, structure: ImageStructure, scale: int, fast_jpeg: bool,
                           rotated: bool) -> int:
    """Peak memory of decoding ``img`` (opened, not loaded) into an RGB image: the decoded
    pixels in Pillow's mode, the RGB conversion, the rotated copy, and what the decoder holds
    beside them."""
    w, h = img.size
    px = math.ceil(w / scale) * math.ceil(h / scale)
    if img.format == "JPEG":
        per_px = 3 + 4 if fast_jpeg else mode_bytes(img.mode) + (4 if img.mode != "RGB" else 0)
        held = structure.jpeg_coefficient_bytes
    elif img.format == "WEBP":  # libwebp's ARGB buffer and canvas, a bytes copy of it, Pillow's image
        per_px = 4 + 4 + 4 + 4 + (4 if img.mode != "RGB" else 0)
        held = 0
    else:
        per_px = mode_bytes(img.mode) + (4 if img.mode != "RGB" else 0)
        held = 0
    return px * (per_px + (4 if rotated else 0)) + held


# Files up to this size are walked to predict their decode work; larger ones are judged by size
# (walking megabytes of entropy data where the prediction is made, the event loop, costs too).
WALKED_FOR_WORK_BYTES = 2 * 2**20


def decode_work(data: bytes, limits: DecodeLimits) -> float:
    """Predicted CPU cost of decoding ``data``, in units of about one megapixel's decode: the
    pixels, the compressed bytes (entropy decoding) and the 8x8 blocks a JPEG's scans visit, so
    that a small progressive JPEG of many scans counts for what it costs, not as one image.
    Raises InvalidImageError for a structure past ``limits`` (refused before it queues)."""
    if len(data) > WALKED_FOR_WORK_BYTES:
        return 2.0 * len(data) / 1e6
    s = inspect_structure(data, limits)
    return max(0.1, s.width * s.height / 1e6 + len(data) / 1e6 + s.jpeg_scan_blocks / 2e6)


# ---------------------------------------------------------------------------- orientation

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose that puts the image upright per its EXIF Orientation tag, read from the
    EXIF block the header carried (JPEG APP1, PNG eXIf before the pixels, WebP EXIF chunk),
    as browsers do; None for upright, absent, invalid or oversized EXIF."""
    raw = img.info.get("exif")
    if not raw or not isinstance(raw, bytes) or len(raw) > MAX_EXIF_BYTES:
        return None
    import warnings

    try:
        exif = Image.Exif()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exif.load(raw)
            value = exif.get(0x0112)
    except Exception:  # malformed EXIF is ignored, as viewers do
        return None
    return _TRANSPOSE.get(value) if isinstance(value, int) else None
