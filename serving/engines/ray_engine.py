"""The front door's side of the Ray engine: joins the cluster, deploys the Serve application or
attaches to the one another front door deployed, and offers the pipeline the same CNN-stage
interface as the local batcher (serving.engines.cnn_engine) plus a verifier.

Calls go straight to each deployment's replicas over Serve's gRPC transport
(``_by_reference=False``): on this machine that halved the hop against the default object-ref
path (benchmarks/ray_hop.py). A CNN call whose replica dies is retried (``ray.request_retries``;
inference is idempotent), then fails with UNAVAILABLE; the client's deadline cancels it
throughout, so nothing outlives it. Each front door keeps at most ``ray.max_calls_in_flight``
CNN calls on the replicas; callers beyond wait here, interactive first (Ray Serve's own queues
are FIFO), and a call whose deadline passes while it waits is never sent. Project errors raised
on a replica (catcascade.errors.CatcascadeError) are raised again here as themselves.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from typing import Callable, Mapping

import numpy as np

from catcascade.errors import CatcascadeError
from catcascade.serving.batcher import DeadlineUnmeetableError, QueueFullError
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.cnn_engine import EncodedResult, EngineUnavailableError
from catcascade.serving.engines.ray_config import GRPC_LIMIT_ENV, RayEngineConfig, grpc_message_limit
from catcascade.serving.traffic.priorities import PrioritySlots

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


def raise_grpc_message_limit(limit: int) -> None:
    """This process's Serve handles accept answers up to ``limit`` bytes. Effective only before
    ray.serve is first imported here; the answers (logits, scores) are small either way. The
    replicas get theirs from their runtime_env (ray_deployments.replica_env)."""
    if int(os.environ.get(GRPC_LIMIT_ENV, "0") or 0) < limit:
        os.environ[GRPC_LIMIT_ENV] = str(limit)


def connect(cfg: RayEngineConfig, max_message_bytes: int | None = None) -> bool:
    """Joins the cluster (or starts a local Ray when no address is set); True if this call
    started Ray here, so closing should stop it."""
    prefer_loopback(cfg.address)
    if max_message_bytes is not None:
        raise_grpc_message_limit(grpc_message_limit(max_message_bytes))
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


def _failure(error: BaseException) -> BaseException | None:
    """What a failed replica call raises here, or None when the replica died or could not be
    reached (another may answer). A project error raised on the replica comes back as itself
    (Ray wraps errors it carries by reference in a RayTaskError; its gRPC transport sends them
    as they are); a bug in the replica's code stays what Ray made of it: an internal error."""
    import grpc
    from ray import exceptions as rex

    cause = error.cause if isinstance(error, rex.RayTaskError) else error
    if isinstance(cause, CatcascadeError):
        return cause
    if isinstance(error, rex.RayTaskError) or not isinstance(error, (rex.RayError, grpc.aio.AioRpcError,
                                                                        ConnectionError)):
        return error
    return None


def _too_large(error: BaseException) -> bool:
    """Serve's gRPC refused the message for its size: the same call would fail on any replica."""
    import grpc

    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class RayCnnEngine:
    """The CNN stage on Ray Serve (serving.engines.cnn_engine.CnnEngine): ``submit`` sends a
    tensor the front door decoded, ``submit_encoded`` the image's bytes for the replica to decode
    (``decodes_images``). At most ``max_calls_in_flight`` calls are on the replicas at once; the
    callers beyond wait in ``slots``, lowest priority value first. ``on_batch`` sees each
    request's batch size (batches form on the replicas, out of sight of any one front door)."""

    def __init__(self, handle, decodes_images: bool, retries: int = 1, on_batch=None,
                 max_calls_in_flight: int = 32, max_waiting: int = 256):
        self.handle = handle.options(_by_reference=False)
        self.decodes_images = decodes_images
        self.retries = retries
        self.on_batch = on_batch
        self.slots = PrioritySlots(max_calls_in_flight, max_waiting)
        self.retried = 0

    @property
    def depth(self) -> int:
        """Calls waiting here for a slot plus those on the replicas."""
        return self.slots.waiting + self.slots.in_use

    @property
    def running(self) -> int:
        return self.slots.in_use

    async def start(self) -> None:
        """Nothing to start: the replicas live on the cluster."""

    async def stop(self) -> None:
        """Nothing to stop: other front doors may share the replicas."""

    async def submit(self, x: np.ndarray, priority: int = 0, deadline: float | None = None) -> EncodedResult:
        return await self._call(self.handle.classify_tensor, x, priority, deadline)

    async def submit_encoded(self, data: bytes, priority: int = 0, deadline: float | None = None) -> EncodedResult:
        return await self._call(self.handle.classify_encoded, data, priority, deadline)

    async def _slot(self, priority: int, deadline: float | None) -> None:
        """Waits for a call slot, or refuses: QueueFullError when too many wait already,
        DeadlineUnmeetableError when the deadline passes first."""
        if self.slots.try_acquire():
            return
        if self.slots.waiting >= self.slots.max_waiting:
            raise QueueFullError(f"{self.slots.waiting} CNN calls already wait for the Ray replicas")
        timeout = None if deadline is None else deadline - time.monotonic()
        if not await self.slots.acquire(priority, timeout):
            raise DeadlineUnmeetableError("the deadline passed while waiting for a CNN replica")

    async def _call(self, method, payload, priority: int, deadline: float | None) -> EncodedResult:
        """``method``: the handle's method for this payload (tensor or encoded bytes)."""
        from ray.serve.exceptions import BackPressureError

        from catcascade.cnn_stage.preprocessing import InvalidImageError

        await self._slot(priority, deadline)
        try:
            for attempt in range(self.retries + 1):
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineUnmeetableError("the deadline passed before the CNN call was sent")
                t0 = time.perf_counter()
                try:
                    answer = await method.remote(payload)
                    break
                except BackPressureError as e:
                    raise QueueFullError(f"CNN replicas are saturated: {e}") from None
                except Exception as e:
                    if _too_large(e):  # not an outage: no replica would take it
                        raise InvalidImageError(f"the request ({len(payload)} bytes) is larger than the CNN "
                                                "replicas accept (their limit follows limits.max_message_bytes "
                                                "of the front door that deployed them)", "bytes") from None
                    failure = _failure(e)
                    if failure is not None:
                        raise failure from None
                    if attempt >= self.retries:
                        raise EngineUnavailableError(f"CNN stage unavailable: {type(e).__name__}: "
                                                     f"{str(e)[:200]}") from None
                    self.retried += 1
                    log.warning("CNN replica call failed (%s); retrying on another replica", type(e).__name__)
        finally:
            self.slots.release()
        if answer.error is not None:
            raise InvalidImageError(answer.error, answer.error_reason)
        total_ms = (time.perf_counter() - t0) * 1000.0
        if self.on_batch is not None:
            self.on_batch(answer.batch_size)
        # queue_ms: everything but decode and compute, i.e. the replica's batch queue plus the Ray hop.
        return EncodedResult(answer.output, max(0.0, total_ms - answer.compute_ms - answer.decode_ms),
                             answer.compute_ms, answer.batch_size, answer.decode_ms)


