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
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    """Client-side latency of every call, by status code (filled by the hardening scenarios)."""
    rss_mb: tuple[float, float] | None = None
    """Resident memory of the process serving, before and after the scenario."""
    wall_s: float = 0.0
    """From the first call sent to the last one ended (bursts)."""
    notes: list[str] = field(default_factory=list)

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
    import time

    import grpc

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.client import CatcascadeClient

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
                t0 = time.perf_counter()
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
                    outcome.latencies_ms.setdefault(code, []).append((time.perf_counter() - t0) * 1000.0)
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
    """ALWAYS-mode load; the vLLM server process group is killed after ``kill_after`` answers.
    The caller that got the ``kill_after``-th answer kills it before its next call (from a
    thread of its own, the kill came after all the load had been answered on a busy machine)."""
    killed = threading.Event()

    def on_done(done: int) -> None:
        if done >= kill_after and not killed.is_set():
            killed.set()
            vllm_server.stop(grace_s=0.0)

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



# ---------------------------------------------------------------------------------------------
# Serving-core hardening (issue #11, points 1, 2, 3, 5, 6): the breaker's probe, a hung vLLM,
# stream deadlines and orphaned streams, overload bursts with deadlines. Each scenario returns a
# LoadOutcome with counts by status code, client-side latencies by code and the RSS of the
# process that serves (the benchmark's own: the servers run in ServiceThreads).

HARDENING_HEADER = ("| scenario | sent | by status code | escalation reasons among answers | refusals p50 / p99 ms "
                    "| answers p50 / p99 ms | RSS before -> after MB |\n| --- | --- | --- | --- | --- | --- | --- |")


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _p50_p99(values: list[float]) -> str:
    return f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f}" if values else "-"


def hardening_row(name: str, o: LoadOutcome) -> str:
    codes = ", ".join(f"{c} {n}" for c, n in sorted(o.codes.items()))
    reasons = ", ".join(f"{r.lower()} {n}" for r, n in sorted(o.reasons.items())) or "-"
    refusals = o.latencies_ms.get("RESOURCE_EXHAUSTED", [])
    rss = f"{o.rss_mb[0]:.0f} -> {o.rss_mb[1]:.0f}" if o.rss_mb else "-"
    return (f"| {name} | {o.sent} | {codes} | {reasons} | {_p50_p99(refusals)} | "
            f"{_p50_p99(o.latencies_ms.get('OK', []))} | {rss} |")


def _record(outcome: LoadOutcome, lock: threading.Lock, code: str, reason: str | None, ms: float,
            detail: str | None = None) -> None:
    with lock:
        outcome.sent += 1
        outcome.codes[code] += 1
        outcome.latencies_ms.setdefault(code, []).append(ms)
        if reason:
            outcome.reasons[reason] += 1
        if detail:
            outcome.details[f"{code}: {detail[:80]}"] += 1


def _reason_name(r) -> str:
    from catcascade.serving.api import cascade_pb2 as pb

    return pb.EscalationReason.Name(r.escalation_reason).removeprefix("ESCALATION_REASON_")


def burst(target: str, images: list[bytes], n: int, deadline_s: float | None, mode: str = "never",
          rate: float | None = None) -> LoadOutcome:
    """``n`` calls from one asyncio client, each with a ``deadline_s`` deadline: all at once,
    or open loop at ``rate`` calls per second (call i starts at i / rate, whatever the
    answers); every call's status code and latency."""
    import asyncio
    import time

    import grpc

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
    
    outcome, lock = LoadOutcome(), threading.Lock()
    requests = [pb.ClassifyRequest(image=images[i % len(images)], escalation=pb.EscalationMode.Value(f"ESCALATION_MODE_{mode.upper()}"), request_id=f"burst-{i}")
                for i in range(n)]

    async def main():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CatClassifierStub(channel)
            await channel.channel_ready()
            start = time.perf_counter()

            async def one(i, req):
                if rate:
                    await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                t0 = time.perf_counter()
                try:
                    r = await stub.Classify(req, timeout=deadline_s)
                    _record(outcome, lock, "OK", _reason_name(r), (time.perf_counter() - t0) * 1000.0)
                except grpc.aio.AioRpcError as e:
                    _record(outcome, lock, e.code().name, None, (time.perf_counter() - t0) * 1000.0, e.details())

            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
            outcome.wall_s = time.perf_counter() - start

    before = rss_mb()
    asyncio.run(main())
    outcome.rss_mb = (before, rss_mb())
    return outcome


