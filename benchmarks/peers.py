"""`make bench-peers`: catcascade against the field's servers, in one run, on the same model.

The same 224 px ConvNeXt ONNX model (the speed bundle of bench-latency), the same decode and
preprocessing code (catcascade.cnn_stage.preprocessing) and the same real photos, served by:
  catcascade   `catcascade serve`, escalation never, over the Open Inference Protocol (gRPC)
  Triton       PyTriton: ONNX Runtime in the bound Python callable, Triton's dynamic batcher,
               two instances (its own virtual environment: the Triton stub needs the system
               Python 3.11, see --pytriton-python)
  Ray Serve    a plain application: one deployment with @serve.batch, two replicas, Serve's own
               HTTP ingress (the JPEG as the request body)
perf_analyzer drives the two servers that speak the Open Inference Protocol; Ray Serve does not,
so one Python load generator (asyncio, closed loop) drives Ray Serve and catcascade again, and
Ray Serve's ratio is to catcascade under that same generator. Servers are measured in
alternating windows (each window: every server at every concurrency, the order rotated), so a
slow spell of the shared machine hits all of them; each ratio is given as its median and range
across windows. The client's own CPU time per request is stated beside each row, and the
in-process ceiling (decode + ONNX Runtime, no server) is measured in the same run.

    make bench-peers DATA=DIR      # DIR/<label>/*.jpg: real photos
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "convnext"
BATCH = 16


# ------------------------------------------------------------------ the model every server runs


class PeerModel:
    """The bundle's CNN with catcascade's own decode and preprocessing; one ONNX Runtime thread
    (each server runs two of these, one per core)."""

    def __init__(self, bundle: Path, threads: int = 1):
        import onnxruntime as ort

        from catcascade.cnn_stage.preprocessing import PreprocessConfig

        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        self.cfg = PreprocessConfig.from_dict(manifest["preprocess"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(bundle) / "cnn.onnx"), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: list[bytes]):
        import numpy as np

        from catcascade.cnn_stage.preprocessing import load_and_preprocess

        batch = np.stack([load_and_preprocess(image, self.cfg) for image in images])
        return self.session.run(None, {self.input: batch})[0]


def serve_pytriton(bundle: Path, port: int) -> None:
    """Triton through PyTriton (run with the PyTriton environment's Python)."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    def instance():
        model = PeerModel(bundle)

        @batch
        def infer(image):
            return {"probabilities": model([row[0] for row in image]).astype(np.float32)}
        return infer

    config = TritonConfig(grpc_port=port, http_port=port + 1, metrics_port=port + 2)
    # perf_analyzer reads the statistics endpoint, which PyTriton guards with a token by default
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(model_name=MODEL, infer_func=[instance(), instance()],
                    inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
                    outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
                    config=ModelConfig(max_batch_size=BATCH, batcher=DynamicBatcher()))
        print("ready", flush=True)
        triton.serve()


def serve_ray(bundle: Path, port: int) -> None:
    """A plain Ray Serve application: @serve.batch and Serve's HTTP ingress."""
    import ray
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
    class Classifier:
        def __init__(self, bundle: str):
            self.model = PeerModel(Path(bundle))

        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.0)
        async def classify(self, images: list[bytes]) -> list[list[float]]:
            return self.model(images).tolist()

        async def __call__(self, request) -> dict:
            return {"probabilities": await self.classify(await request.body())}

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another session's cluster
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Classifier.bind(str(bundle)), route_prefix="/", blocking=False)
    print("ready", flush=True)
    threading.Event().wait()


# ------------------------------------------------------------------ load generators


def perf_analyzer_env() -> dict:
    libs = REPO / ".venv" / "perf-analyzer-libs"
    paths = [libs / "cudart" / "nvidia" / "cuda_runtime" / "lib", libs / "deb" / "usr" / "lib" / "x86_64-linux-gnu"]
    return dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(map(str, paths)))