def _bounded_for_vlm(image, max_side: int):
    """The copy the vLLM client would send anyway (it shrinks to ``max_side`` the same way), so
    the image crossing to the replica stays small whatever was uploaded."""
    from PIL import Image

    if max(image.size) <= max_side:
        return image
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


class RayVerifier:
    """The VlmStage deployment as a Verifier (serving.cascade_engine.Verifier): priority and
    trace headers travel with each call, and the replica's errors come back as the local vLLM
    client's own exceptions, so breaker and reasons behave alike. ``request_headers`` is called
    per call on the front door (the current span's trace context); per-call ``headers`` add to it."""

    def __init__(self, handle, config, request_headers: Callable[[], Mapping[str, str]] | None = None):
        self.handle = handle.options(_by_reference=False)
        self.config = config
        self.request_headers = request_headers

    @property
    def model_name(self) -> str:
        return self.config.model

    def _headers(self, headers: Mapping[str, str] | None) -> dict[str, str] | None:
        merged = dict(self.request_headers()) if self.request_headers is not None else {}
        merged.update(headers or {})
        return merged or None

    async def _call(self, method, *args, **kwargs):
        from catcascade.vlm_stage.vllm_client import VlmUnavailableError

        try:
            return await method.remote(*args, **kwargs)
        except Exception as e:
            failure = _failure(e)
            if failure is not None:
                raise failure from None
            raise VlmUnavailableError(f"VLM deployment unreachable: {type(e).__name__}: {str(e)[:200]}") from None

    async def verify(self, image, candidates: tuple[str, ...], *, priority: int = 0,
                     headers: Mapping[str, str] | None = None):
        return await self._call(self.handle.verify, _bounded_for_vlm(image, self.config.max_image_side), tuple(candidates),
                                priority=int(priority), headers=self._headers(headers))

    async def explain(self, image, breed: str, max_tokens: int, *, priority: int = 0,
                      headers: Mapping[str, str] | None = None):
        return await self._call(self.handle.explain, _bounded_for_vlm(image, self.config.max_image_side), breed, max_tokens,
                                priority=int(priority), headers=self._headers(headers))

    async def warm_up(self, candidates: tuple[str, ...]) -> None:
        await self._call(self.handle.warm_up, tuple(candidates))

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


async def open_ray_stages(cfg: ServeConfig, bundle, on_batch=None,
                          request_headers: Callable[[], Mapping[str, str]] | None = None) -> RayStages:
    """Joins the cluster, deploys or attaches to the application, returns the stages.
    ``request_headers``: the trace context to send with each VLM call (the tracing's)."""
    owns = await asyncio.to_thread(connect, cfg.ray, cfg.limits.max_message_bytes)
    handle, info = await asyncio.to_thread(deploy_or_attach, cfg, bundle.version_string)
    verifier = None
    if cfg.vlm.backend == "vllm":
        if not info.get("has_vlm"):
            raise ValueError(f"Serve application {cfg.ray.app_name!r} has no VLM deployment, but this front door "
                             "is configured with vlm.urls")
        from ray import serve

        from catcascade.serving.engines.ray_deployments import VLM_DEPLOYMENT
        from catcascade.serving.vlm_backend import vlm_client_config

        vlm_handle = serve.get_deployment_handle(VLM_DEPLOYMENT, cfg.ray.app_name)
        verifier = RayVerifier(vlm_handle, vlm_client_config(cfg, bundle), request_headers)
    queued = cfg.ray.cnn.max_queued_requests
    cnn = RayCnnEngine(handle, decodes_images=cfg.ray.decode == "replica", retries=cfg.ray.request_retries,
                       on_batch=on_batch, max_calls_in_flight=cfg.ray.max_calls_in_flight,
                       max_waiting=queued if queued >= 0 else 1 << 30)
    log.info("Ray engine ready: application %r, bundle %s, decode on the %s", cfg.ray.app_name, info["bundle"],
             cfg.ray.decode)
    return RayStages(cnn, verifier, info, owns)
