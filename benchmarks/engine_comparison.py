"""`catcascade bench-latency --engine local ray ...`: the same front door with the CNN stage run
locally or on Ray Serve, measured in one run on the same photos, so the Ray hop's cost is a
ratio, not a guess.

Engines: ``local`` (the batcher in the server process), ``ray`` (decode and ONNX Runtime on a
CnnStage replica, the front door sends the JPEG bytes) and ``ray-front-door`` (the front door
decodes and sends the float tensor). The Ray engines run against a two-node Ray cluster on
loopback started here, with one CNN replica each (autoscaling off, so every window measures
the same layout) and the same ONNX Runtime layout as the local server. All servers stay up and
measurement windows alternate between them (A B C A B C ...), so the drift of a shared machine
lands on every engine alike. Reports p50 at concurrency 1, throughput at concurrency 16, and
their ratios against ``local``.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
from pathlib import Path

ENGINES = ("local", "ray", "ray-front-door")


def _server_config(args, engine: str, address: str | None, out_dir: Path) -> Path:
    import yaml

    cfg = {"bundle": str(args.bundle), "batching": {"max_batch_size": args.max_batch_size,
                                                     "instances": args.instances}}
    if args.threads:
        cfg["cnn_threads"] = args.threads
    if engine != "local":
        cfg["engine"] = "ray"
        cfg["ray"] = {"address": address, "app_name": f"bench-{engine}",
                      "decode": "front_door" if engine == "ray-front-door" else "replica",
                      "cnn": {"num_replicas": 1, "num_cpus": 1}}
    path = out_dir / f"serve-{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _median(runs, key) -> float:
    return statistics.median(key(r) for r in runs)


def report(results: dict) -> str:
    rows = results["engines"]
    base = rows.get("local")
    lines = [
        "# CNN stage: local vs Ray Serve (same front door, same photos, one run)", "",
        f"Machine: {results['machine']}, load average {results['load_average']['before']:.1f} before and "
        f"{results['load_average']['after']:.1f} after (a shared machine). Mode never. "
        f"{results['repeats']} alternating windows per engine and "
        "concurrency; medians across windows, [min - max]. Ray: two nodes on loopback, one CnnStage replica "
        "(2 logical CPUs of 2 per node), gRPC transport between front door and replica. Milliseconds.", "",
        "| engine | decode runs on | p50 c=1 | p90 c=1 | req/s c=16 | p50 c=16 | decode | cnn queue + hop | cnn "
        "| p50 c=1 vs local | req/s c=16 vs local |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        where = {"local": "front door (local)", "ray": "CNN replica", "ray-front-door": "front door"}[name]
        vs_p50, vs_tp = "-", "-"
        if base and name != "local":
            lo, hi = r["c1_p50_added_ms_range"]
            vs_p50 = f"{r['c1_p50_added_ms']:+.2f} ms [{lo:+.1f} - {hi:+.1f}]"
            lo, hi = r["c16_throughput_ratio_range"]
            vs_tp = f"{r['c16_throughput_ratio']:.2f}x [{lo:.2f}-{hi:.2f}]"
        lines.append(
            f"| {name} | {where} | {r['c1_p50']:.2f} [{r['c1_p50_min']:.2f}-{r['c1_p50_max']:.2f}] | "
            f"{r['c1_p90']:.2f} | {r['c16_rps']:.0f} [{r['c16_rps_min']:.0f}-{r['c16_rps_max']:.0f}] | "
            f"{r['c16_p50']:.1f} | {r['stages_c1']['decode_ms']:.2f} | {r['stages_c1']['cnn_queue_ms']:.2f} | "
            f"{r['stages_c1']['cnn_ms']:.2f} | {vs_p50} | {vs_tp} |")
    lines += ["", "The `vs local` columns are paired: each window against the local window measured right "
              "beside it, median [min - max] over the pairs. "
              "Stage columns are medians at concurrency 1 as the server reports them; for Ray engines "
              "`cnn queue + hop` is the CNN call's time at the front door minus the replica's decode and "
              "compute, i.e. the Ray hop plus the replica's batch queue.", ""]
    return "\n".join(lines)


def plot(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["engines"]
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(names, [rows[n]["c1_p50"] for n in names], color="#4c72b0")
    axes[0].set_ylabel("p50 ms at concurrency 1")
    axes[1].bar(names, [rows[n]["c16_rps"] for n in names], color="#55a868")
    axes[1].set_ylabel("requests/s at concurrency 16")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("CNN stage: local vs Ray Serve (same front door)")
    fig.tight_layout()
    fig.savefig(out_dir / "engines.png", dpi=110)
    plt.close(fig)


def update_doc(page: Path, md: str, out_dir: Path) -> None:
    """Swaps the text between the page's bench:engines markers for the new table and plot."""
    from benchmarks.doc_tables import relative_link, replace_between_markers

    body = md.split("\n", 2)[2].strip() + f"\n\n![engines]({relative_link(out_dir, page)}/engines.png)"
    replace_between_markers(page, "engines", body)


