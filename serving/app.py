"""Assembles a running service from a bundle and a ServeConfig."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from cnn_stage.bundle import Bundle, load_bundle
from cnn_stage.onnx_runtime import OnnxClassifier
from ensemble.blender import LogLinearBlender
from ensemble.escalation_policy import EscalationPolicy
from serving.api import cascade_pb2 as pb
from serving.batcher import BatcherConfig, DynamicBatcher
from serving.config import ServeConfig
from serving.pipeline import CascadePipeline, PipelineConfig
from serving.server import CatClassifierServicer, run_server

log = logging.getLogger(__name__)


def _verifier(bundle: Bundle, cfg: ServeConfig):
    if not cfg.vlm.urls:
        return None
    from vlm_stage.vllm_client import VlmClientConfig, VllmVerifier

    spec = bundle.manifest.vlm
    model = cfg.vlm.model or (spec.adapter_name if spec and spec.adapter_name else
                              spec.served_model_name if spec else None)
    if model is None:
        raise ValueError("no VLM model name: set vlm.model, or give the bundle a vlm section")
    mode = cfg.vlm.scoring_mode or (spec.scoring_mode if spec else "multiple_choice")
    return VllmVerifier(VlmClientConfig(urls=cfg.vlm.urls, model=model, scoring_mode=mode,
                                        timeout_s=cfg.vlm.timeout_s, max_retries=cfg.vlm.max_retries))


@contextlib.asynccontextmanager
async def build_service(cfg: ServeConfig):
    """Loads the bundle, starts the batcher and yields a servicer; closes everything after."""
    bundle = load_bundle(cfg.bundle)
    m = bundle.manifest
    onnx = OnnxClassifier(bundle.cnn_path, intra_op_threads=cfg.cnn_threads)
    batcher = DynamicBatcher(onnx.run, BatcherConfig(**cfg.batching.model_dump()))
    await batcher.start()
    verifier = _verifier(bundle, cfg)
    if verifier is not None:
        try:
            await verifier.warm_up(tuple(m.labels[: m.cascade.top_k]))
        except Exception as e:  # the CNN path serves regardless; escalations report VLM_UNAVAILABLE
            log.warning("VLM warm-up failed (%s); serving CNN answers until it recovers", e)
    pipeline = CascadePipeline(
        labels=m.labels, preprocess_config=bundle.preprocess, cnn=batcher,
        policy=EscalationPolicy(m.cascade.escalation), blender=LogLinearBlender(m.cascade.blend),
        verifier=verifier, temperature=m.cnn.temperature, config=PipelineConfig(candidates=m.cascade.top_k))
    vlm_name = getattr(getattr(verifier, "config", None), "model", "") or ""
    versions = pb.ModelVersions(bundle=bundle.version_string, cnn=f"{m.cnn.architecture}@{m.cnn.sha256[:12]}",
                                vlm=(f"{m.vlm.base_model}+{vlm_name}" if m.vlm and verifier else ""))
    info = pb.ModelInfo(labels=m.labels, versions=versions, image_size=bundle.preprocess.image_size,
                        escalation_threshold=m.cascade.escalation.threshold,
                        escalation_metric=m.cascade.escalation.metric, blend_weight=m.cascade.blend.weight,
                        vlm_enabled=verifier is not None)
    servicer = CatClassifierServicer(pipeline, versions, info)
    try:
        yield servicer
    finally:
        await batcher.stop()
        pipeline.close()
        if verifier is not None:
            await verifier.aclose()


async def serve_forever(cfg: ServeConfig, ready=None) -> None:
    """Serves until SIGINT/SIGTERM, then drains in-flight requests within ``grace_s``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with build_service(cfg) as servicer:
        async with run_server(servicer, cfg.host, cfg.port, grace_s=cfg.grace_s) as (_, port, _health):
            log.info("catcascade serving on %s:%d (VLM: %s)", cfg.host, port, cfg.vlm.urls or "off")
            print(f"catcascade serving on {cfg.host}:{port}", flush=True)
            if ready:
                ready(port)
            await stop.wait()
            print("shutting down: draining in-flight requests", flush=True)
