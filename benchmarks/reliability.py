"""Fault scenarios against the real servers, with what every request got back.

Used by tests/test_serving_reliability.py (small sizes) and run on its own to produce the
figures in docs/reliability.md:

    .venv/bin/python -m benchmarks.reliability --bundle artifacts/demo-bundle
"""
from __future__ import annotations

import argparse
import functools
import io
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class LoadOutcome:
    """Per status code counts, and escalation reasons among the answered requests."""

    sent: int = 0
    codes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    details: Counter = field(default_factory=Counter)

    @property
    def answered(self) -> int:
        return self.codes.get("OK", 0)

    def row(self, name: str) -> str:
        refused = ", ".join(f"{c} {n}" for c, n in sorted(self.codes.items()) if c != "OK") or "none"
        reasons = ", ".join(f"{r.lower()} {n}" for r, n in sorted(self.reasons.items()))
        return f"| {name} | {self.sent} | {self.answered} | {refused} | {reasons} |"


TABLE_HEADER = ("| scenario | sent | answered (OK) | refused, by status code | escalation reasons among answers |\n"
                "| --- | --- | --- | --- | --- |")


def random_jpegs(n: int, size=(160, 120), seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def run_load(target: str, images: list[bytes], n_requests: int, concurrency: int, mode: str = "always",
             timeout_s: float = 30.0, on_done=None, **client_kwargs) -> LoadOutcome:
    """A bounded closed loop: ``concurrency`` callers share ``n_requests`` requests. Each call
    is made once (no client retries, unless ``retry`` is passed): the counts are what the
    server answered, not what a retrying client eventually got."""
    import grpc

    from serving.api import cascade_pb2 as pb
    from serving.client import CatcascadeClient

    client_kwargs.setdefault("retry", None)
    outcome = LoadOutcome()
    lock = threading.Lock()
    counter = iter(range(n_requests))

    def worker():
        with CatcascadeClient(target, timeout_s=timeout_s, **client_kwargs) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    r = client.classify(images[i % len(images)], mode=mode, request_id=f"load-{i}")
                    code = "OK"
                    reason = pb.EscalationReason.Name(r.escalation_reason).removeprefix("ESCALATION_REASON_")
                except grpc.RpcError as e:
                    code, reason = e.code().name, None
                    with lock:
                        outcome.details[f"{code}: {e.details()[:80]}"] += 1
                with lock:
                    outcome.sent += 1
                    outcome.codes[code] += 1
                    if reason:
                        outcome.reasons[reason] += 1
                    done = outcome.sent
                if on_done:
                    on_done(done)

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return outcome


def vllm_killed_mid_run(target: str, vllm_server, n_requests: int = 120, concurrency: int = 4,
                        kill_after: int = 30) -> LoadOutcome:
    """ALWAYS-mode load; the vLLM server process group is killed after ``kill_after`` answers."""
    killed = threading.Event()

    def on_done(done: int) -> None:
        if done >= kill_after and not killed.is_set():
            killed.set()
            threading.Thread(target=vllm_server.stop, kwargs={"grace_s": 0.0}, daemon=True).start()

    return run_load(target, random_jpegs(16), n_requests, concurrency, "always", on_done=on_done)


@functools.lru_cache(maxsize=1)
def bad_inputs() -> dict[str, bytes]:
    """The corpus of hostile or broken payloads every server must answer with INVALID_ARGUMENT."""
    import struct
    import zlib

    def png_header(w: int, h: int) -> bytes:
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * w + 1) * 8)) + chunk(b"IEND", b""))

    def encoded(fmt: str, size=(64, 48)) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
        return buf.getvalue()

    def bomb(side: int = 11_000) -> bytes:
        """A real side x side PNG of zeros: ~350 KB compressed, 363 MB decoded (under every
        per-side limit, so only the pixel budget stops it)."""
        comp, row = zlib.compressobj(9), b"\x00" * (side * 3 + 1)
        raw = b"".join(comp.compress(row * 500) for _ in range(side // 500)) + comp.compress(row * (side % 500))
        raw += comp.flush()

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", raw) + chunk(b"IEND", b""))

    jpeg = random_jpegs(1, (300, 200), seed=5)[0]
    return {
        "empty": b"",
        "text": b"GET / HTTP/1.1\r\nHost: cats\r\n\r\n",
        "truncated JPEG": jpeg[: len(jpeg) // 2],
        "JPEG header only": jpeg[:200],
        "PNG decompression bomb (11000x11000)": bomb(),
        "huge dimensions (100000x10 header)": png_header(100_000, 10),
        "unsupported format (GIF)": encoded("GIF"),
        "unsupported format (BMP)": encoded("BMP"),
        "unsupported format (TIFF)": encoded("TIFF"),
        "random bytes": np.random.default_rng(1).bytes(5000),
    }


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default="artifacts/demo-bundle")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="artifacts/reliability.md")


def main(args: argparse.Namespace) -> int:
    """Runs every fault scenario against freshly started real servers and prints the table."""
    from pathlib import Path

    from ensemble.bundle import load_bundle
    from serving.config import ServeConfig
    from serving.service_thread import ServiceThread
    from vlm_stage.vllm_server import VllmServer, VllmServerConfig

    bundle_dir = Path(args.bundle)
    if not (bundle_dir / "manifest.json").is_file():
        from training.demo_bundle import build_demo_bundle

        build_demo_bundle(bundle_dir)
    bundle = load_bundle(bundle_dir)
    vcfg = VllmServerConfig.for_bundle(bundle)
    rows = []
    with VllmServer(vcfg, log_path="artifacts/logs/vllm-reliability.log") as vllm:
        print("vLLM ready; running scenarios", flush=True)
        shed = ServiceThread(ServeConfig(bundle=bundle_dir, port=0, vlm={"urls": [vllm.url]},
                                            limits={"max_concurrent_escalations": 1})).start()
        rows.append(run_load(shed.target, random_jpegs(16), args.requests, args.concurrency, "always")
                    .row(f"VLM saturated: 1 escalation slot, {args.concurrency} callers, ALWAYS"))
        shed.stop()
        refuse = ServiceThread(ServeConfig(bundle=bundle_dir, port=0, vlm={"urls": [vllm.url]},
                                              limits={"max_concurrent_escalations": 1, "max_inflight_requests": 4},
                                              batching={"max_queue_size": 4})).start()
        rows.append(run_load(refuse.target, random_jpegs(16), args.requests, 32, "always")
                    .row("overload: 32 callers, 4 requests in flight allowed, ALWAYS"))
        refuse.stop()
        server = ServiceThread(ServeConfig(bundle=bundle_dir, port=0, vlm={"urls": [vllm.url]},
                                              breaker={"cooldown_s": 1.0})).start()
        from serving.client import CatcascadeClient

        bad = LoadOutcome()
        import grpc
        with CatcascadeClient(server.target) as client:
            for name, payload in bad_inputs().items():
                bad.sent += 1
                try:
                    client.classify(payload, mode="never")
                    bad.codes["OK"] += 1
                except grpc.RpcError as e:
                    bad.codes[e.code().name] += 1
        rows.append(bad.row(f"bad inputs ({len(bad_inputs())} kinds)"))
        rows.append(vllm_killed_mid_run(server.target, vllm, args.requests, args.concurrency, args.requests // 4)
                    .row(f"vLLM killed after {args.requests // 4} answers, ALWAYS"))
        server.stop()
    table = TABLE_HEADER + "\n" + "\n".join(rows)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_cli_args(p)
    raise SystemExit(main(p.parse_args()))