def burst_in_subprocess(target: str, n: int, deadline_s: float | None, mode: str = "never",
                        rate: float | None = None, n_images: int = 32) -> LoadOutcome:
    """``burst`` from a separate Python process, so the client does not share the serving
    process's GIL and event loops (the servers here run in-process); ``rss_mb`` is this
    (serving) process's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    args = json.dumps({"target": target, "n": n, "deadline_s": deadline_s, "mode": mode, "rate": rate,
                       "n_images": n_images})
    before = rss_mb()
    proc = subprocess.run([sys.executable, "-c", "from benchmarks.reliability import _burst_process; _burst_process()",
                           args], capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"burst client failed: {proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    out = LoadOutcome(sent=data["sent"], codes=Counter(data["codes"]), reasons=Counter(data["reasons"]),
                      details=Counter(data["details"]), latencies_ms=data["latencies_ms"], wall_s=data["wall_s"])
    out.rss_mb = (before, rss_mb())
    return out


def _burst_process() -> None:
    import json
    import sys

    a = json.loads(sys.argv[1])
    o = burst(a["target"], random_jpegs(a["n_images"]), a["n"], a["deadline_s"], a["mode"], a["rate"])
    print(json.dumps({"sent": o.sent, "codes": o.codes, "reasons": o.reasons, "details": o.details,
                      "latencies_ms": o.latencies_ms, "wall_s": o.wall_s}))


def timed_load(target: str, images: list[bytes], seconds: float, concurrency: int, mode: str = "never",
               timeout_s: float | None = 30.0, stop: threading.Event | None = None,
               stamps: list[tuple[float, str]] | None = None) -> LoadOutcome:
    """A closed loop for ``seconds`` (or until ``stop``): every call's code and latency; with
    ``stamps``, (end time, code or reason) of each call, for per-phase throughput."""
    import time

    import grpc

    from catcascade.client import CatcascadeClient

    outcome, lock = LoadOutcome(), threading.Lock()
    end = time.monotonic() + seconds
    stop = stop or threading.Event()

    def worker(w: int):
        with CatcascadeClient(target, timeout_s=timeout_s, retry=None) as client:
            i = 0
            while time.monotonic() < end and not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.classify(images[(w + i) % len(images)], mode=mode, request_id=f"t{w}-{i}")
                    code, reason, detail = "OK", _reason_name(r), None
                except grpc.RpcError as e:
                    code, reason, detail = e.code().name, None, e.details()
                _record(outcome, lock, code, reason, (time.perf_counter() - t0) * 1000.0, detail)
                if stamps is not None:
                    with lock:
                        stamps.append((time.monotonic(), reason or code))
                i += 1

    before = rss_mb()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker, w) for w in range(concurrency)]:
            f.result()
    outcome.rss_mb = (before, rss_mb())
    return outcome


def measure_capacity(target: str, mode: str = "never", n: int = 240) -> float:
    """Answers per second the server gives under saturation: ``n`` calls at once without
    deadlines from another process (what the intake, decode, CNN and VLM stages allow)."""
    probe = burst_in_subprocess(target, n, None, mode)
    return probe.codes.get("OK", 0) / max(probe.wall_s, 1e-9)


def overload_burst(target: str, factor: float = 4.0, deadline_s: float = 1.0, mode: str = "never",
                   burst_s: float | None = 2.0) -> LoadOutcome:
    """Measures the server's capacity C (``measure_capacity``), then sends ``factor`` x C
    calls per second for ``burst_s`` seconds (open loop), or with ``burst_s`` None
    ``factor`` x C x ``deadline_s`` calls at the same instant, each with a ``deadline_s``
    deadline, from a separate process."""
    capacity = measure_capacity(target, mode)
    if burst_s:
        n, rate = max(8, int(factor * capacity * burst_s)), factor * capacity
        how = f"{rate:.0f} calls/s for {burst_s:g} s"
    else:
        n, rate = max(8, int(factor * capacity * deadline_s)), None
        how = f"{n} calls at once"
    outcome = burst_in_subprocess(target, n, deadline_s, mode, rate)
    outcome.notes.append(f"capacity {capacity:.0f} answers/s (240 calls at once, no deadline); {how} = "
                         f"{factor:g}x capacity, {deadline_s:g} s deadlines")
    return outcome


def health_status(target: str, service: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def wait_for(predicate, timeout_s: float, period_s: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` held, polling; None if it did not within ``timeout_s``."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(period_s)
    return None


def hung_vllm(target: str, vllm_server, seconds_before: float = 4.0, seconds_hung: float = 12.0,
              concurrency: int = 8, deadline_s: float = 1.0, seconds_after: float = 12.0) -> LoadOutcome:
    """ALWAYS-mode load with ``deadline_s`` client deadlines; vLLM is frozen (SIGSTOP) for
    ``seconds_hung``, then thawed. Notes: how long until the VLM's health read NOT_SERVING,
    answers per second before and during the hang, how long until it read SERVING again."""
    import time

    from catcascade.serving.server import VLM_HEALTH_NAME

    stamps: list[tuple[float, str]] = []
    stop = threading.Event()
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(out=timed_load(
        target, random_jpegs(16), 3600, concurrency, "always", deadline_s, stop, stamps)), daemon=True)
    loader.start()
    time.sleep(seconds_before)
    with vllm_server.paused():
        t_pause = time.monotonic()
        detected = wait_for(lambda: health_status(target, VLM_HEALTH_NAME) == "NOT_SERVING", seconds_hung, 0.1)
        flips = []  # after detection: does health stay NOT_SERVING while vLLM stays frozen?
        while time.monotonic() - t_pause < seconds_hung:
            flips.append(health_status(target, VLM_HEALTH_NAME))
            time.sleep(0.2)
        t_thaw = time.monotonic()
    recovered = wait_for(lambda: health_status(target, VLM_HEALTH_NAME) == "SERVING", seconds_after + 30, 0.1)
    time.sleep(max(0.0, seconds_after - (recovered or 0.0)))
    stop.set()
    loader.join(120)
    out: LoadOutcome = result["out"]

    def rate(t0: float, t1: float) -> float:
        return sum(1 for t, _ in stamps if t0 <= t < t1) / max(1e-9, t1 - t0)

    t_start = min(t for t, _ in stamps) if stamps else t_pause
    after_detect = t_pause + (detected if detected is not None else seconds_hung)
    out.notes.append(
        f"VLM health NOT_SERVING {detected:.1f} s after the freeze" if detected is not None
        else f"VLM health never read NOT_SERVING during the {seconds_hung:g} s freeze")
    out.notes.append(f"health samples during the freeze after detection: "
                     f"{sum(1 for f in flips if f == 'SERVING')} SERVING of {len(flips)}")
    if detected is not None:
        out.notes.append(f"answers per second: {rate(t_start, t_pause):.1f} before the freeze, "
                         f"{rate(t_pause, after_detect):.1f} until detected, {rate(after_detect, t_thaw):.1f} "
                         "after detection while frozen")
    else:
        out.notes.append(f"answers per second: {rate(t_start, t_pause):.1f} before the freeze, "
                         f"{rate(t_pause, t_thaw):.1f} while frozen (never detected)")
    out.notes.append(f"VLM health SERVING again {recovered:.1f} s after the thaw" if recovered is not None
                     else "VLM health did not read SERVING again")
    return out


def cancelled_probe(server, vllm_server, call_budget_s: float) -> LoadOutcome:
    """The breaker's half-open probe is a user request (no watchdog) that its client cancels
    while vLLM is frozen; vLLM is thawed and the next escalations must go through again.
    ``server`` is a ServiceThread with breaker.health_period_s 0 and failure_threshold 1."""
    import time

    import grpc

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
    from catcascade.serving.circuit_breaker import BreakerState
    from catcascade.client import CatcascadeClient

    outcome, lock = LoadOutcome(), threading.Lock()
    b = server.servicer.front_door.router.live_engine().breaker

    def state():
        return server.on_loop(lambda: b.state)

    def probing():
        return server.on_loop(lambda: b.probe_in_flight)

    img = random_jpegs(1, seed=3)[0]
    before = rss_mb()

    def call(client, timeout=None):
        t0 = time.perf_counter()
        try:
            r = client.classify(img, mode="always")
            _record(outcome, lock, "OK", _reason_name(r), (time.perf_counter() - t0) * 1000.0)
            return r
        except grpc.RpcError as e:
            _record(outcome, lock, e.code().name, None, (time.perf_counter() - t0) * 1000.0, e.details())

    with CatcascadeClient(server.target, timeout_s=60, retry=None) as client:
        with vllm_server.paused():
            call(client)  # fails after the server's budget: the breaker opens
            assert state() != BreakerState.CLOSED, "the breaker did not open"
            wait_for(lambda: state() == BreakerState.HALF_OPEN, 30)
            with grpc.insecure_channel(server.target) as ch:
                t0 = time.perf_counter()
                future = pb_grpc.CatClassifierStub(ch).Classify.future(
                    pb.ClassifyRequest(image=img, escalation=pb.ESCALATION_MODE_ALWAYS), timeout=60)
                became_probe = wait_for(probing, 30, 0.005)
                future.cancel()
                _record(outcome, lock, "CANCELLED", None, (time.perf_counter() - t0) * 1000.0)
                released = wait_for(lambda: not probing(), 30, 0.005)
            outcome.notes.append(f"the probe request was in flight {became_probe is not None}; its slot was freed "
                                 f"{(released or float('nan')) * 1000:.0f} ms after the cancel (budget "
                                 f"{call_budget_s:g} s)")
        t_thaw = time.monotonic()
        r = None
        while time.monotonic() - t_thaw < 60:
            r = call(client)
            if r is not None and r.escalated:
                break
            time.sleep(0.2)
        outcome.notes.append(f"escalations resumed {time.monotonic() - t_thaw:.1f} s after the thaw, breaker "
                             f"{state().name}" if r is not None and r.escalated else
                             "escalations did NOT resume within 60 s")
    outcome.rss_mb = (before, rss_mb())
    return outcome


def _stream_requests(n: int, mode: str, hold: threading.Event | None):
    """``n`` stream messages; with ``hold``, the stream stays open (no half-close) until set."""
    from catcascade.serving.api import cascade_pb2 as pb
    
    images = random_jpegs(n, seed=11)
    for i in range(n):
        yield pb.ClassifyRequest(image=images[i], escalation=pb.EscalationMode.Value(f"ESCALATION_MODE_{mode.upper()}"), request_id=f"s{i}")
    if hold is not None:
        hold.wait(120)


def stream_deadline(target: str, vllm_server, deadline_s: float = 2.0, messages: int = 4) -> LoadOutcome:
    """One stream with a ``deadline_s`` deadline, ALWAYS-mode messages, vLLM frozen: each
    message must be answered (CNN-only, reason DEADLINE) before the stream's deadline."""
    import time

    import grpc

    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    outcome, lock = LoadOutcome(), threading.Lock()
    before = rss_mb()
    with vllm_server.paused(), grpc.insecure_channel(target) as ch:
        t0 = time.perf_counter()
        try:
            for r in pb_grpc.CatClassifierStub(ch).ClassifyStream(_stream_requests(messages, "always", None),
                                                                 timeout=deadline_s):
                code = r.error.code or "OK"
                _record(outcome, lock, code, _reason_name(r) if code == "OK" else None,
                        (time.perf_counter() - t0) * 1000.0)
            outcome.notes.append(f"stream ended OK after {(time.perf_counter() - t0) * 1000:.0f} ms "
                                 f"(deadline {deadline_s * 1000:.0f} ms)")
        except grpc.RpcError as e:
            outcome.notes.append(f"stream ended {e.code().name} after {(time.perf_counter() - t0) * 1000:.0f} ms")
    outcome.rss_mb = (before, rss_mb())
    return outcome