def main(args, server_cls, closed_loop, load_images, make_speed_bundle) -> int:
    """Called by bench-latency with its own server launcher and load generator (so both
    benchmarks drive servers the same way)."""
    from contextlib import ExitStack

    from rich.console import Console
    from tqdm import tqdm

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.vlm_stage.vllm_server import free_port

    console = Console(width=200)
    unknown = [e for e in args.engine if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.bundle is None:
        args.bundle = Path(f"artifacts/speed-bundle-{args.image_size}")
    if not (args.bundle / "manifest.json").is_file():
        make_speed_bundle(args.bundle, args.image_size)
    images = load_images(args.images)
    mode = pb.ESCALATION_MODE_NEVER
    servers: dict = {}
    windows: dict[str, dict[int, list]] = {e: {1: [], 16: []} for e in args.engine}
    with ExitStack() as stack:
        address = None
        if any(e != "local" for e in args.engine):
            from catcascade.serving.engines.ray_local_cluster import local_cluster

            address = stack.enter_context(local_cluster(nodes=2, cpus_per_node=2)).address
            console.print(f"Ray cluster (2 nodes, loopback) at {address}")
        for engine in args.engine:
            extra = ["--config", str(_server_config(args, engine, address, out_dir))]
            server = server_cls(args.bundle, free_port(), None, out_dir / f"server-{engine}.log", extra)
            stack.callback(server.stop)
            server.wait_ready()
            servers[engine] = server
            asyncio.run(closed_loop(server.target, images, mode, 4, args.warmup, 60))
            console.print(f"{engine}: ready at {server.target}")
        load_before = os.getloadavg()
        for _ in tqdm(range(args.repeats), desc="alternating windows"):
            for c in (1, 16):
                for engine, server in servers.items():
                    windows[engine][c].append(asyncio.run(closed_loop(
                        server.target, images, mode, c, args.max_requests, args.max_seconds)))
    rows = {}
    for engine, w in windows.items():
        c1, c16 = w[1], w[16]
        rows[engine] = {
            "c1_p50": _median(c1, lambda r: r.pct(50)), "c1_p50_min": min(r.pct(50) for r in c1),
            "c1_p50_max": max(r.pct(50) for r in c1), "c1_p90": _median(c1, lambda r: r.pct(90)),
            "c16_rps": _median(c16, lambda r: r.throughput), "c16_rps_min": min(r.throughput for r in c16),
            "c16_rps_max": max(r.throughput for r in c16), "c16_p50": _median(c16, lambda r: r.pct(50)),
            "errors": sum(sum(v for k, v in r.codes.items() if k != "OK") for r in c1 + c16),
            "stages_c1": {k: statistics.median(r.stage_ms[k] for r in c1) for k in c1[0].stage_ms},
            "batch_sizes_c16": {str(k): sum(r.batch_sizes.get(k, 0) for r in c16)
                                for k in sorted({b for r in c16 for b in r.batch_sizes})},
            "c1_p50_windows": [r.pct(50) for r in c1], "c16_rps_windows": [r.throughput for r in c16],
        }
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
               "repeats": args.repeats, "bundle": str(args.bundle), "engines": rows,
               "load_average": {"before": load_before[0], "after": os.getloadavg()[0]}}
    if "local" in rows:  # paired: each window against the local window measured right beside it
        base = rows["local"]
        for engine, r in rows.items():
            added = [a - b for a, b in zip(r["c1_p50_windows"], base["c1_p50_windows"])]
            ratio = [a / b for a, b in zip(r["c16_rps_windows"], base["c16_rps_windows"])]
            r["c1_p50_added_ms"] = statistics.median(added)
            r["c1_p50_added_ms_range"] = [min(added), max(added)]
            r["c16_throughput_ratio"] = statistics.median(ratio)
            r["c16_throughput_ratio_range"] = [min(ratio), max(ratio)]
    (out_dir / "engines.json").write_text(json.dumps(results, indent=1))
    md = report(results)
    (out_dir / "engines.md").write_text(md)
    plot(results, out_dir)
    console.print(md, markup=False)
    console.print(f"written: {out_dir}/engines.json, engines.md, engines.png")
    if args.update_doc:
        update_doc(args.update_doc, md, out_dir)
    return 0