def perf_analyzer_data(photos: list[bytes], path: Path) -> Path:
    """Each photo as one BYTES element: base64 of Triton's length-prefixed form."""
    steps = [{"image": {"b64": base64.b64encode(struct.pack("<I", len(p)) + p).decode(), "shape": [1]}}
             for p in photos]
    path.write_text(json.dumps({"data": steps}))
    return path


def run_perf_analyzer(target: str, model: str, concurrency: int, data: Path, window_ms: int, extra: list[str],
                      out: Path) -> dict:
    """One perf_analyzer measurement; throughput, p50/p99 (ms) and its own CPU time per request.
    A window with no answer at all (a stalled shared machine) is measured again, twice as long."""
    for attempt in range(3):
        try:
            return _perf_analyzer_once(target, model, concurrency, data, window_ms * 2 ** attempt, extra, out)
        except RuntimeError as e:
            if attempt == 2 or "No valid requests recorded" not in str(e):
                raise
            print(f"perf_analyzer on {model} c={concurrency}: no answer in a window; measuring again", flush=True)


def _perf_analyzer_once(target: str, model: str, concurrency: int, data: Path, window_ms: int, extra: list[str],
                        out: Path) -> dict:
    report = out / f"pa-{model}-{concurrency}-{time.monotonic_ns()}.csv"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([str(Path(sys.executable).parent / "perf_analyzer"), "-m", model, "-u", target, "-i", "grpc",
                           "--input-data", str(data), "--concurrency-range", str(concurrency),
                           "--measurement-interval", str(window_ms), "--max-trials", "3",
                           # no stability gate: a busy shared machine is noisy; windows give the spread
                           "--stability-percentage", "1000000", "-f", str(report), *extra],
                          env=perf_analyzer_env(), capture_output=True, text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed on {model}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    row = next(csv.DictReader(report.open()))
    report.unlink()
    throughput = float(row["Inferences/Second"])
    requests = max(1.0, throughput * 3 * window_ms / 1000)  # three windows measured (the warm-up is not counted)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"throughput": throughput, "p50": float(row["p50 latency"]) / 1000, "p99": float(row["p99 latency"]) / 1000,
            "client_cpu_ms": 1000 * cpu_s / requests, "errors": 0}


async def _closed_loop(send, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    latencies, errors = [], 0
    stop = time.perf_counter() + seconds
    cpu0 = time.process_time()

    async def worker(i: int):
        nonlocal errors
        n = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                await send(photos[n % len(photos)])
                latencies.append((time.perf_counter() - t0) * 1000)
            except Exception:
                errors += 1
            n += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"throughput": len(latencies) / elapsed, "p50": pct(0.5), "p99": pct(0.99),
            "client_cpu_ms": 1000 * cpu / max(1, len(latencies)), "errors": errors}


