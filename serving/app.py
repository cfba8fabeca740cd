"""Assembles a running service from a bundle and a ServeConfig."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal

from catcascade.ensemble.bundle import Bundle, BundleError, load_bundle
from catcascade.cnn_stage.onnx_runtime import OnnxClassifier, OverlapAwareClassifier, cuda_available
from catcascade.cnn_stage.native_memory import tune_malloc
from catcascade.cnn_stage.preprocessing import DecodeLimits
from catcascade.ensemble.blender_registry import make_blender
from catcascade.ensemble.escalation_policy import EscalationPolicy
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.batcher import DynamicBatcher
from catcascade.serving.circuit_breaker import CircuitBreaker
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.thread_priority import build_in_lowered_thread
from catcascade.serving.observability.tracing import NoTracing, make_tracing
from catcascade.serving.pipeline import CascadePipeline, PipelineConfig
from catcascade.serving.server import CatClassifierServicer, run_server
from catcascade.serving.traffic.admission import AdmissionController
from catcascade.serving.traffic.vlm_watchdog import VlmWatchdog

log = logging.getLogger(__name__)


def _verifier(bundle: Bundle, cfg: ServeConfig, request_headers=None):
    """The VLM stage the config asks for: vLLM over HTTP, the bundle's VLM in-process, or none."""
    backend = cfg.vlm.backend
    if backend == "none":
        return None
    spec = bundle.manifest.vlm
    if spec is None and (backend == "transformers" or cfg.vlm.model is None):
        raise ValueError(f"bundle {bundle.root} has no vlm section: set vlm.model, or serve CNN-only")
    mode = cfg.vlm.scoring_mode or (spec.scoring_mode if spec else "multiple_choice")
    if backend == "transformers":
        from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier

        adapter = bundle.vlm_adapter_path()
        return TransformersVerifier(TransformersBackendConfig(
            model=bundle.vlm_base_path(), adapter=str(adapter) if adapter else None,
            name=spec.adapter_name or spec.served_model_name, scoring_mode=mode))
    from catcascade.vlm_stage.vllm_client import VlmClientConfig, VllmVerifier

    model = cfg.vlm.model or spec.adapter_name or spec.served_model_name
    return VllmVerifier(VlmClientConfig(urls=cfg.vlm.urls, model=model, scoring_mode=mode,
                                        timeout_s=cfg.vlm.timeout_s, max_retries=cfg.vlm.max_retries,
                                        constraint=cfg.vlm.constraint,
                                        max_connections=max(64, cfg.limits.max_concurrent_escalations)),
                        request_headers=request_headers)


async def warm_up(verifier, candidates: tuple[str, ...], timeout_s: float = 180.0) -> bool:
    """One request with a generous timeout: the first request per option set tokenizes the
    options (and, with the grammar constraint, compiles the grammar: seconds on a CPU), which
    must not land on a user's request."""
    from catcascade.vlm_stage.vllm_client import VllmVerifier

    probe = verifier
    if isinstance(verifier, VllmVerifier):
        probe = verifier.probe(timeout_s)
    try:
        await probe.warm_up(candidates)
        return True
    except Exception as e:  # the CNN path serves regardless; escalations report VLM_UNAVAILABLE
        log.warning("VLM warm-up failed (%s); serving CNN answers until it recovers", e)
        return False
    finally:
        if probe is not verifier:
            await probe.aclose()


async def keep_warming_up(verifier, candidates: tuple[str, ...], period_s: float = 5.0) -> None:
    """The VLM was not up at start (e.g. vLLM still loading): warm it up once it is, so the
    first escalated user request does not pay for it."""
    while not await warm_up(verifier, candidates):
        await asyncio.sleep(period_s)
    log.info("VLM warm-up done")


def _watchdog_probe(verifier, cfg: ServeConfig):
    """A probe client of its own for the VLM watchdog (vLLM backend, health_period_s > 0):
    one attempt, its own timeout, and its requests kept out of the verifier's counters."""
    from catcascade.vlm_stage.vllm_client import VllmVerifier

    if not isinstance(verifier, VllmVerifier) or cfg.breaker.health_period_s <= 0:
        return None
    return verifier.probe(cfg.breaker.health_timeout_s)


async def warm_up_all(verifier, option_sets: list[tuple[str, ...]]) -> bool:
    """``warm_up`` for each candidate count in turn; False at the first that fails."""
    for candidates in option_sets:
        if not await warm_up(verifier, candidates):
            return False
    return True


async def keep_warming_up_all(verifier, option_sets: list[tuple[str, ...]], period_s: float = 5.0) -> None:
    for candidates in option_sets:
        await keep_warming_up(verifier, candidates, period_s)