def orphaned_streams(server, vllm_server, n_streams: int = 8, per_stream: int = 4,
                     after_requests: int = 40) -> LoadOutcome:
    """``n_streams`` streams send ALWAYS messages to a frozen vLLM, then their clients cancel
    them. Notes: escalation slots held before, time until they are free; then vLLM is thawed
    and ``after_requests`` ALWAYS requests show whether escalations are shed."""
    import time

    import grpc

    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    pipeline = server.servicer.front_door.router.live_engine()
    want = min(n_streams * per_stream, pipeline.limits.max_concurrent_escalations)
    hold = threading.Event()
    before = rss_mb()
    channels, calls = [], []
    try:
        with vllm_server.paused():
            for _ in range(n_streams):
                ch = grpc.insecure_channel(server.target)
                channels.append(ch)
                calls.append(pb_grpc.CatClassifierStub(ch).ClassifyStream(_stream_requests(per_stream, "always", hold)))
            held = wait_for(lambda: pipeline.inflight_escalations >= want, 60)
            slots = pipeline.inflight_escalations
            for call in calls:
                call.cancel()
            freed = wait_for(lambda: pipeline.inflight_escalations == 0, 60, 0.01)
    finally:
        hold.set()
        for ch in channels:
            ch.close()
    after = run_load(server.target, random_jpegs(8), after_requests, 4, "always")
    after.rss_mb = (before, rss_mb())
    after.notes.append(f"{slots} escalation slots held by {n_streams} streams (reached: {held is not None}); all "
                       f"free {freed * 1000:.0f} ms after the cancels" if freed is not None else
                       f"{slots} escalation slots held; NOT freed within 60 s of the cancels "
                       f"({pipeline.inflight_escalations} left)")
    return after


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default="artifacts/demo-bundle")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="artifacts/reliability.md")
    parser.add_argument("--scenarios", default="all", choices=["all", "basic", "hardening"],
                        help="basic: saturation, overload, bad inputs, vLLM killed; hardening: the breaker's "
                             "probe, hung vLLM, streams, overload bursts with deadlines")
    parser.add_argument("--match", default="", help="hardening: run only the scenarios whose name contains this")
    parser.add_argument("--burst-factor", type=float, default=4.0, help="burst size over what the deadline allows")
    parser.add_argument("--burst-deadline", type=float, default=1.0, help="client deadline of burst calls, s")
    parser.add_argument("--data", "--photos", dest="photos",
                        help="folder of real JPEGs for the decode-speed comparison (optional)")
    parser.add_argument("--part", choices=["all", "vlm", "input"], default="all",
                        help="input: only the decode-bomb, abandoned-decode and auth-edge scenarios (no vLLM)")


