"""Assembles a running service from a ServeConfig: the engines (serving/engine_builder.py),
the front door's chain around them (serving/front_door/) and the gRPC server."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import signal

from catcascade.cnn_stage.native_memory import tune_malloc
from catcascade.ensemble.bundle import load_bundle
from catcascade.errors import CommandError
from catcascade.serving.config import ServeConfig
from catcascade.serving.engine_builder import build_engine
from catcascade.serving.front_door.authentication import Authenticator
from catcascade.serving.front_door.chain import FrontDoor
from catcascade.serving.front_door.observation import Observer
from catcascade.serving.front_door.routing import SingleVersion
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.observability.tracing import make_tracing
from catcascade.serving.server import CatClassifierServicer, run_server
from catcascade.serving.traffic.admission import AdmissionController

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def single_bundle(cfg: ServeConfig, metrics: ServiceMetrics, factory):
    """The router for one bundle: loaded and verified once, off the event loop."""
    bundle = await asyncio.to_thread(load_bundle, cfg.bundle)
    async with factory(cfg, bundle, metrics) as engine:
        yield SingleVersion(engine)


@contextlib.asynccontextmanager
async def build_service(cfg: ServeConfig, metrics: ServiceMetrics | None = None):
    """Yields a servicer over one bundle, or over the model repository (``cfg.models``):
    versions loaded, swapped, canaried and shadowed by serving.model_repository."""
    tune_malloc(cfg.memory.malloc_arena_max, cfg.memory.malloc_mmap_threshold_kb)  # before any worker thread
    metrics = metrics or ServiceMetrics()
    tracing = make_tracing(cfg.tracing)
    budgets = None
    if cfg.auth.tenants or cfg.tenant_budgets.active:
        from catcascade.serving.traffic.tenant_budgets import TenantBudgets

        budgets = TenantBudgets(cfg.tenant_budgets, list(cfg.auth.tenants), registry=metrics.registry)
    spending = budgets if cfg.tenant_budgets.active else None
    # every version of the model repository shares the service's tracing and tenant buckets
    factory = functools.partial(build_engine, tracing=tracing, tenant_budgets=spending)
    if cfg.models is not None:
        from catcascade.serving.model_repository.service import routed_pipeline

        serving = routed_pipeline(cfg, metrics, factory)
    else:
        serving = single_bundle(cfg, metrics, factory)
    cache = None
    if cfg.cache.enabled:
        from catcascade.serving.front_door.caching import CacheStage

        cache = CacheStage(cfg.cache, spending, registry=metrics.registry)
    try:
        async with serving as router:
            admission = AdmissionController(cfg.admission)
            front_door = FrontDoor(router, metrics, authenticator=Authenticator(cfg.auth.tokens(), cfg.auth.tenants),
                                   admission=admission, cache=cache, budgets=budgets,
                                   observer=Observer(metrics, cfg.drift if cfg.drift.enabled else None),
                                   max_inflight=cfg.limits.max_inflight_requests)
            yield CatClassifierServicer(front_door, tracing)
    finally:
        tracing.shutdown()


@contextlib.asynccontextmanager
async def running_service(cfg: ServeConfig, metrics: ServiceMetrics | None = None):
    """The whole service per ``cfg`` (limits, TLS, auth, the metrics endpoint included); yields
    (servicer, port, health). With ``metrics_port`` set, ``servicer.metrics.http_server`` is
    the /metrics server."""
    if cfg.http_port is not None and not all(importlib.util.find_spec(m) for m in ("tritonclient", "aiohttp")):
        raise CommandError("http_port needs tritonclient and aiohttp (requirements/open-inference.txt and "
                           "requirements/project.txt; make setup installs both)")
    async with build_service(cfg, metrics) as servicer:
        if cfg.metrics_port is not None:
            servicer.metrics.serve_http(cfg.metrics_port, cfg.metrics_host, tls=cfg.metrics_tls,
                                        tokens=cfg.metrics_auth.tokens())
        try:
            async with run_server(servicer, cfg.host, cfg.port, max_message_bytes=cfg.limits.max_message_bytes,
                                  grace_s=cfg.grace_s, tls=cfg.tls,
                                  connections=cfg.connections) as (_, port, health):
                if cfg.http_port is None:
                    yield servicer, port, health
                else:
                    from catcascade.serving.open_inference import OpenInferenceServicer
                    from catcascade.serving.open_inference_rest import serve_rest

                    async with serve_rest(OpenInferenceServicer(servicer.front_door, servicer.tracing), cfg.host,
                                          cfg.http_port, cfg.limits.max_message_bytes, cfg.tls) as servicer.http_port:
                        yield servicer, port, health
        finally:
            servicer.metrics.stop_http()


async def serve_forever(cfg: ServeConfig, ready=None) -> None:
    """Serves until SIGINT/SIGTERM, then drains in-flight requests within ``grace_s``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = ServiceMetrics()
    async with running_service(cfg, metrics) as (servicer, port, _health):
        if metrics.http_server is not None:
            print(f"Prometheus metrics on {'https' if cfg.metrics_tls else 'http'}://{cfg.metrics_host}:"
                  f"{metrics.http_server.server_port}/metrics"
                  f"{' (bearer token)' if cfg.metrics_auth.tokens() else ''}", flush=True)
        log.info("catcascade serving on %s:%d (VLM: %s)", cfg.host, port, cfg.vlm.urls or "off")
        print(f"catcascade serving on {cfg.host}:{port} ({'TLS' if cfg.tls else 'plaintext'}"
              f"{', auth' if cfg.auth.tokens() else ''})", flush=True)
        if servicer.http_port is not None:
            print(f"Open Inference REST API on {'https' if cfg.tls else 'http'}://{cfg.host}:{servicer.http_port}/v2",
                  flush=True)
        if ready:
            ready(port)
        await stop.wait()
        print("shutting down: draining in-flight requests", flush=True)
