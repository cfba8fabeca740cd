"""The one builder: a ServeConfig and a loaded bundle in, a running engine (CascadePipeline) out.

The server's bundle, every model-repository version and (through the same pieces:
``make_classifier``, ``LimitsConfig.decode_limits``, ``serving.vlm_backend``) the Ray replicas
are built from the same code, so a setting means the same thing on every engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging

from catcascade.cnn_stage.onnx_runtime import make_classifier
from catcascade.ensemble.blender_registry import make_blender
from catcascade.ensemble.bundle import Bundle, BundleError
from catcascade.ensemble.escalation_policy import EscalationPolicy
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.batcher import DynamicBatcher
from catcascade.serving.cascade_engine import EngineIdentity, Verifier
from catcascade.serving.circuit_breaker import CircuitBreaker
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.thread_priority import build_in_lowered_thread
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.observability.tracing import NoTracing
from catcascade.serving.pipeline import CascadePipeline
from catcascade.serving.traffic.vlm_watchdog import VlmWatchdog
from catcascade.serving.vlm_backend import make_verifier

log = logging.getLogger(__name__)


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


def engine_identity(cfg: ServeConfig, bundle: Bundle, verifier: Verifier | None) -> EngineIdentity:
    """What a version tells clients (versions, model info) and its content key: a digest of
    everything its answers depend on, whatever the bundle is called."""
    m = bundle.manifest
    vlm_name = verifier.model_name if verifier else ""
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
    content = {"labels": m.labels, "cnn": [cfg.cnn_precision, cnn_sha], "temperature": m.cnn.temperature,
               "preprocess": m.preprocess, "cascade": m.cascade.model_dump(mode="json"), "files": m.files,
               "vlm": [m.vlm.model_dump(mode="json") if m.vlm else None, vlm_name, cfg.vlm.scoring_mode,
                       cfg.vlm.image_side] if verifier else None}
    key = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return EngineIdentity(versions, info, key, m.cnn.confidence_histogram)


@contextlib.asynccontextmanager
async def build_engine(cfg: ServeConfig, bundle: Bundle, metrics: ServiceMetrics | None = None,
                       tracing: NoTracing | None = None, tenant_budgets=None):
    """Yields the engine (a started CascadePipeline) serving a loaded, verified ``bundle`` under
    ``cfg``; closes everything after. The one bundle a server serves and every model-repository
    version are built here. ``tracing`` and ``tenant_budgets`` are the service's."""
    tracing = tracing or NoTracing()
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
        classifier = functools.partial(make_classifier, cnn_file, instances=cfg.batching.instances,
                                       threads=cfg.cnn_threads, spinning=cfg.cnn_spinning)
        # off the event loop, in a thread below it: ONNX Runtime's pool threads inherit its priority
        onnx = await asyncio.to_thread(build_in_lowered_thread, classifier, nice)
        batcher = DynamicBatcher(onnx.run, cfg.batching, on_batch=metrics.batch_size.observe, thread_nice=nice)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    metrics.batches_running.set_function(lambda: batcher.running)
    preprocess_config = dataclasses.replace(bundle.preprocess, limits=cfg.limits.decode_limits())
    # the pipeline sends each VLM call its trace context
    verifier = ray_stages.verifier if ray_stages else make_verifier(bundle, cfg)
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
    identity = engine_identity(cfg, bundle, verifier)
    pipeline = CascadePipeline(
        labels=m.labels, preprocess_config=preprocess_config, cnn=batcher,
        policy=EscalationPolicy(m.cascade.escalation), blender=make_blender(m.cascade.blend),
        verifier=verifier, temperature=m.cnn.temperature, breaker=breaker if verifier else None, metrics=metrics,
        limits=cfg.limits, vlm=cfg.vlm, memory=cfg.memory, cascade=m.cascade, decode_nice=nice,
        tracing=tracing, tenant_budgets=tenant_budgets, identity=identity)
    metrics.inflight_escalations.set_function(lambda: pipeline.inflight_escalations)
    watchdog_task = None
    if watchdog_probe is not None and option_sets:
        candidates = option_sets[0]
        watchdog = VlmWatchdog(lambda: watchdog_probe.warm_up(candidates), breaker,
                               on_failure=lambda kind: metrics.vlm_errors.labels(kind).inc())
        watchdog_task = asyncio.create_task(watchdog.run(), name="vlm-watchdog")
    await batcher.start()
    try:
        yield pipeline
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
