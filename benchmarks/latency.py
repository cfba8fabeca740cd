"""`catcascade bench-latency`: latency and throughput over real gRPC, with the model's own
time measured in the same run, so the serving overhead is stated, not guessed.

Closed loop over concurrency levels and an open loop at fixed Poisson request rates, with
real JPEGs; warm-up excluded; each configuration repeated (min/median/max across repeats).
The server runs as its own process (`catcascade serve`); the load generator is a grpc.aio
client in this process. Writes JSON, a Markdown report and PNG plots.

    .venv/bin/catcascade bench-latency                 # 224 px convnext_atto, NEVER mode
    .venv/bin/catcascade bench-latency --mode auto --vlm   # the demo bundle with vLLM
    .venv/bin/catcascade bench-latency --features      # each serving feature off vs on (feature_overhead.py)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAGES = ("decode_ms", "cnn_queue_ms", "cnn_ms", "vlm_ms", "blend_ms")


@dataclass
class RunStats:
    """One measurement window of one configuration."""

    label: str
    concurrency: int | None
    rate: float | None
    requests: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    codes: dict[str, int]
    escalated: int
    stage_ms: dict[str, float]
    batch_sizes: dict[int, int]

    @property
    def throughput(self) -> float:
        return self.codes.get("OK", 0) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {"label": self.label, "concurrency": self.concurrency, "rate": self.rate, "requests": self.requests,
                "throughput": self.throughput, "p50": self.pct(50), "p90": self.pct(90), "p95": self.pct(95),
                "p99": self.pct(99), "max": max(self.latencies_ms, default=float("nan")), "codes": self.codes,
                "escalation_rate": self.escalated / max(1, self.codes.get("OK", 0)), "stage_ms_median": self.stage_ms,
                "batch_sizes": self.batch_sizes}


def load_images(folder: Path | None, n: int = 64, seed: int = 0) -> list[bytes]:
    if folder is None:
        from catcascade.training.synthetic_data import write_synthetic_dataset

        folder = write_synthetic_dataset(Path("artifacts/bench-images"), per_class=6, size=320, progress=False)
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not paths:
        raise SystemExit(f"no images under {folder}")
    random.Random(seed).shuffle(paths)
    return [p.read_bytes() for p in paths[:n]]


async def _one(stub, pb, image: bytes, mode: int, timeout: float, out: list, metadata=None):
    import grpc

    t0 = time.perf_counter()
    try:
        r = await stub.Classify(pb.ClassifyRequest(image=image, escalation=mode), timeout=timeout, metadata=metadata)
        out.append(((time.perf_counter() - t0) * 1000.0, "OK", r))
    except grpc.aio.AioRpcError as e:
        out.append(((time.perf_counter() - t0) * 1000.0, e.code().name, None))


def _stats(label, concurrency, rate, results, seconds) -> RunStats:
    ok = [r for _, code, r in results if r is not None]
    stage = {s: float(np.median([getattr(r.timings, s) for r in ok])) if ok else float("nan") for s in STAGES}
    return RunStats(label, concurrency, rate, len(results), seconds, [ms for ms, code, _ in results if code == "OK"],
                    dict(Counter(code for _, code, _ in results)), sum(r.escalated for r in ok), stage,
                    dict(Counter(int(r.timings.cnn_batch_size) for r in ok)))


async def closed_loop(target: str, images: list[bytes], mode: int, concurrency: int, max_requests: int,
                      max_seconds: float, timeout: float = 30.0, token: str | None = None,
                      unique: bool = False) -> RunStats:
    """``concurrency`` callers, each sending its next request when the last one returns.
    ``token``: a bearer token to send; ``unique``: make every request's bytes new (bytes after
    the JPEG's end marker: the same pixels, a new response-cache key)."""
    import grpc

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    results: list = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CatClassifierStub(channel)
        stop_at = time.perf_counter() + max_seconds
        counter = iter(range(max_requests))
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        salt = os.urandom(8).hex()

        async def caller():
            for i in counter:
                if time.perf_counter() > stop_at:
                    return
                image = images[i % len(images)] + (f"{salt}{i}".encode() if unique else b"")
                await _one(stub, pb, image, mode, timeout, results, metadata)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return _stats(f"closed c={concurrency}", concurrency, None, results, time.perf_counter() - t0)


