"""The front door's side of the Ray engine: joins the cluster, deploys the Serve application or
attaches to the one another front door deployed, and offers the pipeline the same CNN-stage
interface as the local batcher (serving.engines.cnn_engine) plus a verifier.

Calls go straight to each deployment's replicas over Serve's gRPC transport
(``_by_reference=False``): on this machine that halved the hop against the default object-ref
path (benchmarks/ray_hop.py). A CNN call whose replica dies is retried (``ray.request_retries``;
inference is idempotent), then fails with UNAVAILABLE; the client's deadline cancels it
throughout, so nothing outlives it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time

import numpy as np

from catcascade.serving.batcher import QueueFullError
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.cnn_engine import EncodedResult, EngineUnavailableError
from catcascade.serving.engines.ray_config import RayEngineConfig

log = logging.getLogger(__name__)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def prefer_loopback(address: str | None) -> None:
    """Ray rewrites a loopback cluster address to the host's network address, so a cluster
    started on 127.0.0.1 (tests, one-machine demos) could not be joined. This keeps Ray on
    loopback for such addresses; it must run before ray is first imported."""
    host = (address or "").rpartition(":")[0].strip("[]")
    if host in _LOOPBACK:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def check_reachable(address: str, timeout_s: float) -> None:
    """A TCP connect to the GCS port first: ``ray.init`` retries an unreachable address for
    minutes, a refused or silent port should be a clear error in seconds."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address must be host:port (the GCS address `ray start --head` prints), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise EngineUnavailableError(f"cannot reach a Ray cluster at {address}: {e}. Start one with "
                                     f"`ray start --head --port {port}` or pass the right --ray-address") from None


def _in_thread(fn, timeout_s: float, what: str):
    """Runs a blocking Ray call with a time limit (a daemon thread, so a hung call cannot keep
    the process alive)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"ray-{what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise EngineUnavailableError(f"{what} did not finish within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def connect(cfg: RayEngineConfig) -> bool:
    """Joins the cluster (or starts a local Ray when no address is set); True if this call
    started Ray here, so closing should stop it."""
    prefer_loopback(cfg.address)
    try:
        import ray
    except ImportError:
        raise EngineUnavailableError("engine ray needs Ray Serve: pip install 'ray[serve]' "
                                     "(requirements/project.txt pins the version)") from None
    if ray.is_initialized():
        return False
    if cfg.address is None:
        _in_thread(lambda: ray.init(namespace=cfg.namespace, include_dashboard=False, log_to_driver=False),
                   cfg.deploy_timeout_s, "starting a local Ray")
        return True
    check_reachable(cfg.address, cfg.connect_timeout_s)
    _in_thread(lambda: ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=False),
               cfg.connect_timeout_s * 3, f"joining the Ray cluster at {cfg.address}")
    return False


def deploy_or_attach(cfg: ServeConfig, bundle_version: str):
    """The application's ingress handle: deployed if the cluster has none by that name, else
    attached to (several front doors share one application). Refuses an application that
    serves another bundle."""
    from ray import serve

    from catcascade.serving.engines.ray_deployments import build_application

    name = cfg.ray.app_name
    _in_thread(lambda: serve.start(proxy_location="Disabled"), cfg.ray.deploy_timeout_s, "starting Ray Serve")
    app = serve.status().applications.get(name)
    if app is None or str(app.status) in ("DEPLOY_FAILED", "ApplicationStatus.DEPLOY_FAILED"):
        log.info("deploying Serve application %r", name)
        _in_thread(lambda: serve.run(build_application(cfg), name=name, route_prefix=None,
                                     logging_config={"enable_access_log": False, "log_level": "WARNING"}),
                   cfg.ray.deploy_timeout_s, f"deploying the Serve application {name!r}")
    else:
        log.info("attaching to Serve application %r (%s)", name, app.status)
    handle = serve.get_app_handle(name)
    info = _in_thread(lambda: handle.describe.remote().result(), cfg.ray.deploy_timeout_s,
                      f"reaching the Serve application {name!r}")
    if info["bundle"] != bundle_version:
        raise ValueError(f"Serve application {name!r} on the cluster serves bundle {info['bundle']}, this front "
                         f"door has {bundle_version}: use another ray.app_name, or `serve delete {name}` first")
    return handle, info


class RayCnnEngine:
    """The CNN stage on Ray Serve, with the local batcher's interface (``submit``) and, when the
    replicas decode, ``submit_encoded``. ``on_batch`` sees each request's batch size (batches
    form on the replicas, out of sight of any one front door)."""

    def __init__(self, handle, decodes_images: bool, retries: int = 1, on_batch=None):
        self.handle = handle.options(_by_reference=False)
        self.decodes_images = decodes_images
        self.retries = retries
        self.on_batch = on_batch
        self.inflight = 0
        self.retried = 0

    @property
    def depth(self) -> int:
        return self.inflight

    @property
    def running(self) -> int:
        return self.inflight

    async def start(self) -> None:
        """Nothing to start: the replicas live on the cluster."""

    async def stop(self) -> None:
        """Nothing to stop: other front doors may share the replicas."""

    async def submit(self, x: np.ndarray, priority: int = 0, deadline: float | None = None) -> EncodedResult:
        """``priority`` and ``deadline`` are accepted for the interface and not used: Ray
        Serve's queues are FIFO and shed by their own length."""
        return await self._call("classify_tensor", x)

    async def submit_encoded(self, data: bytes) -> EncodedResult:
        return await self._call("classify_encoded", data)

    async def _call(self, method: str, payload) -> EncodedResult:
        import grpc
        from ray import exceptions as rex
        from ray.serve.exceptions import BackPressureError

        from catcascade.cnn_stage.preprocessing import InvalidImageError

        self.inflight += 1
        try:
            for attempt in range(self.retries + 1):
                t0 = time.perf_counter()
                try:
                    answer = await getattr(self.handle, method).remote(payload)
                    break
                except BackPressureError as e:
                    raise QueueFullError(f"CNN replicas are saturated: {e}") from None
                except rex.RayTaskError:
                    raise  # a bug in the replica's code, not an outage: INTERNAL
                except (rex.RayError, grpc.aio.AioRpcError, ConnectionError) as e:  # replica died or unreachable
                    if attempt >= self.retries:
                        raise EngineUnavailableError(f"CNN stage unavailable: {type(e).__name__}: "
                                                     f"{str(e)[:200]}") from None
                    self.retried += 1
                    log.warning("CNN replica call failed (%s); retrying on another replica", type(e).__name__)
        finally:
            self.inflight -= 1
        if answer.error is not None:
            raise InvalidImageError(answer.error)
        total_ms = (time.perf_counter() - t0) * 1000.0
        if self.on_batch is not None:
            self.on_batch(answer.batch_size)
        # queue_ms: everything but decode and compute, i.e. the replica's batch queue plus the Ray hop.
        return EncodedResult(answer.output, max(0.0, total_ms - answer.compute_ms - answer.decode_ms),
                             answer.compute_ms, answer.batch_size, answer.decode_ms)