def python_load(kind: str, target: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    """The shared Python generator: HTTP POST (Ray Serve) or a pre-serialized v2 ModelInfer (catcascade)."""
    async def main():
        if kind == "http":
            import aiohttp

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
                async def send(photo):
                    async with session.post(f"http://{target}/", data=photo) as r:
                        r.raise_for_status()
                        await r.read()
                await _closed_loop(send, photos[:2], 1, 0.5)  # warm-up
                return await _closed_loop(send, photos, concurrency, seconds)
        import grpc
        from tritonclient.grpc import service_pb2 as v2

        bodies = {}
        for photo in photos:
            req = v2.ModelInferRequest(model_name="catcascade")
            req.inputs.add(name="image", datatype="BYTES", shape=[1])
            req.raw_input_contents.append(struct.pack("<I", len(photo)) + photo)
            req.parameters["escalation"].string_param = "never"
            bodies[photo] = req.SerializeToString()
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

            async def send(photo):
                await call(bodies[photo], timeout=30)
            await _closed_loop(send, photos[:2], 1, 0.5)
            return await _closed_loop(send, photos, concurrency, seconds)
    return asyncio.run(main())


# ------------------------------------------------------------------ the ceiling


class Ceiling:
    """In-process, no server: decode+ORT on two threads with one ORT thread each (batches of 1
    and 8), or one thread with a two-thread ORT session (batches of 8); the best counts; and one
    image alone (decode alone, and decode+ORT). Measured in every window, like the servers."""

    def __init__(self, bundle: Path, photos: list[bytes]):
        from catcascade.cnn_stage.preprocessing import PreprocessConfig

        self.photos = photos
        self.singles = [PeerModel(bundle), PeerModel(bundle)]
        self.wide = PeerModel(bundle, threads=2)
        self.cfg = PreprocessConfig.from_dict(json.loads((bundle / "manifest.json").read_text())["preprocess"])

    def _throughput(self, models: list[PeerModel], batch: int, seconds: float) -> float:
        counts = [0] * len(models)

        def loop(i):
            stop, n = time.perf_counter() + seconds, i * 7
            while time.perf_counter() < stop:
                models[i]([self.photos[(n + k) % len(self.photos)] for k in range(batch)])
                counts[i] += batch
                n += batch
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(models))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    def measure(self, seconds: float) -> dict:
        from catcascade.cnn_stage.preprocessing import decode_image

        best = max(self._throughput(models, batch, seconds / 2)
                   for models, batch in ((self.singles, 1), (self.singles, 8), ([self.wide], 8)))
        one, wide, decode = [], [], []
        for i in range(40):
            photo = self.photos[i % len(self.photos)]
            t0 = time.perf_counter()
            decode_image(photo, self.cfg.limits, draft_size=self.cfg.scale_size)
            t1 = time.perf_counter()
            self.singles[0]([photo])
            t2 = time.perf_counter()
            self.wide([photo])
            one.append((t2 - t1) * 1000)
            wide.append((time.perf_counter() - t2) * 1000)
            decode.append((t1 - t0) * 1000)
        # the faster of one and two ORT threads: the best an in-process caller could do alone
        return {"throughput": best, "c1_p50_ms": min(statistics.median(one), statistics.median(wide)),
                "c1_p50_one_thread_ms": statistics.median(one), "c1_p50_two_threads_ms": statistics.median(wide),
                "decode_p50_ms": statistics.median(decode)}


# ------------------------------------------------------------------ the run


