"""The cascade's Ray Serve deployments: the CNN stage and the VLM verifier, each scaled on its own.

``CnnStage`` replicas each hold one ONNX Runtime session (the CUDA provider where the replica got a
GPU) and batch with ``@serve.batch`` using the ServeConfig's ``batching`` limits; they decode
too when the front door sends encoded bytes, under the same decode limits as the local engine
(``LimitsConfig.decode_limits``). ``VlmStage`` wraps the vLLM client and its server pool, so its
replicas and concurrency are set apart from the CNN's; its errors cross to the front door as the
client's own exceptions. Replicas take messages up to ``limits.max_message_bytes`` (Serve's
replica gRPC would refuse anything over 4 MiB). The CNN stage is the
application's ingress (``describe()`` tells an attaching front door what it serves); front
doors call both deployments directly through their handles.

``app_builder`` is the import path for ``serve deploy`` (deploy/ray/serve-config.yaml): its
``args`` are a ServeConfig (engine ray), the same file a front door reads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.ray_config import GRPC_LIMIT_ENV, grpc_message_limit

CNN_DEPLOYMENT = "CnnStage"
VLM_DEPLOYMENT = "VlmStage"
# Replicas run user code on the replica's own event loop (not a second thread): one thread
# hop less per call. Model runs and decoding go to thread pools, so the loop never blocks.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def replica_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment of every replica: REPLICA_ENV, and a gRPC message limit that lets through
    any request the front door accepts."""
    return dict(REPLICA_ENV, **{GRPC_LIMIT_ENV: str(grpc_message_limit(cfg.limits.max_message_bytes))})


@dataclass(frozen=True)
class ReplicaAnswer:
    """One image's row of a CNN batch, or why its bytes were refused (``error``)."""

    output: np.ndarray | None
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    decode_ms: float = 0.0
    error: str | None = None
    error_reason: str = "invalid"
    """InvalidImageError.reason of a refusal (its metrics label)."""
    replica: str = ""


class _CnnReplica:
    """One ONNX Runtime session; ``_run_batch`` is wrapped with @serve.batch by ``_cnn_class``."""

    def __init__(self, serve_config: dict, vlm=None):
        """``vlm``: the VlmStage handle when the application has one (bound here so that both
        deployments form one application; front doors call it directly)."""
        from catcascade.cnn_stage.onnx_runtime import make_classifier
        from catcascade.ensemble.bundle import load_bundle

        cfg = ServeConfig.model_validate(serve_config)
        bundle = load_bundle(cfg.bundle)
        path = bundle.cnn_int8_path if cfg.cnn_precision == "int8" else bundle.cnn_path
        if path is None:
            raise ValueError(f"bundle {bundle.root} has no INT8 model")
        instances = cfg.batching.instances
        self.model = make_classifier(path, instances=instances, threads=cfg.ray.cnn.threads or cfg.cnn_threads,
                                     spinning=cfg.cnn_spinning)
        self.preprocess_config = dataclasses.replace(bundle.preprocess, limits=cfg.limits.decode_limits())
        self.info = {"bundle": bundle.version_string, "labels": list(bundle.manifest.labels), "has_vlm": vlm is not None,
                     "precision": cfg.cnn_precision, "providers": list(self.model.providers)}
        self._model_pool = ThreadPoolExecutor(instances, thread_name_prefix="cnn")
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="decode")
        self._name = ""

    def describe(self) -> dict:
        return dict(self.info, replica=self._replica_name())

    def _replica_name(self) -> str:
        if not self._name:
            from ray import serve

            self._name = serve.get_replica_context().replica_tag
        return self._name

    async def classify_tensor(self, x: np.ndarray) -> ReplicaAnswer:
        """A preprocessed CHW float32 image (decoded on the front door)."""
        return await self._run_batch((x, time.perf_counter()))

    async def classify_encoded(self, data: bytes) -> ReplicaAnswer:
        """Encoded image bytes: decode and preprocess here, then batch."""
        from catcascade.cnn_stage.preprocessing import InvalidImageError, load_and_preprocess

        t0 = time.perf_counter()
        try:
            x = await asyncio.get_running_loop().run_in_executor(self._decode_pool, load_and_preprocess, data,
                                                                 self.preprocess_config)
        except InvalidImageError as e:
            return ReplicaAnswer(None, error=str(e), error_reason=e.reason)
        t1 = time.perf_counter()
        answer = await self._run_batch((x, t1))
        return dataclasses.replace(answer, decode_ms=(t1 - t0) * 1000.0)

    async def _run_many(self, items: list[tuple[np.ndarray, float]]) -> list[ReplicaAnswer]:
        start = time.perf_counter()
        batch = np.stack([x for x, _ in items])
        out = await asyncio.get_running_loop().run_in_executor(self._model_pool, self.model.run, batch)
        compute_ms = (time.perf_counter() - start) * 1000.0
        name = self._replica_name()
        return [ReplicaAnswer(out[i], (start - t) * 1000.0, compute_ms, len(items), replica=name)
                for i, (_, t) in enumerate(items)]


