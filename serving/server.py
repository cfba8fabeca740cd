"""The grpc.aio server: CatClassifier plus the standard health and reflection services.

The servicer only speaks gRPC: each call goes through the front door's chain
(serving/front_door/), and every failure becomes a status code through the one table in
serving/status_codes.py. A message that is not valid protobuf is answered INVALID_ARGUMENT (a
stream first answers what came before it).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.config import ConnectionsConfig
from catcascade.serving.front_door.authentication import BearerTokenInterceptor
from catcascade.serving.front_door.chain import FrontDoor
from catcascade.serving.front_door.observation import span_attributes
from catcascade.serving.front_door.routing import VersionRouter
from catcascade.serving.observability.tracing import NoTracing
from catcascade.serving.request_errors import MALFORMED, lenient
from catcascade.serving.status_codes import status_of

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CatClassifier"].full_name
VLM_HEALTH_NAME = SERVICE_NAME + ".vlm"
MALFORMED_MESSAGE = "the request is not a valid catcascade.v1.ClassifyRequest message"


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class CatClassifierServicer:
    def __init__(self, front_door: FrontDoor, tracing: NoTracing | None = None):
        self.front_door = front_door
        self.metrics = front_door.metrics
        self.tracing = tracing or NoTracing()
        self.http_port: int | None = None
        """The Open Inference REST API's bound port, while one is served (ServeConfig.http_port)."""

    def add_to(self, server) -> None:
        """Registers the service; ClassifyRequests are parsed leniently (MALFORMED, not UNKNOWN)."""
        request = lenient(pb.ClassifyRequest.FromString)
        response = pb.ClassifyResponse.SerializeToString
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Classify": grpc.unary_unary_rpc_method_handler(self.Classify, request, response),
            "ClassifyStream": grpc.stream_stream_rpc_method_handler(self.ClassifyStream, request, response),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, pb.GetModelInfoRequest.FromString, pb.ModelInfo.SerializeToString),
        }),))

    async def _classify(self, request: pb.ClassifyRequest, context, deadline: float | None):
        metadata = context.invocation_metadata()
        tenant = self.front_door.tenant_of(metadata)
        if not self.tracing.enabled:
            return await self.front_door.classify(request, tenant=tenant, deadline=deadline)
        with self.tracing.request_span("catcascade.Classify", metadata) as span:
            response = await self.front_door.classify(request, tenant=tenant, deadline=deadline,
                                                      trace_headers=self.tracing.outgoing_headers())
            self.tracing.annotate(span, span_attributes(request, response))
            return response

    async def Classify(self, request, context: grpc.aio.ServicerContext):
        if request is MALFORMED:
            self.metrics.requests.labels("Classify", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE)
        try:
            response = await self._classify(request, context, _deadline(context))
        except asyncio.CancelledError:
            self.metrics.requests.labels("Classify", "CANCELLED").inc()
            raise
        except Exception as e:
            code, message = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error on request_id=%s", request.request_id)
            self.metrics.requests.labels("Classify", code.name).inc()
            await context.abort(code, message)
        else:
            self.metrics.requests.labels("Classify", "OK").inc()
            return response
    async def ClassifyStream(self, request_iterator, context: grpc.aio.ServicerContext):
        """Each message is classified under the stream's deadline. A message that is not valid
        protobuf ends the call with INVALID_ARGUMENT once the answers to the messages before it
        are sent; when the stream ends early (client cancelled, deadline passed, connection
        lost) its messages' work is cancelled, so no orphaned escalation keeps a VLM slot."""
        deadline = _deadline(context)
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        tasks: set[asyncio.Task] = set()
        tenant = self.front_door.tenant_of(context.invocation_metadata())

        async def one(req):
            try:
                resp = await self.front_door.classify(req, tenant=tenant, deadline=deadline)
            except Exception as e:  # answered in the stream, which stays open
                code, message = status_of(e)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("internal error in stream request_id=%s", req.request_id)
                resp = pb.ClassifyResponse(request_id=req.request_id,
                                           error=pb.RequestError(code=code.name, message=message))
            self.metrics.requests.labels("ClassifyStream", resp.error.code or "OK").inc()
            await queue.put(resp)

        async def reader():
            ending = None
            try:
                async for req in request_iterator:
                    if req is MALFORMED:
                        self.metrics.requests.labels("ClassifyStream", "INVALID_ARGUMENT").inc()
                        ending = (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE)
                        break
                    task = asyncio.create_task(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    while len(tasks) >= 32:  # bound in-flight work per stream
                        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            except Exception as e:  # the stream broke: end the call instead of leaving it open
                log.warning("stream reader failed: %r", e)
                ending = (grpc.StatusCode.INVALID_ARGUMENT, f"the request stream broke: {e}"[:300])
            if tasks:
                await asyncio.wait(tasks)
            await queue.put(ending)

        reader_task = asyncio.create_task(reader())
        try:
            while isinstance(item := await queue.get(), pb.ClassifyResponse):
                yield item
            if item is not None:
                await context.abort(*item)
        finally:
            reader_task.cancel()
            pending = list(tasks)
            for task in pending:
                task.cancel()
            if pending:  # wait for their cleanup (escalation slots, breaker leases) to run
                await asyncio.wait(pending, timeout=5.0)

    async def GetModelInfo(self, request, context):
        return self.front_door.router.model_info()


def server_credentials(tls) -> grpc.ServerCredentials:
    """TLS from a serving.config.TlsConfig; a client CA turns on mutual TLS."""
    key, cert = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


# gRPC binds with SO_REUSEPORT by default: a second server started on a port already in use
# binds too, silently, and the kernel splits new connections between the two (an old version
# left running would keep answering part of the traffic). Refuse the port instead.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


def bind_port(server, address: str, tls, what: str) -> int:
    """Binds ``address`` (TLS when ``tls``); the bound port, or OSError saying why not."""
    try:
        bound = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    except RuntimeError:  # grpcio >= 1.60 raises instead of returning 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {what} to {address}: the port is in use or the address is not this machine's")
    return bound


@contextlib.asynccontextmanager
async def run_server(servicer: CatClassifierServicer, host: str = "127.0.0.1", port: int = 0,
                     max_message_bytes: int = 21 * 1024 * 1024, grace_s: float = 5.0, tls=None,
                     connections: ConnectionsConfig = ConnectionsConfig()):
    """Serves on ``host:port`` (0 picks a free port) and yields ``(server, bound_port, health)``.

    On exit, health flips to NOT_SERVING, new calls are refused and in-flight calls get
    ``grace_s`` seconds to finish. ``connections``: keepalive, idle and age limits, bounds.
    """
    refused = servicer.metrics.unauthenticated
    authenticator = servicer.front_door.authenticator
    interceptors = ([BearerTokenInterceptor(authenticator, on_refused=lambda method: refused.labels(method).inc())]
                    if authenticator.required else [])
    limit = connections.max_concurrent_rpcs  # beyond it, RESOURCE_EXHAUSTED before any handler runs
    server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=limit, options=[
        ("grpc.max_receive_message_length", max_message_bytes + 64 * 1024),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        *connections.grpc_options(),
        *EXCLUSIVE_PORT,
    ])
    servicer.add_to(server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    if importlib.util.find_spec("tritonclient") is not None:  # KServe v2 beside v1 (its stubs ship there)
        from catcascade.serving.open_inference import SERVICE, OpenInferenceServicer

        OpenInferenceServicer(servicer.front_door, servicer.tracing).add_to(server)
        names += (SERVICE.full_name,)
    else:
        log.warning("tritonclient is not installed: no Open Inference Protocol (KServe v2) service")
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    bound = bind_port(server, f"{host}:{port}", tls, "the gRPC server")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set(SERVICE_NAME, serving)
    tracker = VlmHealthTracker(health_servicer, servicer.front_door.router)
    await tracker.update()
    watchers = [asyncio.create_task(tracker.watch())]
    if servicer.front_door.admission is not None:
        watchers.append(asyncio.create_task(servicer.front_door.admission.watch_loop_lag()))
    try:
        yield server, bound, health_servicer
    finally:
        for watcher in watchers:
            watcher.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace_s)


class VlmHealthTracker:
    """Publishes the VLM's state as its own health service name, so a VLM outage shows as
    degraded without taking the CNN path (the main service name) out of rotation."""

    def __init__(self, health_servicer, router: VersionRouter, period_s: float = 0.5):
        self.health = health_servicer
        self.router = router
        self.period_s = period_s
        self._last = None

    def status(self):
        """SERVING only while the breaker is closed: open (failing, or a hang the watchdog saw)
        and half-open (not yet known to be back) are both NOT_SERVING."""
        ok = self.router.live_engine().vlm_serving()
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING

    async def update(self) -> None:
        status = self.status()
        if status != self._last:
            self._last = status
            await self.health.set(VLM_HEALTH_NAME, status)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            await self.update()