@contextlib.asynccontextmanager
async def build_service(cfg: ServeConfig, metrics: ServiceMetrics | None = None):
    """Yields a servicer over one bundle, or over the model repository (``cfg.models``):
    versions loaded, swapped, canaried and shadowed by serving.model_repository."""
    tune_malloc(cfg.memory.malloc_arena_max, cfg.memory.malloc_mmap_threshold_kb)  # before any worker thread
    metrics = metrics or ServiceMetrics()
    tracing = make_tracing(cfg.tracing)
    tenants = None
    if cfg.auth.tenants or cfg.tenant_budgets.active:
        from catcascade.serving.traffic.tenant_budgets import TenantBudgets

        tenants = TenantBudgets(cfg.tenant_budgets, cfg.auth.tenants, registry=metrics.registry)
    # every version of the model repository shares the service's tracing and tenant buckets
    factory = functools.partial(build_cascade, tracing=tracing,
                                tenant_budgets=tenants if cfg.tenant_budgets.active else None)
    if cfg.models is not None:
        from catcascade.serving.model_repository.service import routed_pipeline

        cascade = routed_pipeline(cfg, metrics, factory)
    else:
        cascade = factory(cfg, metrics)
    cache = None
    if cfg.cache.enabled:
        from catcascade.serving.traffic.response_cache import ResponseCache

        cache = ResponseCache(cfg.cache, size_of=lambda r: r.ByteSize(), registry=metrics.registry)
    try:
        async with cascade as built:
            pipeline, versions, info = (built, built.versions, built.model_info) if cfg.models is not None else built
            admission = AdmissionController(cfg.admission)
            yield CatClassifierServicer(pipeline, versions, info, metrics, max_inflight=cfg.limits.max_inflight_requests,
                                        cache=cache, tracing=tracing, tenants=tenants,
                                        drift=cfg.drift if cfg.drift.enabled else None, admission=admission)
    finally:
        tracing.shutdown()


