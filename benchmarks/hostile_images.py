"""A corpus of hostile images: small files that cost a naive decoder seconds or gigabytes.

Every entry fits under the service's default byte limit (20 MB) and is built in memory from
a few parameters (no files shipped), so tests, fuzz seeds and the reliability benchmark
share one list. Each targets one way decode cost escapes a byte-size or pixel-count check:
extreme aspect ratios (upscaling the short side), declared dimensions, JPEG scan counts,
marker and chunk counts that Pillow walks in Python, palette/bit-depth expansion, text and
profile decompression, animation frames, truncation and malformed EXIF.

    python -m benchmarks.hostile_images OUT_DIR     # writes the corpus as files
"""
from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------- PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _zero_zlib(n: int) -> bytes:
    """The zlib stream of ``n`` zero bytes (what an all-black PNG's rows are: filter byte 0 and
    zero samples), built from one compressed megabyte repeated: after a full flush deflate
    restarts byte-aligned with an empty dictionary, so every further megabyte compresses to the
    same bytes. The Adler-32 of ``n`` zeros is (n mod 65521) << 16 | 1."""
    mb = 1 << 20
    if n <= 2 * mb:
        return zlib.compress(bytes(n), 9)
    comp = zlib.compressobj(9)
    first = comp.compress(bytes(mb)) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(bytes(mb)) + comp.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(n, mb)
    last = (comp.compress(bytes(rest)) + comp.flush())[:-4]
    return first + again * (full - 1) + last + struct.pack(">I", ((n % 65521) << 16) | 1)


def png(width: int, height: int, color_type: int = 2, bit_depth: int = 8, interlace: bool = False,
        before_idat: bytes = b"", idat_chunk: int | None = None, after_idat: bytes = b"") -> bytes:
    """An all-zero PNG with any header: the data is valid and compresses about 1000:1."""
    bpp = _CHANNELS[color_type] * bit_depth

    def row_bytes(w: int) -> int:
        return (w * bpp + 7) // 8

    if interlace:
        raw = 0
        for x0, y0, dx, dy in _ADAM7:
            pw, ph = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
            if pw > 0 and ph > 0:
                raw += ph * (1 + row_bytes(pw))
    else:
        raw = height * (1 + row_bytes(width))
    data = _zero_zlib(raw)
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace)))
    plte = _chunk(b"PLTE", bytes(range(256)) * 3) if color_type == 3 else b""
    step = idat_chunk or len(data)
    idat = b"".join(_chunk(b"IDAT", data[i:i + step]) for i in range(0, len(data), step))
    return b"\x89PNG\r\n\x1a\n" + ihdr + plte + before_idat + idat + after_idat + _chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG header declaring ``width`` x ``height`` followed by a few bytes of pixels."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _apng(frames: int, side: int = 64) -> bytes:
    """An animated PNG with ``frames`` frames (each frame one fcTL + one fdAT chunk)."""
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * 3 * side for _ in range(side)), 9)
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)),
           _chunk(b"acTL", struct.pack(">II", frames, 0))]
    seq = 0
    for f in range(frames):
        out.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, side, side, 0, 0, 1, 10, 0, 0)))
        seq += 1
        if f == 0:
            out.append(_chunk(b"IDAT", raw))
        else:
            out.append(_chunk(b"fdAT", struct.pack(">I", seq) + raw))
            seq += 1
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


# --------------------------------------------------------------------------------- EXIF


def exif_block(orientation: int | None = None, entries: int | None = None, loop: bool = False) -> bytes:
    """A little-endian TIFF/EXIF block: an Orientation tag, or ``entries`` bogus entries that
    claim more data than there is, or an IFD whose next-IFD offset points at itself."""
    if entries is not None:
        body = struct.pack("<H", entries) + struct.pack("<HHII", 0x9999, 3, 1, 6) * min(entries, 5000)
        return b"II*\x00" + struct.pack("<I", 8) + body
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation or 1, 0)
    ifd += struct.pack("<I", 8 if loop else 0)  # next IFD: itself (a cycle) or none
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def _with_exif(fmt: str, exif: bytes, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buf, fmt, exif=b"Exif\x00\x00" + exif if fmt == "JPEG" else exif)
    return buf.getvalue()


# --------------------------------------------------------------------------------- JPEG


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def jpeg_many_scans(side: int, scans: int, mode: str = "RGB") -> bytes:
    """A valid progressive JPEG followed by ``scans`` empty DC-refinement scans: each costs the
    decoder a pass over every block while adding 10-14 bytes to the file."""
    base = _jpeg(Image.new(mode, (side, side), 128 if mode == "L" else (100, 50, 200)), progressive=True, quality=50)
    n = 1 if mode == "L" else 3
    hdr = bytes([n]) + b"".join(bytes([i + 1, 0]) for i in range(n)) + bytes([0, 0, 0x10])
    sos = b"\xff\xda" + (len(hdr) + 2).to_bytes(2, "big") + hdr
    return base[:-2] + sos * scans + b"\xff\xd9"