class Process:
    def __init__(self, cmd: list[str], log: Path, env: dict | None = None, ready: str | None = "ready"):
        self.cmd, self.env, self.ready = cmd, env, ready
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=REPO)

    def wait_or_restart(self, tries: int = 3) -> None:
        """Waits for it to be ready, starting it again when it fails: on a busy machine PyTriton's
        model handshake can time out."""
        for attempt in range(tries):
            try:
                return self.wait()
            except (RuntimeError, TimeoutError) as e:
                if attempt == tries - 1:
                    raise
                print(f"{e}: starting it again", flush=True)
                self.proc.kill()
                self.proc.wait()
                self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, env=self.env, cwd=REPO)

    def wait(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if self.ready in line:
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[:4]} exited with {self.proc.returncode}; see {self.log.name}")
        raise TimeoutError(f"{self.proc.args[:4]} not ready; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def load_photos(data: Path, n: int) -> list[bytes]:
    paths = sorted(data.glob("*/*.jpg"))[:: max(1, len(sorted(data.glob("*/*.jpg"))) // n)][:n]
    if not paths:
        raise SystemExit(f"no photos under {data}/*/*.jpg (the bench needs real JPEGs: --data DIR)")
    return [p.read_bytes() for p in paths]


def _ready_grpc(target: str, timeout: float = 120) -> None:
    import tritonclient.grpc as tc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if tc.InferenceServerClient(target).is_server_ready():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{target} not ready")


def run(args) -> dict:
    from benchmarks.latency import make_speed_bundle

    if not args.data:
        raise SystemExit("--data DIR is required: real photos (DIR/<label>/*.jpg)")

    import tempfile

    out = Path(tempfile.mkdtemp(prefix="bench-peers-"))  # server logs, perf_analyzer's input and reports
    print(f"server logs in {out}", flush=True)
    bundle = make_speed_bundle(Path(args.bundle))
    photos = load_photos(Path(args.data), args.photos)
    data = perf_analyzer_data(photos, out / "photos.json")
    ceiling = Ceiling(bundle, photos)
    results = {"ceilings": [], "windows": [], "concurrency": args.concurrency, "cpus": os.cpu_count(),
               "window_s": args.window_s, "load_before": os.getloadavg()[0]}
    port = args.port
    env = dict(os.environ, PYTHONPATH=str(REPO))
    servers = {
        "catcascade": Process([sys.executable, "-m", "catcascade", "serve", "--bundle", str(bundle), "--port", str(port)],
                              out / "catcascade.log", ready="catcascade serving"),
        "ray": Process([sys.executable, "-m", "benchmarks.peers", "serve-ray", str(bundle), str(port + 10)],
                       out / "ray.log", env=env),
    }
    for i, variant in enumerate(args.catcascade_variant):  # other designs of catcascade, beside the default
        servers[f"variant{i}"] = Process([sys.executable, "-m", "catcascade", "serve", "--config", variant, "--bundle",
                                          str(bundle), "--port", str(port + 30 + i)], out / f"variant{i}.log",
                                         ready="catcascade serving")
    if Path(args.pytriton_python).exists():
        servers["triton"] = Process([args.pytriton_python, "-m", "benchmarks.peers", "serve-pytriton", str(bundle),
                                     str(port + 20)], out / "triton.log", env=env)
    else:
        results["triton_missing"] = f"{args.pytriton_python} not found (make bench-peers creates it)"
    try:
        for p in servers.values():
            p.wait_or_restart()
        _ready_grpc(f"127.0.0.1:{port}")
        if "triton" in servers:
            _ready_grpc(f"127.0.0.1:{port + 20}")
        window_ms = int(args.window_s * 1000 / 3)
        runs = {
            "catcascade (perf_analyzer)": lambda c: run_perf_analyzer(
                f"127.0.0.1:{port}", "catcascade", c, data, window_ms,
                ["--request-parameter", "escalation:never:string"], out),
            "Triton/PyTriton (perf_analyzer)": lambda c: run_perf_analyzer(
                f"127.0.0.1:{port + 20}", MODEL, c, data, window_ms, [], out),
            "catcascade (Python generator)": lambda c: python_load("grpc", f"127.0.0.1:{port}", photos, c,
                                                                   args.window_s),
            "Ray Serve (Python generator)": lambda c: python_load("http", f"127.0.0.1:{port + 10}", photos, c,
                                                                  args.window_s),
        }
        if "triton" not in servers:
            runs.pop("Triton/PyTriton (perf_analyzer)")
        results["baselines"] = dict(BASELINE)
        for i, variant in enumerate(args.catcascade_variant):
            name = f"catcascade {Path(variant).stem} (perf_analyzer)"
            runs[name] = (lambda target: lambda c: run_perf_analyzer(
                target, "catcascade", c, data, window_ms, ["--request-parameter", "escalation:never:string"], out)
            )(f"127.0.0.1:{port + 30 + i}")
            results["baselines"][name] = "catcascade (perf_analyzer)"
        for w in range(args.windows):
            results["ceilings"].append(ceiling.measure(args.window_s))
            print(f"window {w} ceiling: {results['ceilings'][-1]}", flush=True)
            window = {}
            names = list(runs)
            names = names[w % len(names):] + names[:w % len(names)]  # rotate the order each window
            for c in args.concurrency:
                for name in names:
                    window.setdefault(name, {})[str(c)] = r = runs[name](c)
                    print(f"window {w} c={c} {name}: {r['throughput']:.1f}/s p50 {r['p50']:.1f} ms "
                          f"p99 {r['p99']:.1f} ms", flush=True)
            results["windows"].append(window)
    finally:
        for p in servers.values():
            p.stop()
    results["load_after"] = os.getloadavg()[0]
    results["ceiling"] = {k: statistics.median(c[k] for c in results["ceilings"]) for k in results["ceilings"][0]}
    return results


# ------------------------------------------------------------------ the report


BASELINE = {"Triton/PyTriton (perf_analyzer)": "catcascade (perf_analyzer)",
            "Ray Serve (Python generator)": "catcascade (Python generator)"}


def summarize(results: dict) -> list[dict]:
    rows = []
    names = list(results["windows"][0])
    for c in map(str, results["concurrency"]):
        for name in names:
            ws = [w[name][c] for w in results["windows"]]
            row = {"server": name, "concurrency": int(c),
                   **{k: statistics.median(w[k] for w in ws) for k in ("throughput", "p50", "p99", "client_cpu_ms")},
                   "errors": sum(w["errors"] for w in ws)}
            base = results.get("baselines", BASELINE).get(name)
            if base:
                ratios = [w[name][c]["throughput"] / w[base][c]["throughput"] for w in results["windows"]]
                p50s = [w[name][c]["p50"] / w[base][c]["p50"] for w in results["windows"]]
                row["ratio"] = (statistics.median(ratios), min(ratios), max(ratios))
                row["p50_ratio"] = (statistics.median(p50s), min(p50s), max(p50s))
            rows.append(row)
    return rows


def targets(results: dict, rows: list[dict]) -> list[str]:
    """The issue's targets, each with its arithmetic."""
    def get(name, c):
        return next((r for r in rows if r["server"] == name and r["concurrency"] == c), None)

    ours = "catcascade (perf_analyzer)"
    cmax, cmin = max(results["concurrency"]), min(results["concurrency"])
    lines = []
    ceiling = results["ceiling"]
    peers = [r for r in rows if r["server"] in BASELINE and r["concurrency"] == cmax]
    for peer in peers:
        lo, mid, hi = peer["ratio"][1], peer["ratio"][0], peer["ratio"][2]
        met = "met" if mid <= 1.0 else "missed"
        lines.append(f"- Throughput at c={cmax}: {peer['server']} / catcascade = {mid:.2f} (windows {lo:.2f}-{hi:.2f}); "
                     f"catcascade at least matches it: {met}.")
    for peer in [r for r in rows if r["server"] in BASELINE and r["concurrency"] == cmin]:
        mid = peer["p50_ratio"][0]
        lines.append(f"- p50 at c={cmin}: {peer['server']} / catcascade = {mid:.2f} "
                     f"({peer['p50']:.1f} ms vs {get(BASELINE[peer['server']], cmin)['p50']:.1f} ms); "
                     f"catcascade at least as fast: {'met' if mid >= 1.0 else 'missed'}.")
    top = get(ours, cmax)
    if top:
        share = top["throughput"] / ceiling["throughput"]
        lines.append(f"- c={cmax}: catcascade {top['throughput']:.1f}/s = {share:.0%} of the in-process decode+ORT "
                     f"ceiling {ceiling['throughput']:.1f}/s (target 85%): {'met' if share >= 0.85 else 'missed'}.")
    one = get(ours, cmin)
    if one:
        added = one["p50"] - ceiling["c1_p50_ms"]
        lines.append(f"- c={cmin}: catcascade p50 {one['p50']:.2f} ms - in-process decode+ORT p50 "
                     f"{ceiling['c1_p50_ms']:.2f} ms = {added:+.2f} ms added (target at most +1.5 ms): "
                     f"{'met' if added <= 1.5 else 'missed'}.")
    triton = "Triton/PyTriton (perf_analyzer)"
    for variant in [n for n in results.get("baselines", {}) if n not in BASELINE]:
        v1, vmax, t1, tmax = get(variant, cmin), get(variant, cmax), get(triton, cmin), get(triton, cmax)
        if v1 and vmax and t1 and tmax:
            lines.append(f"- Another design, {variant}: p50 at c={cmin} {v1['p50']:.1f} ms (Triton {t1['p50']:.1f} ms, "
                         f"default {one['p50']:.1f} ms); c={cmax} {vmax['throughput']:.1f}/s (Triton "
                         f"{tmax['throughput']:.1f}/s, default {top['throughput']:.1f}/s).")
    return lines


def report(results: dict) -> str:
    rows = summarize(results)
    c = results["ceiling"]
    lines = [f"Real photos, the 224 px ConvNeXt speed bundle, {results['cpus']} cores shared by every server and the "
             f"client (load average {results['load_before']:.1f} before, {results['load_after']:.1f} after: other jobs "
             f"share the machine); {len(results['windows'])} alternating windows of {results['window_s']:.0f} s per cell. "
             f"Medians across windows; ratios are peer / catcascade under the same load generator "
             "(median, range across windows); client CPU is the load generator's own CPU time per request.", "",
             "| server | c | req/s | p50 ms | p99 ms | throughput ratio | p50 ratio | client CPU ms/req | errors |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in rows:
        ratio = f"{r['ratio'][0]:.2f} ({r['ratio'][1]:.2f}-{r['ratio'][2]:.2f})" if "ratio" in r else ""
        p50r = f"{r['p50_ratio'][0]:.2f} ({r['p50_ratio'][1]:.2f}-{r['p50_ratio'][2]:.2f})" if "p50_ratio" in r else ""
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
                     f"| {ratio} | {p50r} | {r['client_cpu_ms']:.2f} | {r['errors']} |")
    lines += ["", f"In-process ceiling (no server; the best of two one-thread ORT sessions on two threads, batches "
              f"of 1 and 8, and one two-thread session, batches of 8): {c['throughput']:.1f} images/s; one image alone: "
              f"decode+ORT p50 {c['c1_p50_ms']:.2f} ms (the faster of one ORT thread, "
              f"{c.get('c1_p50_one_thread_ms', float('nan')):.2f} ms, and two, "
              f"{c.get('c1_p50_two_threads_ms', float('nan')):.2f} ms), of which decode {c['decode_p50_ms']:.2f} ms.", ""]
    if "triton_missing" in results:
        lines += [f"Triton was not measured: {results['triton_missing']}.", ""]
    lines += ["Targets:", "", *targets(results, rows)]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in results["windows"][0]:
        pts = [r for r in rows if r["server"] == name]
        a.plot([r["concurrency"] for r in pts], [r["throughput"] for r in pts], marker="o", label=name)
        b.plot([r["concurrency"] for r in pts], [r["p50"] for r in pts], marker="o", label=name)
    a.axhline(results["ceiling"]["throughput"], color="grey", ls="--", label="in-process ceiling")
    a.set(xlabel="concurrency", ylabel="images/s", title="Throughput")
    b.set(xlabel="concurrency", ylabel="ms", title="p50 latency")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("serve-pytriton", "serve-ray"):
        (serve_pytriton if argv[0] == "serve-pytriton" else serve_ray)(Path(argv[1]), int(argv[2]))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="artifacts/speed-bundle-224", help="speed bundle (built when missing)")
    p.add_argument("--data", help="folder of real photos (DIR/<label>/*.jpg); required unless --from-json")
    p.add_argument("--photos", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window-s", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--port", type=int, default=18500)
    p.add_argument("--pytriton-python", default=str(REPO / ".venv" / "pytriton" / "bin" / "python"),
                   help="Python of the PyTriton environment (make bench-peers makes it)")
    p.add_argument("--catcascade-variant", action="append", default=[], metavar="YAML",
                   help="also serve catcascade with this ServeConfig (another design), measured beside the default")
    p.add_argument("--out", default="docs/bench/peers")
    p.add_argument("--update-doc", help="rewrite this page's bench:peers section")
    p.add_argument("--from-json", type=Path, help="only write the report of an earlier run's peers.json")
    args = p.parse_args(argv)
    results = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (out / "peers.md").write_text("# catcascade against Triton and Ray Serve\n\n" + text + "\n")
    plot(results, out / "peers.png")
    print(text)
    if args.update_doc:
        from benchmarks.doc_tables import relative_link, replace_between_markers

        link = relative_link(out, Path(args.update_doc))
        replace_between_markers(Path(args.update_doc), "peers", text + f"\n\n![peers]({link}/peers.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
