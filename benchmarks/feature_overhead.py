"""The parts of `catcascade bench-latency --features` (benchmarks/latency.py runs it): what the
response cache, tracing, tenant budgets, drift signals and priorities cost, off and on, in one run.

Two measurements:

1. End to end over gRPC: one `catcascade serve` process per configuration, all started
   together and measured in turns (configuration A, B, C, ..., then again), so a slow spell of
   this shared machine hits every configuration alike. Closed loop at concurrency 1 and 8,
   p50 and throughput as ratios to the baseline with every feature off. Tracing exports over
   OTLP/gRPC to a span sink in this process (the spans are counted, so "on" really exported).
2. In process: what a request runs for each feature while it is off (the disabled hooks), in
   nanoseconds, and as a share of the baseline's p50 at concurrency 1. Priorities have no off
   state: the CNN queue is always a priority queue, so its price is a PriorityQueue against
   the plain FIFO queue it replaced, per request.
"""
from __future__ import annotations

import asyncio
import os
import platform
import statistics
import time
import timeit
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOKEN = "bench-token"
FEATURES_OFF = {"drift": {"enabled": False}}


@dataclass
class FeatureConfig:
    name: str
    """Shown in the report."""
    serve: dict
    """ServeConfig fields on top of the baseline's."""
    token: str | None = None
    unique_images: bool = False
    """Every request a new byte string (cache misses), else the same 64 images over and over."""
    runs: dict = field(default_factory=dict)


def configurations(sink: str) -> list[FeatureConfig]:
    budgets = {"default": {"rate_per_s": 1000.0, "burst": 1000}}
    return [
        FeatureConfig("baseline: every feature off", dict(FEATURES_OFF)),
        FeatureConfig("drift signals on (the default)", {}),
        FeatureConfig("tracing on (OTLP/gRPC, batch export)", {**FEATURES_OFF, "tracing": {
            "exporter": "otlp", "otlp_endpoint": sink}}),
        FeatureConfig("response cache on, all misses", {**FEATURES_OFF, "cache": {"enabled": True}},
                      unique_images=True),
        FeatureConfig("response cache on, all hits", {**FEATURES_OFF, "cache": {"enabled": True}}),
        FeatureConfig("bearer auth (reference for the next row)", {**FEATURES_OFF, "auth": {
            "bearer_tokens": [TOKEN]}}, token=TOKEN),
        FeatureConfig("bearer auth + tenant budgets", {**FEATURES_OFF, "auth": {"tenants": {"bench": TOKEN}},
                                                       "tenant_budgets": budgets}, token=TOKEN),
    ]


class SpanSink:
    """An OTLP/gRPC trace collector that keeps only a count of what it received."""

    def __init__(self):
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans = 0

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                sink.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(1)