def jpeg_with_segments(count: int, marker: bytes = b"\xff\xfe", payload: bytes = b"") -> bytes:
    """A small JPEG with ``count`` extra segments (comments by default) before its frame."""
    base = _jpeg(Image.new("RGB", (32, 32), (10, 20, 30)))
    seg = marker + (len(payload) + 2).to_bytes(2, "big") + payload
    return base[:2] + seg * count + base[2:]


def jpeg_with_junk(junk: int) -> bytes:
    """A small JPEG with ``junk`` zero bytes between two header segments (decoders skip them)."""
    base = _jpeg(Image.new("RGB", (32, 32), (10, 20, 30)))
    app0_end = 4 + int.from_bytes(base[4:6], "big")
    return base[:app0_end] + b"\x00" * junk + base[app0_end:]


def jpeg_header(width: int, height: int) -> bytes:
    """A baseline JPEG whose frame header declares ``width`` x ``height`` (pixels then run out)."""
    base = _jpeg(Image.new("RGB", (16, 16), (10, 20, 30)))
    sof = base.index(b"\xff\xc0")
    return base[:sof + 5] + struct.pack(">HH", height, width) + base[sof + 9:]


def noise_jpeg(size: tuple[int, int], quality: int = 90, progressive: bool = False, seed: int = 0,
               subsampling: int = -1) -> bytes:
    """A JPEG of random pixels: the worst case for entropy decoding per byte."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _jpeg(Image.fromarray(arr), quality=quality, progressive=progressive, subsampling=subsampling)


# ------------------------------------------------------------------------ GIF, WebP, TIFF


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def animated(fmt: str, frames: int, side: int = 256) -> bytes:
    ims = [Image.new("RGB", (side, side), (i % 256, 0, 0)) for i in range(frames)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return _encoded(ims[0], fmt, save_all=True, append_images=ims[1:], duration=10, **kw)


def webp_header(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header declares ``width`` x ``height`` (the data is 8x8)."""
    data = bytearray(_encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "WEBP", lossless=True))
    pos = data.index(b"VP8L") + 8 + 1  # after the chunk header and the 0x2f signature
    bits = int.from_bytes(data[pos:pos + 4], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[pos:pos + 4] = bits.to_bytes(4, "little")
    return bytes(data)


# ------------------------------------------------------------------------------- corpus

Builder = Callable[[], bytes]


def _truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


CORPUS: dict[str, Builder] = {
    # extreme aspect ratios: the short side is upscaled to 256 px before the crop
    "PNG 1x12000": lambda: png(1, 12000),
    "PNG 12000x1": lambda: png(12000, 1),
    "JPEG 8x12000": lambda: _jpeg(Image.new("RGB", (8, 12000), (1, 2, 3))),
    "WebP 12000x2": lambda: _encoded(Image.new("RGB", (12000, 2), (1, 2, 3)), "WEBP", lossless=True),
    "GIF 1x12000": lambda: _encoded(Image.new("P", (1, 12000)), "GIF"),
    # declared dimensions beyond every limit
    "PNG header 100000x100000": lambda: png_header_only(100_000, 100_000),
    "PNG header 2^31-1 x 1": lambda: png_header_only(2**31 - 1, 1),
    "JPEG header 65500x65500": lambda: jpeg_header(65_500, 65_500),
    "WebP header 16383x16383": lambda: webp_header(16383, 16383),
    # pixel-count bombs just under the 40 MP limit, and expansion by mode
    "PNG 6300x6300 RGB zeros": lambda: png(6300, 6300),
    "PNG 5000x5000 RGBA 16-bit": lambda: png(5000, 5000, color_type=6, bit_depth=16),
    "PNG 6300x6300 grey 16-bit": lambda: png(6300, 6300, color_type=0, bit_depth=16),
    "PNG 6300x6300 palette": lambda: png(6300, 6300, color_type=3),
    "PNG 6300x6300 1-bit": lambda: png(6300, 6300, color_type=0, bit_depth=1),
    "PNG 6300x6300 interlaced": lambda: png(6300, 6300, interlace=True),
    "PNG 4000x4000 in 1-byte IDAT chunks": lambda: png(4000, 4000, idat_chunk=1),
    "WebP 5000x5000 lossless": lambda: _encoded(Image.new("RGB", (5000, 5000), (9, 9, 9)), "WEBP", lossless=True),
    "JPEG 5000x5000 progressive 4:4:4": lambda: _jpeg(Image.new("RGB", (5000, 5000), (1, 2, 3)), progressive=True,
                                                      subsampling=0),
    "JPEG 6300x6300 CMYK": lambda: _jpeg(Image.new("CMYK", (6300, 6300), (1, 2, 3, 4))),
    # the heaviest inputs each limit still admits
    "PNG 5600x5600 RGB (just under the memory budget)": lambda: png(5600, 5600),
    "PNG 5600x5600 interlaced": lambda: png(5600, 5600, interlace=True),
    "PNG 5000x5000 grey": lambda: png(5000, 5000, color_type=0),
    "WebP 2800x2800 lossless": lambda: _encoded(Image.new("RGB", (2800, 2800), (9, 9, 9)), "WEBP", lossless=True),
    "JPEG 7000x5500 progressive 4:2:0": lambda: _jpeg(Image.new("RGB", (7000, 5500), (1, 2, 3)), progressive=True),
    "JPEG 4000x4000, 99 empty scans": lambda: jpeg_many_scans(4000, 90),
    # work per byte
    "JPEG 4000x4000, 20000 empty scans": lambda: jpeg_many_scans(4000, 20_000),
    "JPEG 2000x2000 grey, 30000 empty scans": lambda: jpeg_many_scans(2000, 30_000, "L"),
    "JPEG 2 million empty comments": lambda: jpeg_with_segments(2_000_000),
    "JPEG 300 64-KB APP1 segments": lambda: jpeg_with_segments(300, b"\xff\xe1", b"\x00" * 65_000),
    "JPEG 15 MB of junk between segments": lambda: jpeg_with_junk(15_000_000),
    "PNG 1.5 million private chunks": lambda: png(16, 16, before_idat=_chunk(b"prVt", b"") * 1_500_000),
    "PNG zTXt bomb": lambda: png(16, 16, before_idat=_chunk(b"zTXt", b"k\x00\x00" + _zero_zlib(50_000_000))),
    "PNG iCCP bomb": lambda: png(16, 16, before_idat=_chunk(b"iCCP", b"p\x00\x00" + _zero_zlib(50_000_000))),
    "APNG 20000 frames": lambda: _apng(20_000),
    "WebP 500 frames": lambda: animated("WEBP", 500, 64),
    "GIF 500 frames": lambda: animated("GIF", 500, 64),
    "TIFF 2000x2000 deflate": lambda: _encoded(Image.new("RGB", (2000, 2000)), "TIFF",
                                               compression="tiff_adobe_deflate"),
    # heaviest legitimate content under the byte limit
    "JPEG 11 MB of noise (3000x3000, q95)": lambda: noise_jpeg((3000, 3000), quality=95),
    "JPEG 19 MB progressive noise (4000x4000, q95)": lambda: noise_jpeg((4000, 4000), quality=95, progressive=True),
    # malformed EXIF and orientation
    "JPEG EXIF orientation 9": lambda: _with_exif("JPEG", exif_block(9)),
    "JPEG EXIF orientation 0": lambda: _with_exif("JPEG", exif_block(0)),
    "JPEG EXIF IFD cycle": lambda: _with_exif("JPEG", exif_block(6, loop=True)),
    "JPEG EXIF 65535 entries declared": lambda: _with_exif("JPEG", exif_block(entries=65_535)),
    "PNG eXIf 65535 entries": lambda: png(96, 64, before_idat=_chunk(b"eXIf", exif_block(entries=65_535))),
    "WebP EXIF orientation 6": lambda: _with_exif("WEBP", exif_block(6)),
    # truncation
    "JPEG truncated": lambda: _truncated(noise_jpeg((640, 480), seed=3)),
    "JPEG progressive truncated": lambda: _truncated(noise_jpeg((640, 480), progressive=True, seed=3)),
    "PNG truncated": lambda: _truncated(png(2000, 2000), 0.6),
    "WebP truncated": lambda: _truncated(_encoded(Image.new("RGB", (640, 480), (1, 2, 3)), "WEBP")),
}


@functools.cache
def hostile_corpus() -> dict[str, bytes]:
    """name -> bytes for every entry of CORPUS (built once per process: about 10 s)."""
    return {name: build() for name, build in CORPUS.items()}


# ------------------------------------------------------------------ measuring decode cost


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one input to a CNN tensor cost, measured in a child process."""

    name: str
    size_bytes: int
    outcome: str
    """"decoded", "refused: <message>", "error: <type: message>" or "killed after N s"."""
    cpu_s: float
    wall_s: float
    peak_mb: float
    """Peak resident memory above the child's resident memory just before this decode."""

    @property
    def refused(self) -> bool:
        return self.outcome.startswith("refused")


_CHILD = r"""
import gc, json, sys, time
from catcascade.cnn_stage.preprocessing import DecodeLimits, InvalidImageError, PreprocessConfig, load_and_preprocess

args = json.loads(sys.argv[1])
cfg = PreprocessConfig(image_size=args["image_size"], limits=DecodeLimits(**args["limits"]))  # noqa

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0

from PIL import Image
import ctypes, io
try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim  # hand freed heap back, so reuse does not hide a peak
except (OSError, AttributeError):
    trim = lambda _pad: 0
warm = io.BytesIO(); Image.new("RGB", (64, 64)).save(warm, "JPEG")
load_and_preprocess(warm.getvalue(), cfg)
for path in args["paths"]:
    data = open(path, "rb").read()
    gc.collect()
    trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    t, w = time.process_time(), time.perf_counter()
    try:
        load_and_preprocess(data, cfg)
        outcome = "decoded"
    except InvalidImageError as e:
        outcome = "refused: " + str(e)
    except Exception as e:
        outcome = f"error: {type(e).__name__}: {e}"
    cpu, wall = time.process_time() - t, time.perf_counter() - w
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "peak_mb": status("VmHWM:") - base, "outcome": outcome}),
          flush=True)
"""


def measure_decode_costs(corpus: dict[str, bytes], image_size: int = 224, limits=None,
                         timeout_s: float = 60.0, progress: Callable[[DecodeCost], None] | None = None,
                         code_dir: str | None = None) -> list[DecodeCost]:
    """Decodes every input with ``load_and_preprocess`` in a child process (one after the
    other, the peak RSS reset before each through /proc/self/clear_refs: Linux only) and
    returns CPU time, wall time and peak memory per input. An input that runs past
    ``timeout_s`` is recorded as killed and the child restarted after it. ``code_dir`` runs
    another checkout's decoder (an earlier commit, for before/after figures)."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    limit_fields = dataclasses.asdict(limits) if limits is not None else {}
    repo = code_dir or str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    names = list(corpus)
    results: list[DecodeCost] = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        paths = []
        for i, name in enumerate(names):
            p = Path(tmp) / f"{i:03d}.bin"
            p.write_bytes(corpus[name])
            paths.append(str(p))
        while len(results) < len(names):
            start = len(results)
            arg = json.dumps({"paths": paths[start:], "image_size": image_size, "limits": limit_fields})
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, arg], stdout=subprocess.PIPE, text=True,
                                    cwd=repo, env=env)
            import threading

            timer = None
            try:
                while len(results) < len(names):
                    fired = threading.Event()
                    timer = threading.Timer(timeout_s, lambda: (fired.set(), proc.kill()))
                    timer.start()
                    line = proc.stdout.readline()
                    timer.cancel()
                    name = names[len(results)]
                    if not line:
                        why = f"killed after {timeout_s:.0f} s" if fired.is_set() else f"child died ({proc.wait()})"
                        cost = DecodeCost(name, len(corpus[name]), why, float("nan"), float("nan"), float("nan"))
                        results.append(cost)
                        if progress:
                            progress(cost)
                        break
                    r = json.loads(line)
                    cost = DecodeCost(name, len(corpus[name]), r["outcome"], r["cpu_s"], r["wall_s"], r["peak_mb"])
                    results.append(cost)
                    if progress:
                        progress(cost)
            finally:
                if timer is not None:
                    timer.cancel()
                proc.kill()
                proc.wait()
    return results


def costs_table(costs: list[DecodeCost]) -> str:
    rows = ["| input | bytes | outcome | CPU s | peak MB |", "| --- | ---: | --- | ---: | ---: |"]
    for c in costs:
        outcome = c.outcome if len(c.outcome) <= 90 else c.outcome[:87] + "..."
        rows.append(f"| {c.name} | {c.size_bytes:,} | {outcome} | {c.cpu_s:.3f} | {c.peak_mb:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="decode each input and print its cost")
    parser.add_argument("--write", metavar="DIR", help="write the corpus as files into DIR")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--code-dir", help="measure another checkout's decoder (e.g. `git archive` of a commit)")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    from pathlib import Path

    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for i, (name, data) in enumerate(hostile_corpus().items()):
            (out / f"{i:02d}-{name.replace(' ', '_').replace('/', '-')}.bin").write_bytes(data)
    if args.measure:
        measured = measure_decode_costs(hostile_corpus(), timeout_s=args.timeout, code_dir=args.code_dir,
                                        progress=lambda c: print(f"{c.cpu_s:7.3f} s {c.peak_mb:7.0f} MB  {c.name}: "
                                                                 f"{c.outcome[:100]}", flush=True))
        table = costs_table(measured)
        print(table)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(table + "\n")
