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
    """A bounded closed loop: ``concurrency`` callers share ``n_requests`` requests."""
    import grpc

    from serving.api import cascade_pb2 as pb
    from serving.client import CatcascadeClient

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
    parser.add_argument("--photos", help="folder of real JPEGs for the decode-speed comparison (optional)")
    parser.add_argument("--part", choices=["all", "vlm", "input"], default="all",
                        help="input: only the decode-bomb, abandoned-decode and auth-edge scenarios (no vLLM)")


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
    if args.part in ("all", "input"):
        print(run_input_edge_scenarios(str(bundle_dir), str(Path(args.out).with_name("reliability-input.md")),
                                       args.photos))
        if args.part == "input":
            return 0
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



# ----------------------------------------------------------------------------------------------
# Input and edge scenarios (issue #11, points 4, 7, 8, 9): decode bombs, abandoned decode work,
# auth edges. Each runs the service as its own process (`catcascade serve`), so the RSS figures
# are the server's alone.


class ServerProcess:
    """``python -m catcascade serve --config`` in a child process, for RSS measurements."""

    def __init__(self, config: dict, env: dict | None = None, startup_s: float = 300.0):
        import os
        import re
        import subprocess
        import sys
        import tempfile

        import yaml

        self._cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="catcascade-", delete=False)
        yaml.safe_dump({"port": 0, **config}, self._cfg)
        self._cfg.close()
        repo = str(__import__("pathlib").Path(__file__).resolve().parents[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "catcascade", "serve", "--config", self._cfg.name],
                                     cwd=repo, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        found = threading.Event()
        self.port = None
        self.metrics_url = None

        def read():
            for line in self.proc.stdout:
                if m := re.search(r"metrics on (\S+/metrics)", line):
                    self.metrics_url = m.group(1)
                m = re.search(r"serving on [^:]+:(\d+)", line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(startup_s):
            self.stop()
            raise RuntimeError("catcascade serve did not start")
        self.target = f"127.0.0.1:{self.port}"

    def status_mb(self, key: str = "VmRSS") -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def metric(self, name: str, labels: dict | None = None) -> float:
        """One sample from the server's /metrics (needs ``metrics_port`` in the config)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self._cfg.name)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ms_summary(values: list[float]) -> str:
    if not values:
        return "-"
    v = np.sort(np.asarray(values) * 1000.0)
    return f"{np.percentile(v, 50):.1f} / {np.percentile(v, 95):.1f} / {v[-1]:.1f}"


@dataclass
class EdgeOutcome:
    """Counts by status code, latencies of refusals and answers, server RSS around the run."""

    sent: int = 0
    codes: Counter = field(default_factory=Counter)
    refusal_s: list = field(default_factory=list)
    answer_s: list = field(default_factory=list)
    rss_before: float = 0.0
    rss_after: float = 0.0
    rss_peak: float = 0.0
    notes: str = ""

    def row(self, name: str) -> str:
        codes = ", ".join(f"{c} {n}" for c, n in sorted(self.codes.items()))
        return (f"| {name} | {self.sent} | {codes} | {_ms_summary(self.refusal_s)} | {_ms_summary(self.answer_s)} | "
                f"{self.rss_before:.0f} -> {self.rss_after:.0f} (peak {self.rss_peak:.0f}) | {self.notes} |")


EDGE_TABLE_HEADER = ("| scenario | sent | status codes | refusal ms p50 / p95 / max | answer ms p50 / p95 / max "
                     "| server RSS MB before -> after (peak) | notes |\n| --- | --- | --- | --- | --- | --- | --- |")


def _send_all(target: str, payloads: list[tuple[str, bytes]], concurrency: int, timeout_s: float = 120.0,
              metadata=None, outcome: EdgeOutcome | None = None) -> EdgeOutcome:
    """Sends each payload once (CNN only), ``concurrency`` at a time; records codes and latencies."""
    import time

    import grpc

    from serving.api import cascade_pb2 as pb
    from serving.api import cascade_pb2_grpc as pb_grpc

    out = outcome or EdgeOutcome()
    lock = threading.Lock()
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.CatClassifierStub(channel)

        def one(item):
            name, data = item
            t = time.perf_counter()
            try:
                stub.Classify(pb.ClassifyRequest(image=data, escalation=pb.ESCALATION_MODE_NEVER),
                              timeout=timeout_s, metadata=metadata)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            dt = time.perf_counter() - t
            with lock:
                out.sent += 1
                out.codes[code] += 1
                (out.answer_s if code == "OK" else out.refusal_s).append(dt)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, payloads))
    return out


def _normal_requests(target: str, n: int = 20) -> list[float]:
    import time

    from serving.client import CatcascadeClient

    images = random_jpegs(4, (500, 375), seed=11)
    times = []
    with CatcascadeClient(target, timeout_s=60) as c:
        for i in range(n):
            t = time.perf_counter()
            c.classify(images[i % len(images)], mode="never")
            times.append(time.perf_counter() - t)
    return times


def decode_bombs(bundle: str, rounds: int = 2, concurrency: int = 4, memory: dict | None = None) -> EdgeOutcome:
    """The hostile-image corpus, ``rounds`` times at ``concurrency``, against a CNN-only server;
    server RSS after 20 normal requests before, and 3 s plus 20 normal requests after."""
    import time

    from benchmarks.hostile_images import hostile_corpus

    payloads = list(hostile_corpus().items()) * rounds
    cfg = {"bundle": bundle, **({"memory": memory} if memory is not None else {})}
    with ServerProcess(cfg) as server:
        _normal_requests(server.target)
        before = _normal_requests(server.target)
        out = EdgeOutcome(rss_before=server.status_mb())
        _send_all(server.target, payloads, concurrency, outcome=out)
        time.sleep(3)
        after = _normal_requests(server.target)
        out.rss_after, out.rss_peak = server.status_mb(), server.status_mb("VmHWM")
        out.notes = (f"normal 500x375 JPEG p50 {np.median(before) * 1000:.1f} ms before, "
                     f"{np.median(after) * 1000:.1f} ms after")
    return out


def abandoned_decodes(bundle: str, n: int = 64, deadline_s: float = 0.2) -> EdgeOutcome:
    """``n`` heavy admitted images (5600x5600 PNG, ~0.4 s of decode each) sent at once with a
    ``deadline_s`` deadline: their unstarted decode jobs must be dropped, and a normal request
    right after must not wait behind them."""
    from benchmarks.hostile_images import png

    heavy = png(5600, 5600)
    with ServerProcess({"bundle": bundle, "metrics_port": 0}) as server:
        idle = _normal_requests(server.target)
        out = EdgeOutcome(rss_before=server.status_mb())
        started = server.metric("catcascade_decodes_started_total")
        _send_all(server.target, [("heavy", heavy)] * n, concurrency=n, timeout_s=deadline_s, outcome=out)
        heavy_started = server.metric("catcascade_decodes_started_total") - started
        first_after = _normal_requests(server.target, 1)[0]
        skipped = server.metric("catcascade_decodes_skipped_total")
        cancelled = server.metric("catcascade_decodes_skipped_total", {"why": "cancelled"})
        out.rss_after, out.rss_peak = server.status_mb(), server.status_mb("VmHWM")
        out.notes = (f"heavy decodes started: {heavy_started:.0f} of {n}; dropped unstarted: {skipped:.0f} "
                     f"({cancelled:.0f} cancelled with their call, {skipped - cancelled:.0f} past their deadline); "
                     f"first normal request after the burst: {first_after * 1000:.0f} ms (idle p50 "
                     f"{np.median(idle) * 1000:.0f} ms)")
    return out


def auth_edges(bundle: str, repeats: int = 50) -> tuple[EdgeOutcome, dict]:
    """A server with tokens from the environment (``" tok-a , tok-b "``): valid tokens with
    the scheme in three cases, a token with a space inside, another scheme, no token, a
    wrong token; ``repeats`` of each. Returns the outcome and codes per case."""
    env_name = "CATCASCADE_BENCH_TOKENS"
    cases = {
        "Bearer tok-b": "OK", "bearer tok-a": "OK", "BEARER tok-b": "OK",
        "Bearer tok-a, tok-b": "UNAUTHENTICATED", "Basic tok-a": "UNAUTHENTICATED",
        "Bearer tok-c": "UNAUTHENTICATED", None: "UNAUTHENTICATED",
    }
    per_case = {}
    out = EdgeOutcome()
    image = random_jpegs(1, (320, 240), seed=2)[0]
    with ServerProcess({"bundle": bundle, "auth": {"bearer_tokens_env": env_name}, "metrics_port": 0},
                       env={env_name: " tok-a , tok-b "}) as server:
        _normal_requests_with_token(server.target)
        out.rss_before = server.status_mb()
        for value, _expected in cases.items():
            case = EdgeOutcome()
            md = (("authorization", value),) if value else None
            _send_all(server.target, [("img", image)] * repeats, concurrency=4, metadata=md, outcome=case)
            per_case[value or "(no token)"] = dict(case.codes)
            out.sent += case.sent
            out.codes.update(case.codes)
            out.refusal_s += case.refusal_s
            out.answer_s += case.answer_s
        out.rss_after, out.rss_peak = server.status_mb(), server.status_mb("VmHWM")
        counted = server.metric("catcascade_unauthenticated_total")
        per_case["catcascade_unauthenticated_total"] = {"counted": int(counted)}
    return out, per_case


def _normal_requests_with_token(target: str) -> None:
    from serving.client import CatcascadeClient

    with CatcascadeClient(target, timeout_s=60, token="tok-a") as c:
        for img in random_jpegs(5, seed=1):
            c.classify(img, mode="never")


_DECODE_SPEED_CHILD = r"""
import json, sys, time
from pathlib import Path
from cnn_stage.native_memory import tune_malloc
if sys.argv[1] == "on":
    tune_malloc(2, 1024)
from cnn_stage.preprocessing import PreprocessConfig, load_and_preprocess
from benchmarks.hostile_images import png
cfg = PreprocessConfig()
photos = [p.read_bytes() for p in sorted(Path(sys.argv[2]).rglob("*.jpg"))] if sys.argv[2] else []
out = {}
for name, images, reps in (("real photos", photos, 3), ("PNG 3000x2000", [png(3000, 2000)], 10),
                           ("PNG 5600x5600", [png(5600, 5600)], 4)):
    if not images:
        continue
    for d in images:
        load_and_preprocess(d, cfg)
    t = time.process_time()
    for _ in range(reps):
        for d in images:
            load_and_preprocess(d, cfg)
    out[name] = 1000.0 * (time.process_time() - t) / (reps * len(images))
print(json.dumps(out))
"""


def decode_cpu_with_memory_settings(photos_dir: str | None, repeats: int = 3) -> str:
    """CPU milliseconds per decode + preprocess with the memory settings off and on (fresh
    processes, alternated ``repeats`` times; the median is reported): what the fixed mmap
    threshold costs in page faults."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(repeats):
        for setting in ("off", "on"):
            p = subprocess.run([sys.executable, "-c", _DECODE_SPEED_CHILD, setting, photos_dir or ""], cwd=repo,
                               env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = ["| input | CPU ms per image, memory settings off | on | on / off |", "| --- | ---: | ---: | ---: |"]
    for name in runs["off"][0]:
        off = float(np.median([r[name] for r in runs["off"]]))
        on = float(np.median([r[name] for r in runs["on"]]))
        rows.append(f"| {name} | {off:.2f} | {on:.2f} | {on / off:.2f} |")
    return "\n".join(rows)


def run_input_edge_scenarios(bundle: str, out_path: str | None = None, photos_dir: str | None = None) -> str:
    """Runs the input/edge scenarios and returns their markdown table (also written to
    ``out_path``)."""
    from pathlib import Path

    rows = []
    off = {"malloc_arena_max": None, "malloc_mmap_threshold_kb": None, "trim_after_decode_ms": None}
    for label, memory in (("memory settings off (glibc defaults)", off),
                          ("only malloc_trim after slow decodes", {**off, "trim_after_decode_ms": 100}),
                          ("only 2 malloc arenas", {**off, "malloc_arena_max": 2}),
                          ("only a fixed 1 MB mmap threshold", {**off, "malloc_mmap_threshold_kb": 1024}),
                          ("memory settings on (the default: all three)", None)):
        o = decode_bombs(bundle, memory=memory)
        rows.append(o.row(f"decode bombs: hostile corpus x2, 4 callers; {label}"))
        print(rows[-1], flush=True)
    o = abandoned_decodes(bundle)
    rows.append(o.row("64 heavy images at once, 0.2 s deadline"))
    print(rows[-1], flush=True)
    o, per_case = auth_edges(bundle)
    cases = "; ".join(f"`{k}`: {', '.join(f'{c} {n}' for c, n in v.items())}" for k, v in per_case.items())
    o.notes = cases
    rows.append(o.row("auth edges: tokens ' tok-a , tok-b ' from the environment, 7 header forms x50"))
    print(rows[-1], flush=True)
    table = EDGE_TABLE_HEADER + "\n" + "\n".join(rows)
    speed = decode_cpu_with_memory_settings(photos_dir)
    print(speed, flush=True)
    table += "\n\n" + speed
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(table + "\n")
    return table


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_cli_args(p)
    raise SystemExit(main(p.parse_args()))