async def open_loop(target: str, images: list[bytes], mode: int, rate: float, max_requests: int, max_seconds: float,
                    timeout: float = 30.0, seed: int = 0) -> RunStats:
    """Requests arrive as a Poisson process at ``rate`` per second, whatever the latency."""
    import grpc

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    results: list = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CatClassifierStub(channel)
        tasks, t0 = [], time.perf_counter()
        next_at = t0
        for i in range(max_requests):
            next_at += rng.exponential(1.0 / rate)
            if next_at - t0 > max_seconds:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(stub, pb, images[i % len(images)], mode, timeout, results)))
        await asyncio.gather(*tasks)
        return _stats(f"open {rate:.0f}/s", None, rate, results, time.perf_counter() - t0)


async def explain_cost(target: str, images: list[bytes], n: int, mode: int, timeout: float = 60.0) -> dict:
    """What a rationale costs: ``n`` images, each classified with explain off then on (one
    request at a time, so both see the same images and the same machine), in the same run."""
    import grpc

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    off, on, rationale_ms, tokens, errors = [], [], [], [], Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CatClassifierStub(channel)
        for i in range(n):
            for explain, out in ((False, off), (True, on)):
                t0 = time.perf_counter()
                try:
                    r = await stub.Classify(pb.ClassifyRequest(image=images[i % len(images)], escalation=mode,
                                                               explain=explain), timeout=timeout)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] += 1
                    continue
                out.append((time.perf_counter() - t0) * 1000.0)
                if explain:
                    if r.rationale.text:
                        rationale_ms.append(r.timings.rationale_ms)
                        tokens.append(r.rationale.tokens)
                    else:
                        errors[f"no rationale: {r.rationale.error[:60]}"] += 1
    med = lambda v: float(np.median(v)) if v else float("nan")  # noqa: E731
    return {"requests_per_setting": n, "off_p50_ms": med(off), "on_p50_ms": med(on),
            "off_p90_ms": float(np.percentile(off, 90)) if off else float("nan"),
            "on_p90_ms": float(np.percentile(on, 90)) if on else float("nan"),
            "ratio_p50": med(on) / med(off) if off and on else float("nan"),
            "rationale_ms_p50": med(rationale_ms), "tokens_median": med(tokens), "errors": dict(errors)}