def main(args: argparse.Namespace) -> int:
    """Runs every fault scenario against freshly started real servers and prints the table."""
    from pathlib import Path

    from catcascade.ensemble.bundle import load_bundle
    from catcascade.serving.config import ServeConfig
    from catcascade.serving.service_thread import ServiceThread
    from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

    bundle_dir = Path(args.bundle)
    if not (bundle_dir / "manifest.json").is_file():
        from catcascade.training.demo_bundle import build_demo_bundle

        build_demo_bundle(bundle_dir)
    if args.part in ("all", "input"):
        print(run_input_edge_scenarios(str(bundle_dir), str(Path(args.out).with_name("reliability-input.md")),
                                       args.photos))
        if args.part == "input":
            return 0
    bundle = load_bundle(bundle_dir)
    vcfg = VllmServerConfig.for_bundle(bundle)
    rows, sections = [], []
    with VllmServer(vcfg, log_path="artifacts/logs/vllm-reliability.log") as vllm:
        print("vLLM ready; running scenarios", flush=True)
        if args.scenarios in ("all", "hardening"):
            sections.append(run_hardening(args, bundle_dir, vllm))
        if args.scenarios == "hardening":
            return _write(args, sections)
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
        from catcascade.client import CatcascadeClient

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
    return _write(args, [TABLE_HEADER + "\n" + "\n".join(rows)] + sections)