class RayVerifier:
    """The VlmStage deployment behind the pipeline's Verifier interface; raises the same
    exceptions as the local vLLM client, so breaker and reasons behave alike."""

    def __init__(self, handle, config):
        self.handle = handle.options(_by_reference=False)
        self.config = config

    async def verify(self, image, candidates):
        import grpc
        from ray import exceptions as rex

        from catcascade.vlm_stage.scoring import ScoringError
        from catcascade.vlm_stage.vllm_client import VlmUnavailableError

        try:
            kind, value = await self.handle.verify.remote(image, tuple(candidates))
        except rex.RayTaskError:
            raise
        except (rex.RayError, grpc.aio.AioRpcError, ConnectionError) as e:
            raise VlmUnavailableError(f"VLM deployment unreachable: {type(e).__name__}: {str(e)[:200]}") from None
        if kind == "scoring":
            raise ScoringError(value)
        if kind == "unavailable":
            raise VlmUnavailableError(value)
        return value

    async def explain(self, image, breed: str, max_tokens: int):
        import grpc
        from ray import exceptions as rex

        from catcascade.vlm_stage.rationale import RationaleError
        from catcascade.vlm_stage.vllm_client import VlmUnavailableError

        try:
            kind, value = await self.handle.explain.remote(image, breed, max_tokens)
        except rex.RayTaskError:
            raise
        except (rex.RayError, grpc.aio.AioRpcError, ConnectionError) as e:
            raise VlmUnavailableError(f"VLM deployment unreachable: {type(e).__name__}: {str(e)[:200]}") from None
        if kind == "rationale":
            raise RationaleError(value)
        if kind == "unavailable":
            raise VlmUnavailableError(value)
        return value

    async def warm_up(self, candidates: tuple[str, ...]) -> None:
        from catcascade.vlm_stage.vllm_client import VlmUnavailableError

        error = await self.handle.warm_up.remote(tuple(candidates))
        if error:
            raise VlmUnavailableError(error)

    async def aclose(self) -> None:
        """The deployment outlives this front door."""


class RayStages:
    """What build_service needs from the Ray engine: the CNN engine and the verifier (or None)."""

    def __init__(self, cnn: RayCnnEngine, verifier: RayVerifier | None, info: dict, owns_ray: bool):
        self.cnn = cnn
        self.verifier = verifier
        self.info = info
        self._owns_ray = owns_ray

    async def close(self) -> None:
        if self._owns_ray:  # a Ray this process started: take Serve and Ray down with it
            import ray
            from ray import serve

            await asyncio.to_thread(serve.shutdown)
            await asyncio.to_thread(ray.shutdown)


async def open_ray_stages(cfg: ServeConfig, bundle, on_batch=None) -> RayStages:
    """Joins the cluster, deploys or attaches to the application, returns the stages."""
    owns = await asyncio.to_thread(connect, cfg.ray)
    handle, info = await asyncio.to_thread(deploy_or_attach, cfg, bundle.version_string)
    verifier = None
    if cfg.vlm.backend == "vllm":
        if not info.get("has_vlm"):
            raise ValueError(f"Serve application {cfg.ray.app_name!r} has no VLM deployment, but this front door "
                             "is configured with vlm.urls")
        from ray import serve

        from catcascade.serving.engines.ray_deployments import VLM_DEPLOYMENT, vlm_client_config

        vlm_handle = serve.get_deployment_handle(VLM_DEPLOYMENT, cfg.ray.app_name)
        verifier = RayVerifier(vlm_handle, vlm_client_config(cfg, bundle))
    cnn = RayCnnEngine(handle, decodes_images=cfg.ray.decode == "replica", retries=cfg.ray.request_retries,
                       on_batch=on_batch)
    log.info("Ray engine ready: application %r, bundle %s, decode on the %s", cfg.ray.app_name, info["bundle"],
             cfg.ray.decode)
    return RayStages(cnn, verifier, info, owns)