@contextlib.asynccontextmanager
async def build_cascade(cfg: ServeConfig, metrics: ServiceMetrics | None = None, tracing: NoTracing | None = None,
                        tenant_budgets=None):
    """Loads the bundle, starts the batcher and yields (pipeline, versions, info); closes
    everything after. One version of the model repository is one of these. ``tracing`` and
    ``tenant_budgets`` (serving.traffic.tenant_budgets.TenantBudgets) are the service's."""
    tracing = tracing or NoTracing()
    # Hashing the files and building the ONNX session take a fraction of a second: off the
    # event loop, so a model repository loading a new version does not stall the one serving.
    bundle = await asyncio.to_thread(load_bundle, cfg.bundle)
    m = bundle.manifest
    metrics = metrics or ServiceMetrics()
    cnn_file = bundle.cnn_path
    if cfg.cnn_precision == "int8":
        if bundle.cnn_int8_path is None:
            raise BundleError(f"cnn_precision int8, but bundle {bundle.root} has no INT8 model "
                              "(train with `catcascade train-cnn --int8`)")
        cnn_file = bundle.cnn_int8_path
    nice = cfg.compute_nice
    ray_stages = None
    if cfg.engine == "ray":  # CNN (and VLM) stages as Ray Serve deployments; same front door and pipeline
        from catcascade.serving.engines.ray_engine import open_ray_stages

        ray_stages = await open_ray_stages(cfg, bundle, on_batch=metrics.batch_size.observe)
        batcher = ray_stages.cnn
    else:
        def make_classifier():
            if cfg.batching.instances > 1 and cfg.cnn_threads is None and not cuda_available():
                return OverlapAwareClassifier(cnn_file, allow_spinning=cfg.cnn_spinning)
            threads = cfg.cnn_threads or max(1, (os.cpu_count() or 1) // cfg.batching.instances)
            return OnnxClassifier(cnn_file, intra_op_threads=threads, allow_spinning=cfg.cnn_spinning)

        # off the event loop, in a thread below it: ONNX Runtime's pool threads inherit its priority
        onnx = await asyncio.to_thread(build_in_lowered_thread, make_classifier, nice)
        batcher = DynamicBatcher(onnx.run, cfg.batching, on_batch=metrics.batch_size.observe, thread_nice=nice)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    metrics.batches_running.set_function(lambda: batcher.running)
    lim = cfg.limits
    preprocess_config = dataclasses.replace(bundle.preprocess, limits=DecodeLimits(
        max_bytes=lim.max_message_bytes, max_pixels=lim.max_pixels, max_side=lim.max_side,
        max_aspect_ratio=lim.max_aspect_ratio, max_decode_mb=lim.max_decode_mb, max_jpeg_scans=lim.max_jpeg_scans,
        max_jpeg_scan_blocks=lim.max_jpeg_scan_blocks, max_segments=lim.max_segments))
    # (with the Ray engine the VLM client runs in a Ray deployment: no trace headers are added there)
    verifier = ray_stages.verifier if ray_stages else _verifier(
        bundle, cfg, tracing.outgoing_headers if tracing.enabled else None)
    warm_task = None
    # one warm-up request per candidate count the VLM can be asked about (each count is its own
    # option set: its letters are tokenized once)
    counts = (range(2, m.cascade.max_candidates + 1) if m.cascade.candidate_sets is not None
              else (m.cascade.top_k,))
    option_sets = [tuple(m.labels[:n]) for n in counts if n <= len(m.labels)]
    if verifier is not None and not await warm_up_all(verifier, option_sets):
        warm_task = asyncio.create_task(keep_warming_up_all(verifier, option_sets))
    watchdog_probe = _watchdog_probe(verifier, cfg)
    breaker = CircuitBreaker(cfg.breaker, on_change=lambda state: metrics.breaker_state.set(int(state)),
                             probe_with_requests=watchdog_probe is None)
    pipeline = CascadePipeline(
        labels=m.labels, preprocess_config=preprocess_config, cnn=batcher,
        policy=EscalationPolicy(m.cascade.escalation), blender=make_blender(m.cascade.blend),
        verifier=verifier, temperature=m.cnn.temperature, breaker=breaker if verifier else None, metrics=metrics,
        config=PipelineConfig(candidates=m.cascade.top_k, vlm_min_budget_ms=lim.vlm_min_budget_ms,
                              reply_margin_ms=lim.reply_margin_ms,
                              max_concurrent_escalations=lim.max_concurrent_escalations,
                              escalation_queue_size=lim.escalation_queue_size,
                              candidate_sets=m.cascade.candidate_sets,
                              rationale_max_tokens=cfg.vlm.rationale_max_tokens,
                              max_decode_queue=lim.max_decode_queue,
                              trim_after_decode_ms=cfg.memory.trim_after_decode_ms,
                              vlm_call_budget_s=cfg.vlm.call_budget_s, decode_nice=nice),
        tracing=tracing, tenant_budgets=tenant_budgets)
    pipeline.confidence_reference = m.cnn.confidence_histogram  # the drift index's reference
    metrics.inflight_escalations.set_function(lambda: pipeline.inflight_escalations)
    watchdog_task = None
    if watchdog_probe is not None and option_sets:
        candidates = option_sets[0]
        watchdog = VlmWatchdog(lambda: watchdog_probe.warm_up(candidates), breaker,
                               on_failure=lambda kind: metrics.vlm_errors.labels(kind).inc())
        watchdog_task = asyncio.create_task(watchdog.run(), name="vlm-watchdog")
    vlm_name = (getattr(verifier.config, "model", "") if cfg.vlm.backend == "vllm" else
                getattr(verifier.config, "name", "")) if verifier else ""
    cnn_sha = m.cnn.int8_sha256 if cfg.cnn_precision == "int8" else m.cnn.sha256
    versions = pb.ModelVersions(bundle=bundle.version_string,
                                cnn=f"{m.cnn.architecture}:{cfg.cnn_precision}@{cnn_sha[:12]}",
                                vlm=(f"{m.vlm.base_model}+{vlm_name}" if m.vlm and verifier else ""))
    sets = m.cascade.candidate_sets
    rule = (f"{sets.method} sets covering {100 * (1 - sets.alpha):g}%, at most {sets.max_size}" if sets is not None
            else f"top-{m.cascade.top_k}")
    info = pb.ModelInfo(labels=m.labels, versions=versions, image_size=bundle.preprocess.image_size,
                        escalation_threshold=m.cascade.escalation.threshold,
                        escalation_metric=m.cascade.escalation.metric, blend_weight=m.cascade.blend.weight,
                        vlm_enabled=verifier is not None, vlm_candidate_rule=rule)
    await batcher.start()
    try:
        yield pipeline, versions, info
    finally:
        for task in (warm_task, watchdog_task):
            if task is not None:
                task.cancel()
        if watchdog_probe is not None:
            await watchdog_probe.aclose()
        await batcher.stop()
        pipeline.close()
        if verifier is not None:
            await verifier.aclose()
        if ray_stages is not None:
            await ray_stages.close()


@contextlib.asynccontextmanager
async def running_service(cfg: ServeConfig, metrics: ServiceMetrics | None = None):
    """The whole service per ``cfg`` (limits, TLS, auth, the metrics endpoint included); yields
    (servicer, port, health). With ``metrics_port`` set, ``servicer.metrics.http_server`` is
    the /metrics server."""
    async with build_service(cfg, metrics) as servicer:
        if cfg.metrics_port is not None:
            servicer.metrics.serve_http(cfg.metrics_port, cfg.metrics_host, tls=cfg.metrics_tls,
                                        tokens=cfg.metrics_auth.tokens())
        try:
            async with run_server(servicer, cfg.host, cfg.port, max_message_bytes=cfg.limits.max_message_bytes,
                                  grace_s=cfg.grace_s, tls=cfg.tls, tokens=cfg.auth.tokens()) as (_, port, health):
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
    async with running_service(cfg, metrics) as (_, port, _health):
        if metrics.http_server is not None:
            print(f"Prometheus metrics on {'https' if cfg.metrics_tls else 'http'}://{cfg.metrics_host}:"
                  f"{metrics.http_server.server_port}/metrics"
                  f"{' (bearer token)' if cfg.metrics_auth.tokens() else ''}", flush=True)
        log.info("catcascade serving on %s:%d (VLM: %s)", cfg.host, port, cfg.vlm.urls or "off")
        print(f"catcascade serving on {cfg.host}:{port} ({'TLS' if cfg.tls else 'plaintext'}"
              f"{', auth' if cfg.auth.tokens() else ''})", flush=True)
        if ready:
            ready(port)
        await stop.wait()
        print("shutting down: draining in-flight requests", flush=True)