def _write(args: argparse.Namespace, sections: list[str]) -> int:
    from pathlib import Path

    text = "\n\n".join(sections) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


def run_hardening(args: argparse.Namespace, bundle_dir, vllm) -> str:
    """The serving-core hardening scenarios (issue #11), each against its own fresh server;
    returns a markdown table with the notes of each scenario under it."""
    from catcascade.serving.config import ServeConfig
    from catcascade.serving.service_thread import ServiceThread

    rows, notes = [], []

    def scenario(name: str, config: dict, run):
        if args.match not in name:
            return
        print(f"scenario: {name}", flush=True)
        with ServiceThread(ServeConfig(bundle=bundle_dir, port=0, vlm={"urls": [vllm.url], **config.pop("vlm", {})},
                                       **config)) as server:
            outcome = run(server)
        rows.append(hardening_row(name, outcome))
        notes.extend(f"- {name}: {n}" for n in outcome.notes)
        print(rows[-1], *outcome.notes, sep="\n", flush=True)

    f, d = args.burst_factor, args.burst_deadline
    scenario("intake floor: 600 calls at once, no deadline, every one refused (max_queue_wait_ms ~0)",
             {"admission": {"max_queue_wait_ms": 0.001}},
             lambda s: burst_in_subprocess(s.target, 600, None, "never"))
    scenario(f"overload, small server (batches of 1, one instance, one thread): {f:g}x capacity for 2 s, "
             f"{d:g} s deadlines, NEVER, admission on", {"batching": {"max_batch_size": 1, "instances": 1},
                                                        "cnn_threads": 1, "vlm": {"urls": []}},
             lambda s: overload_burst(s.target, f, d, "never", 2.0))
    for mode, burst_s in (("never", 2.0), ("always", 2.0), ("never", None)):
        shape = f"{f:g}x capacity for {burst_s:g} s" if burst_s else f"{f:g}x what {d:g} s allows, at once"
        for name, config in (("admission on", {}), ("admission on, compute_nice 10", {"compute_nice": 10}),
                             ("admission off", {"admission": {"enabled": False}})):
            if "compute_nice" in name and (mode, burst_s) != ("never", 2.0):
                continue
            scenario(f"overload: {shape}, {d:g} s deadlines, {mode.upper()}, {name}", config,
                     lambda s, m=mode, b=burst_s: overload_burst(s.target, f, d, m, b))
    scenario("vLLM frozen 12 s under ALWAYS load, 1 s deadlines, watchdog on (default)", {},
             lambda s: hung_vllm(s.target, vllm))
    scenario("vLLM frozen 12 s under ALWAYS load, 1 s deadlines, watchdog off", {"breaker": {"health_period_s": 0}},
             lambda s: hung_vllm(s.target, vllm))
    scenario("half-open probe cancelled by its client, vLLM frozen then thawed",
             {"breaker": {"health_period_s": 0, "failure_threshold": 1, "cooldown_s": 1.0},
              "vlm": {"call_budget_s": 2.0}},
             lambda s: cancelled_probe(s, vllm, 2.0))
    scenario("stream with a 2 s deadline, 4 ALWAYS messages, vLLM frozen", {"breaker": {"health_period_s": 0}},
             lambda s: stream_deadline(s.target, vllm))
    scenario("8 streams x 4 ALWAYS messages to a frozen vLLM, cancelled; then 40 ALWAYS requests",
             {"breaker": {"health_period_s": 0}, "vlm": {"timeout_s": 60, "call_budget_s": 60}},
             lambda s: orphaned_streams(s, vllm))
    return HARDENING_HEADER + "\n" + "\n".join(rows) + "\n\n" + "\n".join(notes)


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

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

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

    from catcascade.client import CatcascadeClient

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
    from catcascade.client import CatcascadeClient

    with CatcascadeClient(target, timeout_s=60, token="tok-a") as c:
        for img in random_jpegs(5, seed=1):
            c.classify(img, mode="never")


_DECODE_SPEED_CHILD = r"""
import json, sys, time
from pathlib import Path
from catcascade.cnn_stage.native_memory import tune_malloc
if sys.argv[1] == "on":
    tune_malloc(2, 1024)
from catcascade.cnn_stage.preprocessing import PreprocessConfig, load_and_preprocess
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