def off_path_costs(repeats: int = 200_000) -> dict[str, float]:
    """Nanoseconds per request of what each feature runs while it is off (the exact hooks the
    pipeline and servicer call), and of the priority queue against a FIFO one."""
    from catcascade.serving.observability.tracing import NoTracing

    tracing = NoTracing()

    class Holder:  # the servicer's and pipeline's attributes when the features are off
        cache = tenants = drift = tenant_budgets = None

    h = Holder()

    def tracing_off():
        if tracing.enabled:
            pass
        with tracing.stage("decode"):
            pass
        if tracing.enabled:
            pass
        with tracing.stage("vlm"):
            pass
        with tracing.stage("blend"):
            pass

    def cache_off():
        if h.cache is None:
            return

    def tenants_off():
        if h.tenants is not None:
            pass
        if h.tenants is not None:
            pass
        if h.tenant_budgets is not None:
            pass

    def drift_off():
        if h.drift is not None:
            pass

    def ns(fn) -> float:
        return min(timeit.repeat(fn, number=repeats, repeat=5)) / repeats * 1e9

    out = {"tracing": ns(tracing_off), "response cache": ns(cache_off), "tenant budgets": ns(tenants_off),
           "drift signals": ns(drift_off)}

    async def queue_cost(kind) -> float:
        q = kind()
        items = [(i % 2, i, None) for i in range(64)]
        t0 = time.perf_counter()
        for _ in range(repeats // 64):
            for it in items:
                q.put_nowait(it)
            for _ in items:
                q.get_nowait()
        return (time.perf_counter() - t0) / (repeats // 64 * 64) * 1e9

    fifo = min(asyncio.run(queue_cost(asyncio.Queue)) for _ in range(3))
    prio = min(asyncio.run(queue_cost(asyncio.PriorityQueue)) for _ in range(3))
    out["priorities (priority queue minus FIFO, 64 queued)"] = prio - fifo
    return out


def on_path_costs(image: bytes, sink_endpoint: str, repeats: int = 2000) -> dict[str, float]:
    """Microseconds per request of each feature's own work when on, in process: what the
    end-to-end rows above include, without the noise of a shared machine. Tracing exports over
    OTLP to ``sink_endpoint`` (a `SpanSink`), in its background thread as in the server."""
    from prometheus_client import CollectorRegistry

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.observability.drift import DriftConfig, DriftMonitor
    from catcascade.serving.observability.tracing import OtelTracing, TracingConfig
    from catcascade.serving.traffic.response_cache import ResponseCache, ResponseCacheConfig, cache_key
    from catcascade.serving.traffic.tenant_budgets import TenantBudgets, TenantBudgetsConfig, TokenBucketConfig
    from catcascade.serving.front_door.authentication import Authenticator

    response = pb.ClassifyResponse(request_id="r" * 32, labels=[pb.LabelScore(label="Bengal", probability=0.5)] * 3,
                                   cnn_top_k=[pb.LabelScore(label="Bengal", probability=0.5)] * 3)
    cache = ResponseCache(ResponseCacheConfig(), size_of=lambda r: r.ByteSize(), registry=CollectorRegistry())
    keys = iter(range(10 ** 9))

    def cache_miss():  # key, lookup, store (a miss; a hit skips the store and the models)
        key = cache_key(image + str(next(keys)).encode(), 0, 3, "bundle|cnn|vlm")
        if cache.get(key) is None:
            cache.put(key, response)

    budgets = TenantBudgets(TenantBudgetsConfig(default=TokenBucketConfig(rate_per_s=1e9, burst=1e9)),
                            ["acme"], registry=CollectorRegistry())
    authenticator = Authenticator(["tok"], {"acme": "tok"})
    metadata = (("authorization", "Bearer tok"), ("user-agent", "grpc-python"))

    def tenants_on():
        tenant = authenticator.identify(metadata)
        budgets.count_request(tenant)
        budgets.allow_escalation(tenant)

    drift = DriftMonitor("v1", None, DriftConfig(), CollectorRegistry())

    def drift_on():
        drift.observe(0.7, True, True)

    tracing = OtelTracing(TracingConfig(exporter="otlp", otlp_endpoint=sink_endpoint))
    traceparent = [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]

    def tracing_on():  # the request span and the five stage spans of an escalated request
        with tracing.request_span("catcascade.Classify", traceparent) as span:
            with tracing.stage("decode"):
                pass
            tracing.record_stage("cnn_queue", 1, 2)
            tracing.record_stage("cnn", 2, 3, {"catcascade.cnn.batch_size": 1})
            with tracing.stage("vlm"):
                tracing.outgoing_headers()
            with tracing.stage("blend"):
                pass
            tracing.annotate(span, {"catcascade.escalation_reason": "ESCALATION_REASON_LOW_CONFIDENCE"})

    def us(fn, number: int = repeats) -> float:
        return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6

    def tracing_us() -> float:  # rounds small enough for the export queue (2048 spans), drained between
        times = []
        for _ in range(5):
            times.append(timeit.timeit(tracing_on, number=300) / 300 * 1e6)
            tracing.provider.force_flush()
        return min(times)

    out = {"tracing (6 spans, batch export)": tracing_us(),
           f"response cache (sha256 of a {len(image) // 1024} KB image, lookup, store)": us(cache_miss),
           "tenant budgets (token to tenant, bucket, metrics)": us(tenants_on), "drift signals": us(drift_on)}
    tracing.provider.shutdown()
    return out


def summarize(configs: list[FeatureConfig], off: dict, spans: int, args, bundle: Path, on: dict | None = None) -> dict:
    base = configs[0]
    rows = []
    for cfg in configs:
        row = {"name": cfg.name, "serve": cfg.serve}
        for c, runs in cfg.runs.items():
            p50 = [r.pct(50) for r in runs]
            thr = [r.throughput for r in runs]
            # Paired: each round's value over the baseline's in the same round (measured minutes
            # apart at most), so a slow spell of the machine divides out.
            p50_ratios = [r.pct(50) / b.pct(50) for r, b in zip(runs, base.runs[c])]
            thr_ratios = [r.throughput / b.throughput for r, b in zip(runs, base.runs[c])]
            errors = sum(n for r in runs for code, n in r.codes.items() if code != "OK")
            row[f"c{c}"] = {"p50": statistics.median(p50), "p50_min": min(p50), "p50_max": max(p50),
                            "p99": statistics.median(r.pct(99) for r in runs), "throughput": statistics.median(thr),
                            "p50_ratio": statistics.median(p50_ratios), "p50_ratio_min": min(p50_ratios),
                            "p50_ratio_max": max(p50_ratios), "throughput_ratio": statistics.median(thr_ratios),
                            "throughput_ratio_min": min(thr_ratios), "throughput_ratio_max": max(thr_ratios),
                            "errors": errors}
        rows.append(row)
    base_p50_c1 = rows[0]["c1"]["p50"]
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "bundle": str(bundle), "repeats": args.repeats, "max_seconds": args.max_seconds, "rows": rows,
            "spans_exported": spans,
            "off_path_ns": {k: {"ns": v, "share_of_c1_p50": v / (base_p50_c1 * 1e6)} for k, v in off.items()},
            "on_path_us": {k: {"us": v, "share_of_c1_p50": v / (base_p50_c1 * 1e3)} for k, v in (on or {}).items()}}


def report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; `{results['bundle']}`, NEVER mode, real Oxford JPEGs. Each "
             f"configuration is its own server process, all measured in turns, {results['repeats']} rounds; "
             "p50: median across rounds [min-max]. Ratios: each round's value over the baseline's in the "
             "same round, median [min-max] across rounds.", "",
             "| configuration | c=1 p50 ms | c=1 p50 ratio | c=8 p50 ms | c=8 p50 ratio | c=8 req/s | c=8 req/s ratio | "
             "errors |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        c1, c8 = row["c1"], row["c8"]
        def ratio(d, k):
            return f"{d[k]:.2f} [{d[k + '_min']:.2f}-{d[k + '_max']:.2f}]"

        lines.append(f"| {row['name']} | {c1['p50']:.2f} [{c1['p50_min']:.2f}-{c1['p50_max']:.2f}] | "
                     f"{ratio(c1, 'p50_ratio')} | {c8['p50']:.2f} [{c8['p50_min']:.2f}-{c8['p50_max']:.2f}] | "
                     f"{ratio(c8, 'p50_ratio')} | {c8['throughput']:.0f} | {ratio(c8, 'throughput_ratio')} | "
                     f"{c1['errors'] + c8['errors']} |")
    lines += ["", f"Spans received by the OTLP sink while tracing was on: {results['spans_exported']}.", "",
              "What a request runs for a feature that is off, timed in process:", "",
              "| feature (off) | ns per request | share of the baseline's c=1 p50 |", "| --- | --- | --- |"]
    for name, v in results["off_path_ns"].items():
        lines.append(f"| {name} | {v['ns']:.0f} | {v['share_of_c1_p50']:.5%} |")
    if results.get("on_path_us"):
        lines += ["", "A feature's own work when on, timed in process (no network, no model):", "",
                  "| feature (on) | us per request | share of the baseline's c=1 p50 |", "| --- | --- | --- |"]
        for name, v in results["on_path_us"].items():
            lines.append(f"| {name} | {v['us']:.1f} | {v['share_of_c1_p50']:.3%} |")
    lines += ["", "![feature cost](features.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    for offset, c, label in ((-0.2, "c1", "p50, concurrency 1"), (0.2, "c8", "p50, concurrency 8")):
        mid = np.array([r[c]["p50_ratio"] for r in rows])
        spread = [mid - [r[c].get("p50_ratio_min", r[c]["p50_ratio"]) for r in rows],
                  [r[c].get("p50_ratio_max", r[c]["p50_ratio"]) for r in rows] - mid]
        ax.barh(y + offset, mid, 0.4, xerr=spread, capsize=3, label=label + " (bars: min-max over rounds)")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("p50 latency / the baseline's in the same round")
    ax.set_title("catcascade: latency with each feature on")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_doc(page: Path, out_dir: Path) -> None:
    """Swaps the text between the page's bench:features markers for the new report."""
    from benchmarks.doc_tables import relative_link, replace_between_markers

    body = (out_dir / "features.md").read_text()
    body = body.replace("](features.png)", f"]({relative_link(out_dir, page)}/features.png)")
    replace_between_markers(page, "features", body)