def ort_model_time(onnx_path: Path, image_size: int, batch_sizes: list[int], threads: int | None,
                   repeats: int = 20) -> dict[int, float]:
    """Median milliseconds per ONNX Runtime call at each batch size (same session options)."""
    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier

    clf = OnnxClassifier(onnx_path, intra_op_threads=threads)
    out = {}
    for bs in batch_sizes:
        x = np.random.default_rng(0).standard_normal((bs, 3, image_size, image_size)).astype(np.float32)
        for _ in range(3):
            clf.run(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            clf.run(x)
            times.append((time.perf_counter() - t) * 1000.0)
        out[bs] = float(np.median(times))
    return out


def ort_best_throughput(onnx_path: Path, image_size: int, batch_sizes: tuple[int, ...] = (1, 4, 8, 16),
                        seconds: float = 2.0) -> list[dict]:
    """ONNX Runtime alone, in each way it can use this machine's cores: one run at a time on all
    of them, or one single-threaded run per core at once. The best of these is the reference
    the server's throughput is held against, whichever way the server itself is configured."""
    import threading

    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier

    cores = os.cpu_count() or 1
    layouts = [(1, cores)] + ([(cores, 1)] if cores > 1 else [])
    rows = []
    for runs, threads in layouts:
        clf = OnnxClassifier(onnx_path, intra_op_threads=threads)
        for bs in batch_sizes:
            x = np.random.default_rng(0).standard_normal((bs, 3, image_size, image_size)).astype(np.float32)
            for _ in range(2):
                clf.run(x)
            counts = [0] * runs
            stop = time.perf_counter() + seconds

            def work(i):
                while time.perf_counter() < stop:
                    clf.run(x)
                    counts[i] += 1

            workers = [threading.Thread(target=work, args=(i,)) for i in range(runs)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rows.append({"runs": runs, "threads": threads, "batch": bs,
                         "images_per_s": sum(counts) * bs / (time.perf_counter() - t0)})
    return rows


def make_speed_bundle(out: Path, image_size: int = 224, model: str = "convnext_atto") -> Path:
    """A CNN-only bundle at full resolution (random weights: speed does not depend on them)."""
    import torch

    from catcascade.ensemble.bundle import Bundle, BundleManifest, CnnSpec, sha256_file
    from catcascade.cnn_stage.model import create_convnext
    from catcascade.cnn_stage.onnx_export import export_onnx
    from catcascade.cnn_stage.preprocessing import PreprocessConfig
    from catcascade.training.synthetic_data import DEMO_LABELS

    if (out / "manifest.json").is_file():
        return out
    torch.manual_seed(0)
    net = create_convnext(model, len(DEMO_LABELS))
    export_onnx(net, out / "cnn.onnx", image_size)
    Bundle(out, BundleManifest(name=f"speed-{model}-{image_size}", version="1", labels=DEMO_LABELS,
                               preprocess=PreprocessConfig.from_timm(net, image_size).to_dict(),
                               cnn=CnnSpec(architecture=model, sha256=sha256_file(out / "cnn.onnx")))).save()
    return out


class ServerProcess:
    """`catcascade serve` in its own process, as deployed."""

    def __init__(self, bundle: Path, port: int, vlm_url: str | None, log: Path, extra: list[str] | None = None):
        cmd = [sys.executable, "-m", "catcascade", "serve", "--bundle", str(bundle), "--port", str(port)]
        if vlm_url:
            cmd += ["--vlm-url", vlm_url]
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd + (extra or []), stdout=self._log, stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 300) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; see {self._log.name}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.5)
        raise TimeoutError("gRPC server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _spread(runs: list[RunStats], key) -> tuple[float, float, float]:
    vals = [key(r) for r in runs]
    return min(vals), statistics.median(vals), max(vals)


def report(results: dict, out_dir: Path) -> str:
    """Markdown tables (median across repeats, [min-max] spread) and the overhead section."""
    lines = [f"# Latency over gRPC: {results['bundle']}", "",
             f"Machine: {results['machine']}. Mode {results['mode']}. {results['repeats']} repeats per configuration "
             "after warm-up; median across repeats, [min - max] spread. Milliseconds.", "",
             "| load | req/s | p50 | p90 | p95 | p99 | max | errors | escalated | decode | cnn queue | cnn | vlm | blend |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cfg in results["configs"]:
        runs = cfg["runs"]
        def cell(k, fmt="{:.1f}"):
            vals = [r[k] for r in runs]
            return f"{fmt.format(statistics.median(vals))} [{fmt.format(min(vals))}-{fmt.format(max(vals))}]"
        errors = Counter()
        for r in runs:
            errors.update({c: n for c, n in r["codes"].items() if c != "OK"})
        stages = {s: statistics.median(r["stage_ms_median"][s] for r in runs) for s in STAGES}
        lines.append(f"| {runs[0]['label']} | {cell('throughput', '{:.0f}')} | {cell('p50')} | {cell('p90')} | "
                     f"{cell('p95')} | {cell('p99')} | {cell('max')} | {dict(errors) or 0} | "
                     f"{statistics.median(r['escalation_rate'] for r in runs):.0%} | "
                     + " | ".join(f"{stages[s]:.2f}" for s in STAGES) + " |")
    o = results["overhead"]
    inst, thr = o.get("server_instances", 1), o.get("server_threads")
    layout = (f"up to {inst} batches at once: a lone batch on {thr} threads, overlapping ones on 1 thread each"
              if o.get("overlap_aware") else f"{inst} batch(es) at once, {thr} thread(s) each")
    lines += ["", "## Serving overhead against ONNX Runtime's own time (same run)", "",
              f"Server: {layout}. ORT alone with the server's ({thr}-thread) session options, one call at a time:", "",
              "| batch size | ORT ms per call | ORT images/s |", "| --- | --- | --- |"]
    lines += [f"| {bs} | {ms:.2f} | {int(bs) / ms * 1000:.0f} |" for bs, ms in o["ort_ms"].items()]
    if o.get("ort_layouts"):
        lines += ["", "ORT alone, every way of using the cores (the best is the throughput reference):", "",
                  "| runs at once x threads each | batch | ORT images/s |", "| --- | --- | --- |"]
        lines += [f"| {r['runs']} x {r['threads']} | {r['batch']} | {r['images_per_s']:.0f} |" for r in o["ort_layouts"]]
    if results["mode"] != "never":
        lines += ["", "With escalation the VLM column dominates end-to-end latency; the lines below compare "
                  "against the CNN's model time only."]
    lines += ["", f"- concurrency 1: p50 {o['c1_p50']:.2f} ms vs ORT single image {o['ort_single_ms']:.2f} ms: "
              f"overhead {o['c1_overhead_ms']:.2f} ms ({o['c1_ratio']:.2f}x the model time)",
              f"- concurrency {o['c_hi']}: {o['c_hi_throughput']:.0f} req/s = {o['throughput_ratio']:.0%} of ORT's best "
              f"batched throughput ({o['ort_best_throughput']:.0f} img/s at batch {o['ort_best_batch']}"
              f"{', ' + o['ort_best_layout'] if o.get('ort_best_layout') else ''})",
              f"- concurrency {o['c_hi']}: p99/p50 = {o['p99_over_p50']:.2f}"]
    e = results.get("explain_cost")
    if e:
        lines += ["", "## Cost of a rationale (ClassifyRequest.explain, same run)", "",
                  f"{e['requests_per_setting']} images, one request at a time, each classified with explain off and "
                  f"then on (mode {results['mode']}); client-side milliseconds.", "",
                  "| explain | p50 | p90 |", "| --- | --- | --- |",
                  f"| off | {e['off_p50_ms']:.1f} | {e['off_p90_ms']:.1f} |",
                  f"| on | {e['on_p50_ms']:.1f} | {e['on_p90_ms']:.1f} |", "",
                  f"- explain on / off at p50: {e['ratio_p50']:.2f}x; the rationale itself {e['rationale_ms_p50']:.1f} ms "
                  f"(p50, server-side), {e['tokens_median']:.0f} tokens (median); errors: {e['errors'] or 0}"]
    lines += ["", "![latency vs concurrency](latency_vs_concurrency.png) ![latency CDF](latency_cdf.png)"]
    text = "\n".join(lines) + "\n"
    (out_dir / "latency.md").write_text(text)
    return text


def plots(all_runs: dict[str, list[RunStats]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [(runs[0].concurrency, runs) for runs in all_runs.values() if runs[0].concurrency]
    fig, ax = plt.subplots(figsize=(6, 4))
    for q, style in ((50, "o-"), (95, "s--"), (99, "^:")):
        ax.plot([c for c, _ in closed], [statistics.median(r.pct(q) for r in runs) for _, runs in closed], style,
                label=f"p{q}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("latency (ms)")
    ax.set_title("catcascade Classify latency (closed loop)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_vs_concurrency.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in all_runs.items():
        lat = np.sort(np.concatenate([r.latencies_ms for r in runs]))
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=runs[0].label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=120)
    plt.close(fig)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: a 224 px convnext_atto speed bundle, or "
                   "the demo bundle with --vlm)")
    p.add_argument("--image-size", type=int, default=224, help="input size of the speed bundle built when --bundle is absent")
    p.add_argument("--data", "--images", dest="images", type=Path,
                   help="folder of photos, searched recursively (default: synthetic images, written to "
                        "artifacts/bench-images)")
    p.add_argument("--mode", choices=["never", "auto", "always"], default="never", help="escalation mode of every request")
    p.add_argument("--vlm", action="store_true", help="start vLLM for the bundle's VLM (needed for auto/always)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                   help="closed-loop concurrencies to measure")
    p.add_argument("--rates", type=float, nargs="*", default=None,
                   help="open-loop Poisson rates (req/s); default: 25/50/75%% of the best closed-loop throughput")
    p.add_argument("--repeats", type=int, default=3, help="measurement windows per configuration")
    p.add_argument("--max-requests", type=int, default=400, help="per measurement window")
    p.add_argument("--max-seconds", type=float, default=4.0, help="per measurement window")
    p.add_argument("--warmup", type=int, default=50, help="requests before measuring")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads in the server (default: all)")
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's batching.max_batch_size")
    p.add_argument("--no-spinning", action="store_true", help="serve with ONNX Runtime thread spinning off")
    p.add_argument("--instances", type=int, default=2,
                   help="CNN batches run at once in the server (batching.instances, default 2 as in serving)")
    p.add_argument("--engine", nargs="+", default=["local"],
                   help="local, ray (decode on the CNN replica), ray-front-door (decode on the front door): more "
                        "than one, or any ray, compares engines in one run (benchmarks/engine_comparison.py)")
    p.add_argument("--features", action="store_true", help="instead: what the response cache, tracing, tenant "
                   "budgets, drift signals and priorities cost, off and on, in one run (benchmarks/feature_overhead.py)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: artifacts/bench/latency (artifacts/bench/features with --features)")
    p.add_argument("--explain-cost", type=int, default=0, metavar="N",
                   help="also classify N images with ClassifyRequest.explain off then on (needs --vlm): the cost "
                        "of a rationale, as a ratio in the same run")
    p.add_argument("--update-doc", type=Path, default=None, metavar="PAGE",
                   help="also rewrite this run's table between its bench markers in PAGE (docs/benchmarks.md)")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from catcascade.ensemble.bundle import load_bundle
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.vlm_stage.vllm_server import free_port

    if args.features:
        return features_main(args)
    args.out = args.out or Path("artifacts/bench/latency")
    if args.engine != ["local"]:
        from benchmarks.engine_comparison import main as compare_engines

        return compare_engines(args, server_cls=ServerProcess, closed_loop=closed_loop, load_images=load_images,
                               make_speed_bundle=make_speed_bundle)
    console = Console(width=200)
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.bundle is None:
        args.bundle = Path("artifacts/demo-bundle") if args.vlm else Path(f"artifacts/speed-bundle-{args.image_size}")
    if not (args.bundle / "manifest.json").is_file():
        if args.vlm:
            from catcascade.training.demo_bundle import build_demo_bundle

            build_demo_bundle(args.bundle)
        else:
            console.print(f"building a {args.image_size} px convnext_atto speed bundle at {args.bundle}")
            make_speed_bundle(args.bundle, args.image_size)
    bundle = load_bundle(args.bundle)
    if args.mode != "never" and not args.vlm:
        console.print("[yellow]--mode auto/always without --vlm: escalations answer VLM_DISABLED[/yellow]")
    if args.explain_cost and not args.vlm:
        raise SystemExit("--explain-cost needs --vlm (a rationale is generated by the VLM)")
    images = load_images(args.images)
    mode = {"never": pb.ESCALATION_MODE_NEVER, "auto": pb.ESCALATION_MODE_AUTO, "always": pb.ESCALATION_MODE_ALWAYS}[args.mode]

    vllm = None
    if args.vlm:
        from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

        vllm = VllmServer(VllmServerConfig.for_bundle(bundle), log_path=out_dir / "vllm.log").start()
    extra = ["--config", str(_write_config(out_dir, args))]
    server = ServerProcess(args.bundle, free_port(), vllm.url if vllm else None, out_dir / "server.log", extra)
    all_runs: dict[str, list[RunStats]] = {}
    explain = None
    try:
        server.wait_ready()
        console.print(f"server ready at {server.target}; warm-up {args.warmup} requests")
        asyncio.run(closed_loop(server.target, images, mode, 4, args.warmup, 60))
        from tqdm import tqdm

        for c in tqdm(args.concurrency, desc="closed loop"):
            all_runs[f"c{c}"] = [asyncio.run(closed_loop(server.target, images, mode, c, args.max_requests,
                                                         args.max_seconds)) for _ in range(args.repeats)]
        best = max(statistics.median(r.throughput for r in runs) for runs in all_runs.values())
        rates = args.rates if args.rates is not None else [round(best * f) for f in (0.25, 0.5, 0.75)]
        for rate in tqdm(rates, desc="open loop"):
            all_runs[f"r{rate}"] = [asyncio.run(open_loop(server.target, images, mode, rate, args.max_requests,
                                                          args.max_seconds, seed=k)) for k in range(args.repeats)]
        if args.explain_cost:
            console.print(f"rationale cost: {args.explain_cost} images, explain off then on")
            explain = asyncio.run(explain_cost(server.target, images, args.explain_cost, mode))
    finally:
        server.stop()
        if vllm:
            vllm.stop()

    used = sorted({bs for runs in all_runs.values() for r in runs for bs in r.batch_sizes} | {1, 2, 4, 8, 16})
    # With several instances and no thread count the server runs a lone batch on every core and
    # overlapping ones on one thread each (cnn_stage.onnx_runtime.OverlapAwareClassifier).
    overlap_aware = args.instances > 1 and not args.threads
    cores = os.cpu_count() or 1
    server_threads = args.threads or (cores if overlap_aware else max(1, cores // args.instances))
    ort_ms = ort_model_time(bundle.cnn_path, bundle.preprocess.image_size, used, server_threads)
    # The references: ORT's fastest single image (all cores on one run) and its best throughput
    # over every way of using the cores, not just the way this server was configured.
    single_ms = ort_model_time(bundle.cnn_path, bundle.preprocess.image_size, [1], None)[1] \
        if server_threads != (os.cpu_count() or 1) else ort_ms[1]
    layouts = ort_best_throughput(bundle.cnn_path, bundle.preprocess.image_size)
    best_layout = max(layouts, key=lambda r: r["images_per_s"])
    c1 = all_runs.get("c1")
    c_hi = max(c for c in args.concurrency if c <= 16) if any(c <= 16 for c in args.concurrency) else args.concurrency[0]
    hi = all_runs[f"c{c_hi}"]
    c1_p50 = statistics.median(r.pct(50) for r in c1) if c1 else float("nan")
    overhead = {
        "server_instances": args.instances, "server_threads": server_threads, "overlap_aware": overlap_aware,
        "ort_ms": {str(k): v for k, v in ort_ms.items()}, "ort_single_ms": single_ms, "c1_p50": c1_p50,
        "c1_overhead_ms": c1_p50 - single_ms, "c1_ratio": c1_p50 / single_ms,
        "c_hi": c_hi, "c_hi_throughput": statistics.median(r.throughput for r in hi),
        "ort_layouts": layouts, "ort_best_batch": best_layout["batch"],
        "ort_best_layout": f"{best_layout['runs']} run(s) x {best_layout['threads']} thread(s)",
        "ort_best_throughput": best_layout["images_per_s"],
        "p99_over_p50": statistics.median(r.pct(99) / r.pct(50) for r in hi),
    }
    overhead["throughput_ratio"] = overhead["c_hi_throughput"] / overhead["ort_best_throughput"]
    results = {
        "bundle": bundle.version_string, "mode": args.mode, "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "configs": [{"name": k, "runs": [r.summary() for r in v]} for k, v in all_runs.items()],
        "overhead": overhead, "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "explain_cost": explain,
    }
    (out_dir / "latency.json").write_text(json.dumps(results, indent=1))
    plots(all_runs, out_dir)
    console.print(report(results, out_dir), markup=False)
    console.print(f"written: {out_dir}/latency.json, latency.md, latency_vs_concurrency.png, latency_cdf.png")
    if args.update_doc:
        update_doc(args.update_doc, out_dir / "latency.md", out_dir)
    return 0


def features_main(args: argparse.Namespace) -> int:
    """``--features``: one server per configuration of benchmarks/feature_overhead.py, all up at
    once and measured in turns (closed loop, c=1 and c=8), plus each feature's off-path cost."""
    import yaml
    from rich.console import Console
    from tqdm import tqdm

    from benchmarks import feature_overhead as fo
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.vlm_stage.vllm_server import free_port

    console = Console(width=200)
    out_dir = args.out = args.out or Path("artifacts/bench/features")
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or Path(f"artifacts/speed-bundle-{args.image_size}")
    if not (bundle / "manifest.json").is_file():
        console.print(f"building a {args.image_size} px convnext_atto speed bundle at {bundle}")
        make_speed_bundle(bundle, args.image_size)
    images = load_images(args.images)
    never = pb.ESCALATION_MODE_NEVER
    sink = fo.SpanSink()
    configs = fo.configurations(sink.endpoint)
    servers = []
    try:
        for i, cfg in enumerate(configs):
            path = out_dir / f"serve-{i}.yaml"
            path.write_text(yaml.safe_dump({"bundle": str(bundle), "batching": {"instances": args.instances},
                                            **cfg.serve}))
            servers.append(ServerProcess(bundle, free_port(), None, out_dir / f"server-{i}.log",
                                         ["--config", str(path)]))
        for server in servers:
            server.wait_ready()
        console.print(f"{len(servers)} servers ready; warm-up {args.warmup} requests each")
        for cfg, server in zip(configs, servers):
            asyncio.run(closed_loop(server.target, images, never, 4, args.warmup, 60, token=cfg.token,
                                    unique=cfg.unique_images))
        for _ in tqdm(range(args.repeats), desc="rounds (every configuration in turn)"):
            for c in (1, 8):
                for cfg, server in zip(configs, servers):
                    cfg.runs.setdefault(c, []).append(asyncio.run(closed_loop(
                        server.target, images, never, c, args.max_requests, args.max_seconds, token=cfg.token,
                        unique=cfg.unique_images)))
        served_spans = sink.spans
        on = fo.on_path_costs(sorted(images, key=len)[len(images) // 2], sink.endpoint)
    finally:
        for server in servers:
            server.stop()
        sink.stop()
    results = fo.summarize(configs, fo.off_path_costs(), served_spans, args, bundle, on=on)
    (out_dir / "features.json").write_text(json.dumps(results, indent=1))
    text = fo.report(results)
    (out_dir / "features.md").write_text(text)
    fo.plot(results, out_dir / "features.png")
    console.print(text, markup=False)
    console.print(f"written: {out_dir}/features.json, features.md, features.png")
    if args.update_doc:
        fo.update_doc(args.update_doc, out_dir)
    return 0


def update_doc(page: Path, report_md: Path, out_dir: Path) -> None:
    """Swaps the text between the page's bench:latency markers for the new report (images linked)."""
    from benchmarks.doc_tables import relative_link, replace_between_markers

    body = report_md.read_text().split("\n", 2)[2]  # drop the report's own title
    rel = relative_link(out_dir, page)
    body = body.replace("](latency_vs_concurrency.png)", f"]({rel}/latency_vs_concurrency.png)")
    body = body.replace("](latency_cdf.png)", f"]({rel}/latency_cdf.png)")
    replace_between_markers(page, "latency", body)


def _write_config(out_dir: Path, args) -> Path:
    import yaml

    cfg = {"bundle": str(args.bundle), "batching": {"max_batch_size": args.max_batch_size,
                                                     "instances": args.instances}}
    if args.threads:
        cfg["cnn_threads"] = args.threads
    if args.no_spinning:
        cfg["cnn_spinning"] = False
    path = out_dir / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-latency", help="latency/throughput benchmark over gRPC with overhead accounting")
    add_cli_args(p)
    p.set_defaults(func=main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
