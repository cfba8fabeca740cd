"""What live traffic sees while the model repository works: a version swap under load, and
the cost of shadowing a candidate, measured in one run against `catcascade serve --models`.

1. Swap: a closed loop at fixed concurrency; a third of the way in, ModelAdmin.Promote loads,
   verifies and warms v2 while v1 serves, then swaps. Latency before, during and after the
   swap window; errors; old-version answers to requests sent after the swap (must be 0).
2. Shadow: the same loop with a shadow candidate at shares 0, 0.25 and 1: live throughput
   and latency against share 0 in the same run, comparisons made and copies dropped.

    python -m benchmarks.model_lifecycle --bundle artifacts/demo-bundle --out docs/bench/lifecycle

The server runs in its own process; v2 is the bundle with a higher temperature (the same
CNN), so both versions cost the same, any difference is the lifecycle's, and their top-1
labels agree (a temperature never moves the argmax). Writes JSON, Markdown
and a PNG (latency over time around the swap; shadow cost by share).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _make_version(repo: Path, name: str, source: Path, temperature_scale: float = 1.0) -> None:
    from catcascade.ensemble.bundle import load_bundle

    tmp = repo / f".{name}.tmp"
    tmp.mkdir()
    shutil.copy(source / "manifest.json", tmp)
    shutil.copy(source / "cnn.onnx", tmp)
    if (source / "vlm").is_dir():
        (tmp / "vlm").symlink_to((source / "vlm").resolve())
    bundle = load_bundle(tmp)
    bundle.manifest.cnn.temperature *= temperature_scale
    bundle.save()
    tmp.rename(repo / name)


class _Server:
    """`catcascade serve --models` in its own process, as deployed."""

    def __init__(self, repo: Path, vlm_url: str | None, log: Path, token: str, config: Path | None = None):
        from catcascade.vlm_stage.vllm_server import free_port

        self.port, self.admin_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "catcascade", "serve", "--models", str(repo), "--port", str(self.port),
               "--admin-port", str(self.admin_port)]
        if vlm_url:
            cmd += ["--vlm-url", vlm_url]
        if config:
            cmd += ["--config", str(config)]
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")
        env = {**os.environ, "CATCASCADE_ADMIN_TOKENS": token}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.target = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 300) -> None:
        import grpc

        from catcascade.client import CatcascadeClient

        deadline = time.monotonic() + timeout_s
        with CatcascadeClient(self.target, timeout_s=2) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; see {self._log.name}")
                try:
                    c.model_info()
                    return
                except grpc.RpcError:
                    time.sleep(0.5)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _request(client, image: bytes, mode: str) -> tuple[float, float, str, str]:
    import grpc

    sent = time.monotonic()
    try:
        r = client.classify(image, mode=mode)
        return sent, (time.monotonic() - sent) * 1000, r.versions.model_version, r.labels[0].label
    except grpc.RpcError as e:
        return sent, (time.monotonic() - sent) * 1000, e.code().name, ""


def load_run(target: str, images: list[bytes], seconds: float, mode: str, concurrency: int = 4,
             rate: float | None = None, during=None) -> list[tuple[float, float, str, str]]:
    """A closed loop of ``concurrency`` callers, or (``rate``) an open loop with Poisson
    arrivals, for ``seconds``; ``during(t0)`` runs in its own thread meanwhile. Returns
    (sent, latency_ms, model_version or error code, top-1 label) per request."""
    from concurrent.futures import ThreadPoolExecutor

    from catcascade.client import CatcascadeClient

    records, lock, stop, local = [], threading.Lock(), threading.Event(), threading.local()

    def client():
        if not hasattr(local, "client"):
            local.client = CatcascadeClient(target, timeout_s=60)
        return local.client

    def one(i: int):
        row = _request(client(), images[i % len(images)], mode)
        with lock:
            records.append(row)

    def caller(w: int):
        i = w
        while not stop.is_set():
            one(i)
            i += concurrency

    t0 = time.monotonic()
    side = threading.Thread(target=during, args=(t0,)) if during else None
    if side:
        side.start()
    with ThreadPoolExecutor(64 if rate else concurrency) as pool:
        if rate:
            rng, t, i = np.random.default_rng(0), t0, 0
            while t < t0 + seconds:
                time.sleep(max(0.0, t - time.monotonic()))
                pool.submit(one, i)
                i += 1
                t += rng.exponential(1.0 / rate)
        else:
            for w in range(concurrency):
                pool.submit(caller, w)
            time.sleep(seconds)
            stop.set()
    if side:
        side.join()
    return records


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _window(rows, lo, hi) -> dict:
    lat = [r[1] for r in rows if lo <= r[0] < hi]
    span = max(1e-9, min(hi, max((r[0] for r in rows), default=lo)) - lo)
    return {"requests": len(lat), "req_per_s": len(lat) / span, "p50": _pct(lat, 50), "p99": _pct(lat, 99)}


def _live(admin, version: str) -> None:
    if admin.list().routing.live != version:
        admin.promote(version)


def swap_phase(target: str, admin, images: list[bytes], args, rate: float | None) -> dict:
    """Promotions in turn (v2, v1, v2) under load; latency away from and during the swaps."""
    swaps: list[dict] = []
    targets = ["v2", "v1", "v2"][: args.swaps]

    def promote_in_turn(t0):
        for i, target_version in enumerate(targets):
            time.sleep(max(0.0, t0 + args.seconds * (i + 1) / (len(targets) + 1) - time.monotonic()))
            start = time.monotonic()
            admin.promote(target_version)
            swaps.append({"target": target_version, "start": start, "end": time.monotonic()})

    load = f"open loop at {rate} req/s" if rate else f"closed loop c={args.concurrency}"
    print(f"swaps: {load} for {args.seconds:.0f} s, {len(targets)} promotions", flush=True)
    rows = load_run(target, images, args.seconds, args.mode, args.concurrency, rate, promote_in_turn)
    t0 = min(r[0] for r in rows)
    errors = [r for r in rows if r[2] not in ("v1", "v2")]
    wrong = 0  # requests sent after a swap (and before the next) not answered by its target
    for i, w in enumerate(swaps):
        hi = swaps[i + 1]["start"] if i + 1 < len(swaps) else float("inf")
        wrong += sum(1 for r in rows if w["end"] < r[0] < hi and r[2] != w["target"])
    during = [r for r in rows if any(w["start"] <= r[0] < w["end"] for w in swaps)]
    steady = [r for r in rows if all(not (w["start"] - 1.0 <= r[0] < w["end"] + 1.0) for w in swaps)]
    span_during = sum(w["end"] - w["start"] for w in swaps)
    span_steady = args.seconds - sum(w["end"] - w["start"] + 2.0 for w in swaps)
    res = {"load": load, "rate": rate, "requests": len(rows), "errors": len(errors), "old_version_after_swap": wrong,
           "swap_s": [w["end"] - w["start"] for w in swaps],
           "steady": {"requests": len(steady), "req_per_s": len(steady) / max(1e-9, span_steady),
                      "p50": _pct([r[1] for r in steady], 50), "p99": _pct([r[1] for r in steady], 99)},
           "during": {"requests": len(during), "req_per_s": len(during) / max(1e-9, span_during),
                      "p50": _pct([r[1] for r in during], 50), "p99": _pct([r[1] for r in during], 99)},
           "trace": [(round(r[0] - t0, 4), round(r[1], 2), r[2]) for r in rows],
           "swap_windows": [(w["start"] - t0, w["end"] - t0) for w in swaps]}
    print(f"  {len(rows)} requests, {len(errors)} errors, swaps took {', '.join(f'{x:.2f}' for x in res['swap_s'])} s, "
          f"{wrong} answers from the replaced version after a swap", flush=True)
    return res


def run(args) -> dict:
    from benchmarks.reliability import random_jpegs
    from catcascade.client import CatcascadeClient
    from catcascade.client.model_admin import ModelAdminClient

    token = secrets.token_hex(8)
    images = random_jpegs(64, size=(320, 240), seed=0)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                 "load_average": os.getloadavg()[0],
                 "bundle": str(args.bundle), "concurrency": args.concurrency, "mode": args.mode,
                 "vlm": bool(args.vlm_url)}
    with tempfile.TemporaryDirectory(prefix="lifecycle-") as tmp:
        repo = Path(tmp)
        _make_version(repo, "v1", args.bundle)
        _make_version(repo, "v2", args.bundle, temperature_scale=1.5)
        (repo / "routing.yaml").write_text("live: v1\n")
        server = _Server(repo, args.vlm_url, Path("artifacts/logs/lifecycle-server.log"), token, args.config)
        try:
            server.wait_ready()
            admin = ModelAdminClient(f"127.0.0.1:{server.admin_port}", token)
            with CatcascadeClient(server.target) as c:  # warm-up
                for img in images[:16]:
                    c.classify(img, mode=args.mode)

            out["swap"] = swap_phase(server.target, admin, images, args, None)
            capacity = out["swap"]["steady"]["req_per_s"]
            _live(admin, "v1")
            out["swap_open"] = swap_phase(server.target, admin, images, args, round(capacity / 2))

            _live(admin, "v1")
            runs: dict[float, list[dict]] = {share: [] for share in args.shares}
            for round_ in range(args.rounds):
                for share in args.shares:  # interleaved, so the machine's drift hits every share alike
                    if share > 0:
                        admin.set_candidate("v2", "shadow", share)
                    else:
                        admin.set_candidate(None)
                    rows = load_run(server.target, images, args.shadow_seconds, args.mode, args.concurrency)
                    time.sleep(1.0)  # the last shadow copies finish before the report is read
                    rep = admin.report()
                    lat = [r[1] for r in rows if r[2] == "v1"]
                    runs[share].append({"req_per_s": len(lat) / args.shadow_seconds, "p50": _pct(lat, 50),
                                        "p99": _pct(lat, 99), "errors": sum(r[2] != "v1" for r in rows),
                                        "compared": rep.compared, "shadow_dropped": rep.shadow_dropped,
                                        "top1_agreement": rep.top1_agreement})
                    r = runs[share][-1]
                    print(f"round {round_ + 1} shadow {share:.2f}: {r['req_per_s']:.0f} req/s, p50 {r['p50']:.1f} ms, "
                          f"p99 {r['p99']:.1f} ms, {r['compared']} compared, {r['shadow_dropped']} dropped", flush=True)
            admin.set_candidate(None)
            base = [r["req_per_s"] for r in runs[args.shares[0]]]
            out["shadow"] = []
            for share, rs in runs.items():
                ratios = [r["req_per_s"] / b for r, b in zip(rs, base)]  # against share 0 of the same round
                out["shadow"].append({"share": share, "runs": rs, "ratio": ratios,
                                      **{k: float(np.median([r[k] for r in rs])) for k in
                                         ("req_per_s", "p50", "p99", "compared", "shadow_dropped", "top1_agreement")},
                                      "errors": sum(r["errors"] for r in rs)})
            admin.close()
        finally:
            server.stop()
    return out


def report(res: dict) -> str:
    s = res["swap"]
    lines = [f"# Model lifecycle under load: {res['bundle']}", "",
             f"Machine: {res['machine']}, shared with other work (load average {res['load_average']:.1f} at the "
             f"start). Mode {res['mode']}, closed loop at concurrency {res['concurrency']}, "
             f"{'with' if res['vlm'] else 'without'} vLLM; the server in its own process. Milliseconds.", "",
             "## Swaps (ModelAdmin.Promote while the other version serves)", "",
             "Three promotions in turn (v2, v1, v2), each loading, verifying and warming the version while the "
             "other serves. Requests sent after a swap and answered by the replaced version: "
             f"{s['old_version_after_swap'] + res['swap_open']['old_version_after_swap']}.", "",
             "| load | requests sent | requests | errors | req/s | p50 | p99 | swap took (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run_ in (s, res["swap_open"]):
        for name, label in (("steady", "away from the swaps (1 s margin)"), ("during", "while a version loads")):
            w = run_[name]
            took = ", ".join(f"{x:.2f}" for x in run_["swap_s"]) if name == "during" else ""
            errors = run_["errors"] if name == "steady" else ""
            lines.append(f"| {run_['load']} | {label} | {w['requests']} | {errors} | {w['req_per_s']:.0f} | "
                         f"{w['p50']:.1f} | {w['p99']:.1f} | {took} |")
    lines += ["", f"## Shadow cost to live traffic ({len(res['shadow'][0]['runs'])} interleaved rounds; median, "
              "[min - max] of the ratio to share 0 in the same round)", "",
              "| shadow share | live req/s | vs share 0 | p50 | p99 | compared | dropped | top-1 agreement |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["shadow"]:
        ratio = f"{np.median(r['ratio']):.2f}x [{min(r['ratio']):.2f} - {max(r['ratio']):.2f}]"
        extra = (f"{r['compared']:.0f} | {r['shadow_dropped']:.0f} | {r['top1_agreement']:.0%}" if r["share"]
                 else "- | - | -")
        lines.append(f"| {r['share']:.2f} | {r['req_per_s']:.0f} | {ratio} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{extra} |")
    lines += ["", "![lifecycle](lifecycle.png)", ""]
    return "\n".join(lines)


def _trace(a, run_: dict) -> None:
    trace = run_["trace"]
    for version, colour in (("v1", "tab:blue"), ("v2", "tab:orange")):
        pts = [(t, ms) for t, ms, v in trace if v == version]
        if pts:
            a.scatter(*zip(*pts), s=4, color=colour, label=f"answered by {version}")
    for i, (lo, hi) in enumerate(run_["swap_windows"]):
        a.axvspan(lo, hi, color="grey", alpha=0.3, label="loading, verifying, warming" if i == 0 else None)
        a.axvline(hi, color="black", lw=1, label="swap" if i == 0 else None)
    a.set(xlabel="request sent at (s)", ylabel="latency (ms)", yscale="log",
          title=f"Swaps, {run_['load']}: {run_['errors']} errors")
    a.legend(fontsize=8, markerscale=3)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, a2, b) = plt.subplots(1, 3, figsize=(18, 4.2))
    for ax, run_ in ((a, res["swap"]), (a2, res["swap_open"])):
        _trace(ax, run_)
    shares = [r["share"] for r in res["shadow"]]
    for r in res["shadow"]:
        b.scatter([r["share"]] * len(r["ratio"]), r["ratio"], color="tab:blue", s=14, alpha=0.5)
    b.plot(shares, [np.median(r["ratio"]) for r in res["shadow"]], "o-", color="tab:blue",
           label="live req/s / share 0 (same round): median, each round")
    b.plot(shares, [1 / (1 + s) for s in shares], ":", color="grey", label="1 / (1 + share): CPU-bound expectation")
    b.set(xlabel="shadow share", ylabel="live throughput vs no shadow", ylim=(0, 1.3),
          title="Shadowing a candidate: cost to live traffic")
    b.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("artifacts/demo-bundle"))
    p.add_argument("--out", type=Path, default=Path("docs/bench/lifecycle"))
    p.add_argument("--vlm-url", help="vLLM with runtime LoRA loading (serve-vlm); default CNN only")
    p.add_argument("--config", type=Path, help="ServeConfig YAML for the server (e.g. cnn_spinning: false)")
    p.add_argument("--mode", choices=["never", "auto", "always"], default="never")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0, help="length of the swap run")
    p.add_argument("--swaps", type=int, choices=[1, 2, 3], default=3)
    p.add_argument("--shadow-seconds", type=float, default=6.0, help="length of one shadow run")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the shadow shares")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 1.0])
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        from catcascade.training.demo_bundle import build_demo_bundle

        build_demo_bundle(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    (args.out / "lifecycle.json").write_text(json.dumps(res))
    (args.out / "lifecycle.md").write_text(report(res))
    plot(res, args.out / "lifecycle.png")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
