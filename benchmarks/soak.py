"""A soak: mixed traffic against ``catcascade serve`` in its own process for a fixed time,
with, on ``--vllm``, a real vLLM server restarted twice on the way (at a third and two thirds
of the run). Reports every status code by kind of call, p50/p99 latencies, and the server's
RSS minute by minute; fails (exit 1) on a status the API does not promise (UNKNOWN, INTERNAL,
UNAVAILABLE) or on RSS growth past ``--max-rss-growth`` after the warm-up.

Kinds of call, mixed at random by each worker: plain (NEVER and AUTO), explain (a rationale),
streams (valid messages, or one undecodable message in the middle), bad inputs (hostile or
broken images), malformed protobuf, calls cancelled by their client, and calls with deadlines
too short to meet.

    python -m benchmarks.soak --bundle artifacts/demo-bundle --minutes 30 [--vllm] --out soak.md
"""
from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.reliability import ServerProcess, bad_inputs, random_jpegs

KINDS = {"plain": 40, "explain": 10, "stream": 12, "bad_input": 10, "malformed": 6, "cancelled": 10,
         "short_deadline": 12}
"""Kinds of call and their weights in the mix."""
UNPROMISED = {"UNKNOWN", "INTERNAL", "UNAVAILABLE"}
CLASSIFY = "/catcascade.v1.CatClassifier/Classify"
CLASSIFY_STREAM = "/catcascade.v1.CatClassifier/ClassifyStream"


