"""A soak: mixed traffic against ``catcascade serve`` in its own process for a fixed time,
with, on ``--vllm``, a real vLLM server restarted twice on the way (at a third and two thirds
of the run), and version swaps through the ModelAdmin service every ``--swap-every`` seconds.
Reports every status code by kind of call, p50/p99 latencies, and the server's RSS minute by
minute; fails (exit 1) on a status the API does not promise (UNKNOWN, INTERNAL, UNAVAILABLE),
on an admin call that fails, or on RSS growth past ``--max-rss-growth`` after the warm-up.

Kinds of call, mixed at random by each worker: plain (NEVER and AUTO), explain (a rationale),
streams (valid messages, or one undecodable message in the middle), bad inputs (hostile or
broken images), malformed protobuf, calls cancelled by their client, and calls with deadlines
too short to meet.

Version swaps: the bundle is staged twice (``v1``, ``v2``, with the project's own staging)
into a temporary model repository that the server serves (``models.repository``, with its
ModelAdmin service on a loopback port), and a thread cycles through what the admin API
offers, always with the version that is not live: a canary candidate at a random share, the
same candidate in shadow, its promotion, a rollback, and a promotion by name. Both versions
carry the same adapter, so with ``--vllm`` they share one vLLM server and one adapter in it.
Each admin call is counted as kind ``swap``. ``--swap-every 0`` serves the bundle itself.

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
SWAPS = ("canary", "shadow", "promote", "rollback", "promote by name")
"""The cycle of admin changes, each one made with the version that is not live."""
VERSIONS = ("v1", "v2")
ADMIN_TOKEN = "soak-admin-token"


@dataclass
class SoakRecord:
    """What the soak saw: codes and latencies by kind, RSS samples, events (vLLM restarts)."""

    codes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the start, server RSS MB), every 5 s."""
    events: list[tuple[float, str]] = field(default_factory=list)
    rss_window_s: float = 0.0
    """How rss_growth compares: the lowest RSS over windows this long (one cycle of version
    swaps: RSS rises while a second version is loaded, falls when it is released), or the
    samples themselves (0)."""
    answered_by: Counter = field(default_factory=Counter)
    """Plain calls answered OK, by the model version that answered."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, code: str, ms: float) -> None:
        with self.lock:
            self.codes[kind][code] += 1
            self.latencies_ms[kind].append(ms)

    def swaps_failed(self) -> Counter:
        return Counter({code: n for code, n in self.codes.get("swap", Counter()).items() if code != "OK"})

    def unpromised(self) -> Counter:
        return Counter({f"{kind} {code}": n for kind, c in self.codes.items() for code, n in c.items()
                        if code in UNPROMISED})

    def rss_window(self, warmup_s: float, window_s: float | None = None) -> tuple[float, float]:
        """(RSS MB at the end of the warm-up, RSS MB at the end): the lowest sample of the
        ``window_s`` seconds after the warm-up, and of the last ``window_s`` seconds of the run
        (``rss_window_s`` unless given: one cycle of version swaps, so that both hold a moment
        with one version loaded, not the moment a second one was being loaded or drained);
        with 0, the first sample after the warm-up and the last sample."""
        window_s = self.rss_window_s if window_s is None else window_s
        after = [(t, mb) for t, mb in self.rss_mb if t >= warmup_s]
        if len(after) < 2:
            return (float("nan"),) * 2
        if window_s <= 0:
            return after[0][1], after[-1][1]
        end = after[-1][0]
        return (min(mb for t, mb in after if t <= after[0][0] + window_s),
                min(mb for t, mb in after if t >= end - window_s))

    def rss_growth(self, warmup_s: float, window_s: float | None = None) -> float:
        """RSS at the end over RSS at the end of the warm-up (rss_window), less 1 (0.05 = 5% growth)."""
        first, last = self.rss_window(warmup_s, window_s)
        return 0.0 if first != first else last / first - 1.0


def _request(pb, image: bytes, mode: str, explain: bool = False, i: int = 0):
    return pb.ClassifyRequest(image=image, escalation=pb.EscalationMode.Value(f"ESCALATION_MODE_{mode.upper()}"),
                              explain=explain, request_id=f"soak-{i}")


def one_call(kind: str, channel, images: list[bytes], bad: list[bytes], rng: random.Random, i: int,
             answered_by: Counter | None = None) -> str:
    """Makes one call of ``kind``; its final status code name. A plain call answered counts its
    model version in ``answered_by``."""
    import grpc

    from catcascade.serving.api import cascade_pb2 as pb

    classify = channel.unary_unary(CLASSIFY, request_serializer=None, response_deserializer=None)
    image = rng.choice(images)
    try:
        if kind == "plain":
            raw = classify(_request(pb, image, rng.choice(["never", "auto"]), i=i).SerializeToString(), timeout=30)
            if answered_by is not None:
                answered_by[pb.ClassifyResponse.FromString(raw).versions.model_version or "-"] += 1
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


def stage_repository(bundle: str, folder: Path) -> Path:
    """``folder/models``: the bundle staged as each of VERSIONS, ``v1`` live."""
    from catcascade.serving.model_repository.staging import stage_version

    repo = Path(folder) / "models"
    repo.mkdir(parents=True)
    for version in VERSIONS:
        stage_version(Path(bundle), repo, version)
    (repo / "routing.yaml").write_text(f"live: {VERSIONS[0]}\n")
    return repo


def swap_once(admin, step: str, share: float) -> str:
    """One admin change of the cycle (SWAPS) with the version that is not live; what it did."""
    live = admin.list().routing.live
    other = next(v for v in VERSIONS if v != live)
    if step == "canary":
        admin.set_candidate(other, "canary", share)
        return f"{other} canary candidate at {share:.0%}"
    if step == "shadow":
        admin.set_candidate(other, "shadow", share)
        return f"{other} shadow candidate at {share:.0%}"
    if step == "promote":
        routing = admin.list().routing
        if not routing.candidate:  # the previous step failed: make one, so the cycle goes on
            admin.set_candidate(other, "canary", share)
        admin.promote()
        return f"candidate {routing.candidate or other} promoted"
    if step == "rollback":
        admin.rollback()
        return "rolled back"
    admin.promote(other)
    return f"{other} promoted by name"


def soak(bundle: str, minutes: float, workers: int = 6, vllm: bool = False, seed: int = 0,
         progress=print, swap_every_s: float = 25.0) -> SoakRecord:
    """Runs the soak; ``progress`` gets a line a minute. ``swap_every_s``: how often versions
    are swapped through ModelAdmin (0 = no swaps: the bundle is served as it is)."""
    import shutil
    import tempfile

    import grpc

    record, stop = SoakRecord(rss_window_s=len(SWAPS) * swap_every_s), threading.Event()
    images, bad = random_jpegs(16, (320, 240), seed=seed), list(bad_inputs().values())
    scratch = Path(tempfile.mkdtemp(prefix="catcascade-soak-"))
    vllm_server, config = None, {"metrics_port": 0, "log_format": "json"}
    admin_target = None
    if swap_every_s > 0:
        from catcascade.vlm_stage.vllm_server import free_port

        admin_port = free_port()
        admin_target = f"127.0.0.1:{admin_port}"
        config["models"] = {"repository": str(stage_repository(bundle, scratch)), "admin_port": admin_port,
                            "admin_tokens": [ADMIN_TOKEN]}
    else:
        config["bundle"] = bundle
    if vllm:
        from catcascade.ensemble.bundle import load_bundle
        from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

        vllm_server = VllmServer(VllmServerConfig.for_bundle(load_bundle(bundle)),
                                 log_path=scratch / "vllm.log").start()
        config["vlm"] = {"urls": [vllm_server.url]}
    duration_s, start = minutes * 60.0, time.monotonic()
    try:
        with ServerProcess(config) as server:
            def worker(w: int):
                rng = random.Random(seed * 1000 + w)
                kinds, weights = list(KINDS), list(KINDS.values())
                answered_by = Counter()
                with grpc.insecure_channel(server.target) as channel:
                    i = 0
                    while not stop.is_set():
                        kind = rng.choices(kinds, weights)[0]
                        t = time.perf_counter()
                        code = one_call(kind, channel, images, bad, rng, w * 1_000_000 + i, answered_by)
                        record.add(kind, code, (time.perf_counter() - t) * 1000.0)
                        i += 1
                with record.lock:
                    record.answered_by.update(answered_by)

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

            def swap_versions():  # through the real ModelAdmin service, while the traffic runs
                from catcascade.client.model_admin import ModelAdminClient

                rng = random.Random(seed + 7)
                with ModelAdminClient(admin_target, ADMIN_TOKEN, timeout_s=120) as admin:
                    k = 0  # on a fixed grid, so that a cycle of SWAPS takes len(SWAPS) * swap_every_s
                    while not stop.wait(max(0.0, start + (k + 1) * swap_every_s - time.monotonic())):
                        step, t = SWAPS[k % len(SWAPS)], time.perf_counter()
                        try:
                            what, code = swap_once(admin, step, round(rng.uniform(0.2, 0.8), 2)), "OK"
                        except grpc.RpcError as e:
                            what, code = f"{step}: {e.details()}", e.code().name
                        record.add("swap", code, (time.perf_counter() - t) * 1000.0)
                        record.events.append((time.monotonic() - start, f"swap {k + 1}: {what} ({code})"))
                        k += 1

            helpers = []
            if vllm_server is not None:
                helpers.append(threading.Thread(target=restart_vllm_twice, daemon=True))
            if admin_target is not None:
                helpers.append(threading.Thread(target=swap_versions, daemon=True))
            for helper in helpers:
                helper.start()
            next_sample, reported_minute = 0.0, -1
            while (elapsed := time.monotonic() - start) < duration_s:
                if elapsed >= next_sample:
                    record.rss_mb.append((elapsed, server.status_mb()))
                    if int(elapsed // 60) > reported_minute:
                        reported_minute = int(elapsed // 60)
                        progress(f"{elapsed / 60:.1f} min: RSS {record.rss_mb[-1][1]:.0f} MB, "
                                 f"{sum(sum(c.values()) for c in record.codes.values())} calls")
                    next_sample = elapsed + 5.0  # the report's table shows one a minute/60 of the run
                time.sleep(0.5)
            stop.set()
            for thread in threads + [h for h in helpers if h.is_alive()]:
                thread.join(600)
            record.rss_mb.append((time.monotonic() - start, server.status_mb()))
    finally:
        stop.set()
        if vllm_server is not None:
            vllm_server.stop()
        shutil.rmtree(scratch / "models", ignore_errors=True)
    return record


def report(record: SoakRecord, minutes: float, warmup_s: float) -> str:
    after = [(t, mb) for t, mb in record.rss_mb if t >= warmup_s]
    first, last = record.rss_window(warmup_s)
    how = (f"lowest of each {record.rss_window_s:.0f} s, one swap cycle: {first:.0f} MB -> {last:.0f} MB; "
           if record.rss_window_s > 0 else "")
    rss = (f"{how}samples: {after[0][1]:.0f} MB at {after[0][0] / 60:.1f} min, {after[-1][1]:.0f} MB at "
           f"{after[-1][0] / 60:.1f} min, highest {max(mb for _, mb in after):.0f} MB" if after else "no samples")
    lines = [f"Soak of {minutes:g} min; RSS growth after the first {warmup_s / 60:.1f} min: "
             f"{record.rss_growth(warmup_s) * 100:+.1f}% ({rss}); statuses the API does not promise: "
             f"{dict(record.unpromised()) or 'none'}; failed version swaps: {dict(record.swaps_failed()) or 'none'}",
             "", "| kind | calls | status codes | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    for kind in [*KINDS, *(["swap"] if "swap" in record.codes else [])]:
        codes, ms = record.codes.get(kind, Counter()), record.latencies_ms.get(kind, [])
        p50, p99 = (np.percentile(ms, 50), np.percentile(ms, 99)) if ms else (float("nan"),) * 2
        lines.append(f"| {kind} | {sum(codes.values())} | "
                     f"{', '.join(f'{c} {n}' for c, n in sorted(codes.items()))} | {p50:.1f} | {p99:.1f} |")
    if record.answered_by:
        lines += ["", "Plain calls answered, by model version: "
                  + ", ".join(f"{v} {n}" for v, n in sorted(record.answered_by.items()))]
    lines += ["", "| minute | server RSS MB |", "| --- | --- |"]
    shown, step = [], max(5.0, minutes)  # about 60 rows: RSS is sampled every 5 s
    for i, (t, mb) in enumerate(record.rss_mb):
        if not shown or t - shown[-1][0] >= step - 2.5 or i == len(record.rss_mb) - 1:
            shown.append((t, mb))
    lines += [f"| {t / 60:.1f} | {mb:.0f} |" for t, mb in shown]
    lines += [""] + [f"- {t / 60:.1f} min: {what}" for t, what in record.events]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--vllm", action="store_true", help="a real vLLM server, restarted twice")
    parser.add_argument("--swap-every", type=float, default=25.0, help="seconds between version swaps through "
                        "ModelAdmin (0 = none: the bundle is served itself, not a repository of two versions)")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="after the warm-up (a sixth of the "
                        "run, at most 5 min)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warmup_s = min(300.0, args.minutes * 10.0)
    record = soak(args.bundle, args.minutes, args.workers, args.vllm, swap_every_s=args.swap_every)
    text = report(record, args.minutes, warmup_s)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 1 if record.unpromised() or record.swaps_failed() or record.rss_growth(warmup_s) > args.max_rss_growth else 0


if __name__ == "__main__":
    raise SystemExit(main())