def _cnn_class(max_batch_size: int, wait_s: float, instances: int) -> type:
    """The CNN replica class with @serve.batch limits from the config (the decorator takes them
    at class creation; ``max_concurrent_batches`` has no setter)."""
    from ray import serve

    class CnnStage(_CnnReplica):
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s, max_concurrent_batches=instances)
        async def _run_batch(self, items: list[tuple[np.ndarray, float]]) -> list[ReplicaAnswer]:
            return await self._run_many(items)

    return CnnStage


class VlmStage:
    """The vLLM client (and its pool of vLLM servers) as a deployment. Its errors (VlmUnavailableError,
    ScoringError, RationaleError: catcascade.errors.CatcascadeError) cross to the front door,
    which raises them as the local engine would; ``priority`` and ``headers`` (the request's
    trace context) go on to vLLM with each call."""

    def __init__(self, serve_config: dict):
        from catcascade.ensemble.bundle import load_bundle
        from catcascade.serving.vlm_backend import vlm_client_config
        from catcascade.vlm_stage.vllm_client import VllmVerifier

        cfg = ServeConfig.model_validate(serve_config)
        self.verifier = VllmVerifier(vlm_client_config(cfg, load_bundle(cfg.bundle)))

    async def verify(self, image, candidates: tuple[str, ...], priority: int = 0,
                     headers: dict[str, str] | None = None):
        return await self.verifier.verify(image, tuple(candidates), priority=priority, headers=headers)

    async def explain(self, image, breed: str, max_tokens: int, priority: int = 0,
                      headers: dict[str, str] | None = None):
        return await self.verifier.explain(image, breed, max_tokens, priority=priority, headers=headers)

    async def warm_up(self, candidates: tuple[str, ...], timeout_s: float = 180.0) -> None:
        """One probe request with a long timeout (the first per option set pays for tokenizing)."""
        probe = self.verifier.probe(timeout_s)
        try:
            await probe.warm_up(tuple(candidates))
        finally:
            await probe.aclose()


def _deployment_options(settings, batching, env: dict[str, str] = REPLICA_ENV) -> dict:
    opts = {"name": CNN_DEPLOYMENT, "max_ongoing_requests": max(settings.max_ongoing_requests,
                                                              batching.max_batch_size * batching.instances),
            "max_queued_requests": settings.max_queued_requests,
            "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus,
                                  "runtime_env": {"env_vars": env}}}
    if settings.num_replicas is not None:
        opts["num_replicas"] = settings.num_replicas
    else:
        opts["autoscaling_config"] = settings.autoscaling.to_ray()
    return opts


def build_application(cfg: ServeConfig):
    """The Serve application for a ServeConfig: CnnStage (ingress) and, with a VLM, VlmStage."""
    from ray import serve

    if cfg.vlm.backend == "transformers":
        raise ValueError("engine ray serves the VLM through vLLM (vlm.urls) or not at all; "
                         "the in-process transformers backend is for the local engine")
    vlm = None
    env = replica_env(cfg)
    # Replicas load the bundle themselves (its path must exist on every node); TLS files and
    # tokens belong to the front door and never travel to the cluster.
    config = cfg.model_dump(mode="json", exclude={"tls", "auth"})
    if cfg.vlm.backend == "vllm":
        v = cfg.ray.vlm
        vlm = serve.deployment(VlmStage, name=VLM_DEPLOYMENT, num_replicas=v.num_replicas,
                               max_ongoing_requests=v.max_ongoing_requests,
                               ray_actor_options={"num_cpus": v.num_cpus,
                                                  "runtime_env": {"env_vars": env}}).bind(config)
    b = cfg.batching
    cnn = serve.deployment(_cnn_class(b.max_batch_size, b.max_queue_delay_ms / 1000.0, b.instances),
                           **_deployment_options(cfg.ray.cnn, b, env))
    return cnn.bind(config, vlm)


def app_builder(args: dict):
    """``serve deploy`` entry point: ``args`` is a ServeConfig (YAML) with ``engine: ray``."""
    return build_application(ServeConfig.model_validate(args))