@dataclass
class SoakRecord:
    """What the soak saw: codes and latencies by kind, RSS samples, events (vLLM restarts)."""

    codes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the start, server RSS MB)."""
    events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, code: str, ms: float) -> None:
        with self.lock:
            self.codes[kind][code] += 1
            self.latencies_ms[kind].append(ms)

    def unpromised(self) -> Counter:
        return Counter({f"{kind} {code}": n for kind, c in self.codes.items() for code, n in c.items()
                        if code in UNPROMISED})

    def rss_growth(self, warmup_s: float) -> float:
        """RSS at the end over RSS at the end of the warm-up, less 1 (0.05 = 5% growth)."""
        after = [mb for t, mb in self.rss_mb if t >= warmup_s]
        return after[-1] / after[0] - 1.0 if len(after) >= 2 else 0.0


def _request(pb, image: bytes, mode: str, explain: bool = False, i: int = 0):
    return pb.ClassifyRequest(image=image, escalation=pb.EscalationMode.Value(f"ESCALATION_MODE_{mode.upper()}"),
                              explain=explain, request_id=f"soak-{i}")


def one_call(kind: str, channel, images: list[bytes], bad: list[bytes], rng: random.Random, i: int) -> str:
    """Makes one call of ``kind``; its final status code name."""
    import grpc

    from catcascade.serving.api import cascade_pb2 as pb

    classify = channel.unary_unary(CLASSIFY, request_serializer=None, response_deserializer=None)
    image = rng.choice(images)
    try:
        if kind == "plain":
            classify(_request(pb, image, rng.choice(["never", "auto"]), i=i).SerializeToString(), timeout=30)
        elif kind == "explain":
            classify(_request(pb, image, "auto", explain=True, i=i).SerializeToString(), timeout=30)
        elif kind == "bad_input":
            classify(_request(pb, rng.choice(bad), "never", i=i).SerializeToString(), timeout=30)
        elif kind == "malformed":
            classify(b"\x0a\xff" + rng.randbytes(rng.randint(0, 32)), timeout=30)
        elif kind == "short_deadline":
            classify(_request(pb, image, "auto", i=i).SerializeToString(), timeout=rng.uniform(0.001, 0.05))
        elif kind == "cancelled":
            future = classify.future(_request(pb, image, "auto", i=i).SerializeToString(), timeout=30)
            time.sleep(rng.uniform(0.0, 0.02))
            future.cancel()
            try:
                future.result()
            except grpc.FutureCancelledError:
                return "CANCELLED"
        elif kind == "stream":
            messages = [_request(pb, rng.choice(images), "auto", i=i * 10 + j).SerializeToString()
                        for j in range(rng.randint(1, 4))]
            if rng.random() < 0.3:  # an undecodable message in the middle: answered before it, then ended
                messages.insert(rng.randint(0, len(messages)), b"\x0a\xff")
            stream = channel.stream_stream(CLASSIFY_STREAM, request_serializer=None, response_deserializer=None)
            for raw in stream(iter(messages), timeout=30):
                pb.ClassifyResponse.FromString(raw)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def soak(bundle: str, minutes: float, workers: int = 6, vllm: bool = False, seed: int = 0,
         progress=print) -> SoakRecord:
    """Runs the soak; ``progress`` gets a line a minute."""
    import grpc

    record, stop = SoakRecord(), threading.Event()
    images, bad = random_jpegs(16, (320, 240), seed=seed), list(bad_inputs().values())
    vllm_server, config = None, {"bundle": bundle, "metrics_port": 0, "log_format": "json"}
    if vllm:
        from catcascade.ensemble.bundle import load_bundle
        from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

        import tempfile

        log = Path(tempfile.mkdtemp(prefix="catcascade-soak-")) / "vllm.log"
        vllm_server = VllmServer(VllmServerConfig.for_bundle(load_bundle(bundle)), log_path=log).start()
        config["vlm"] = {"urls": [vllm_server.url]}
    duration_s, start = minutes * 60.0, time.monotonic()
    try:
        with ServerProcess(config) as server:
            def worker(w: int):
                rng = random.Random(seed * 1000 + w)
                kinds, weights = list(KINDS), list(KINDS.values())
                with grpc.insecure_channel(server.target) as channel:
                    i = 0
                    while not stop.is_set():
                        kind = rng.choices(kinds, weights)[0]
                        t = time.perf_counter()
                        code = one_call(kind, channel, images, bad, rng, w * 1_000_000 + i)
                        record.add(kind, code, (time.perf_counter() - t) * 1000.0)
                        i += 1

            threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
            for thread in threads:
                thread.start()
            def restart_vllm_twice():  # beside the sampling below, which a restart (minutes on a CPU) must not stop
                for at in (duration_s / 3, 2 * duration_s / 3):
                    if stop.wait(max(0.0, start + at - time.monotonic())):
                        return
                    record.events.append((time.monotonic() - start, "vLLM stopped"))
                    vllm_server.stop()
                    vllm_server.start()
                    record.events.append((time.monotonic() - start, "vLLM started again"))

            restarter = threading.Thread(target=restart_vllm_twice, daemon=True)
            if vllm_server is not None:
                restarter.start()
            next_sample = 0.0
            while (elapsed := time.monotonic() - start) < duration_s:
                if elapsed >= next_sample:
                    record.rss_mb.append((elapsed, server.status_mb()))
                    if int(elapsed) % 60 < 5:
                        progress(f"{elapsed / 60:.1f} min: RSS {record.rss_mb[-1][1]:.0f} MB, "
                                 f"{sum(sum(c.values()) for c in record.codes.values())} calls")
                    next_sample = elapsed + max(5.0, duration_s / 60)
                time.sleep(0.5)
            stop.set()
            for thread in threads + ([restarter] if restarter.is_alive() else []):
                thread.join(600)
            record.rss_mb.append((time.monotonic() - start, server.status_mb()))
    finally:
        stop.set()
        if vllm_server is not None:
            vllm_server.stop()
    return record


def report(record: SoakRecord, minutes: float, warmup_s: float) -> str:
    lines = [f"Soak of {minutes:g} min; RSS growth after the first {warmup_s / 60:.1f} min: "
             f"{record.rss_growth(warmup_s) * 100:+.1f}%; statuses the API does not promise: "
             f"{dict(record.unpromised()) or 'none'}", "",
             "| kind | calls | status codes | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        codes, ms = record.codes.get(kind, Counter()), record.latencies_ms.get(kind, [])
        p50, p99 = (np.percentile(ms, 50), np.percentile(ms, 99)) if ms else (float("nan"),) * 2
        lines.append(f"| {kind} | {sum(codes.values())} | "
                     f"{', '.join(f'{c} {n}' for c, n in sorted(codes.items()))} | {p50:.1f} | {p99:.1f} |")
    lines += ["", "| minute | server RSS MB |", "| --- | --- |"]
    lines += [f"| {t / 60:.1f} | {mb:.0f} |" for t, mb in record.rss_mb]
    lines += [f"- {t / 60:.1f} min: {what}" for t, what in record.events]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--vllm", action="store_true", help="a real vLLM server, restarted twice")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="after the warm-up (a sixth of the "
                        "run, at most 5 min)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warmup_s = min(300.0, args.minutes * 10.0)
    record = soak(args.bundle, args.minutes, args.workers, args.vllm)
    text = report(record, args.minutes, warmup_s)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 1 if record.unpromised() or record.rss_growth(warmup_s) > args.max_rss_growth else 0


if __name__ == "__main__":
    raise SystemExit(main())
