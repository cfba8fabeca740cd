"""The grpc.aio server: CatClassifier plus the standard health and reflection services.

The servicer is thin: it validates the request, calls the pipeline and maps results and
errors to protobuf and gRPC status codes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnn_stage.preprocessing import InvalidImageError
from ensemble.escalation_policy import EscalationMode
from serving.api import cascade_pb2 as pb
from serving.api import cascade_pb2_grpc as pb_grpc
from serving.auth import BearerTokenInterceptor
from serving.batcher import QueueFullError
from serving.engines.cnn_engine import EngineUnavailableError
from serving.metrics import ServiceMetrics
from serving.pipeline import CascadePipeline, CascadeResult, DeadlineExceededError

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CatClassifier"].full_name
VLM_HEALTH_NAME = SERVICE_NAME + ".vlm"
MAX_REQUEST_ID = 128
MAX_TOP_K = 100


def _scores(labels, probs) -> list[pb.LabelScore]:
    return [pb.LabelScore(label=name, probability=float(p)) for name, p in zip(labels, probs)]


def result_to_proto(request_id: str, r: CascadeResult, versions: pb.ModelVersions) -> pb.ClassifyResponse:
    t = r.timings
    resp = pb.ClassifyResponse(
        request_id=request_id,
        labels=_scores(r.labels.labels, r.labels.probabilities),
        cnn_top_k=_scores(r.cnn.labels, r.cnn.probabilities),
        escalated=r.escalated,
        escalation_reason=int(r.reason),
        escalation_detail=r.detail,
        timings=pb.StageTimings(decode_ms=t.decode_ms, cnn_queue_ms=t.cnn_queue_ms, cnn_ms=t.cnn_ms, vlm_ms=t.vlm_ms,
                                blend_ms=t.blend_ms, total_ms=t.total_ms, cnn_batch_size=t.cnn_batch_size,
                                rationale_ms=t.rationale_ms),
        versions=versions,
    )
    if r.rationale is not None:
        resp.rationale.CopyFrom(pb.Rationale(text=r.rationale.text, label=r.rationale.label,
                                             tokens=r.rationale.tokens, model=r.rationale.model))
    elif r.rationale_error:
        resp.rationale.CopyFrom(pb.Rationale(error=r.rationale_error))
    if r.vlm is not None:
        resp.vlm.CopyFrom(pb.VlmScores(candidates=_scores(r.vlm.candidates, r.vlm.probabilities),
                                       none_probability=r.vlm.none_probability, model=r.vlm.model,
                                       scoring_mode=r.vlm.mode))
    return resp


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class CatClassifierServicer(pb_grpc.CatClassifierServicer):
    def __init__(self, pipeline: CascadePipeline, versions: pb.ModelVersions, model_info: pb.ModelInfo,
                 metrics: ServiceMetrics | None = None, max_inflight: int = 512):
        self.pipeline = pipeline
        self.versions = versions
        self.model_info = model_info
        self.metrics = metrics or ServiceMetrics()
        self.max_inflight = max_inflight
        self.inflight = 0
        self.metrics.inflight.set_function(lambda: self.inflight)

    def _validate(self, request: pb.ClassifyRequest) -> tuple[str, int, EscalationMode]:
        if len(request.request_id) > MAX_REQUEST_ID:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id longer than {MAX_REQUEST_ID} characters")
        if not request.request_id.isprintable():  # control characters and line breaks could forge log lines
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "request_id must be printable characters (no control characters or line breaks)")
        if request.top_k > min(MAX_TOP_K, len(self.pipeline.labels)):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"top_k={request.top_k} exceeds the {len(self.pipeline.labels)} known labels")
        if request.escalation not in pb.EscalationMode.values():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown escalation mode {request.escalation}")
        return request.request_id or uuid.uuid4().hex, request.top_k, EscalationMode(request.escalation)

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        request_id, k, mode = self._validate(request)
        if self.inflight >= self.max_inflight:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server overloaded: {self.inflight} requests in flight (limit {self.max_inflight})")
        self.inflight += 1
        try:
            result = await self.pipeline.classify(request.image, k or None, mode, deadline, explain=request.explain)
        except InvalidImageError as e:
            self.metrics.images_refused.labels(e.reason).inc()
            log.info("invalid image request_id=%s: %s", request_id, e, extra={"request_id": request_id})
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except QueueFullError as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {e}") from None
        except DeadlineExceededError as e:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except EngineUnavailableError as e:  # e.g. the Ray engine's CNN replicas died: clients may retry
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        finally:
            self.inflight -= 1
        self._observe(result)
        # A model repository's router tags each result with the version that answered it.
        versions = getattr(result, "versions", None) or self.versions
        log.info("classified request_id=%s escalated=%s reason=%s total_ms=%.1f version=%s", request_id,
                 result.escalated, result.reason.name, result.timings.total_ms,
                 versions.model_version or versions.bundle,
                 extra={"request_id": request_id, "escalation_reason": result.reason.name,
                        "total_ms": round(result.timings.total_ms, 2),
                        "model_version": versions.model_version or versions.bundle, "route": versions.route})
        return result_to_proto(request_id, result, versions)

    def _observe(self, r: CascadeResult) -> None:
        m, t = self.metrics, r.timings
        for stage, ms in (("decode", t.decode_ms), ("cnn_queue", t.cnn_queue_ms), ("cnn", t.cnn_ms),
                          ("total", t.total_ms)):
            m.stage_ms.labels(stage).observe(ms)
        if r.escalated:
            m.stage_ms.labels("vlm").observe(t.vlm_ms)
            m.stage_ms.labels("blend").observe(t.blend_ms)
        if r.rationale is not None:
            m.stage_ms.labels("rationale").observe(t.rationale_ms)
        m.escalations.labels(r.reason.name).inc()

    async def Classify(self, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            response = await self._classify(request, deadline)
        except RequestError as e:
            self.metrics.requests.labels("Classify", e.code.name).inc()
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            self.metrics.requests.labels("Classify", "CANCELLED").inc()
            raise
        except Exception:
            log.exception("internal error on request_id=%s", request.request_id)
            self.metrics.requests.labels("Classify", "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged on the server)")
        else:
            self.metrics.requests.labels("Classify", "OK").inc()
            return response

    async def ClassifyStream(self, request_iterator, context: grpc.aio.ServicerContext):
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)

        async def one(req):
            try:
                resp = await self._classify(req, None)
            except RequestError as e:
                resp = pb.ClassifyResponse(request_id=req.request_id,
                                           error=pb.RequestError(code=e.code.name, message=e.message))
            except Exception as e:  # keep the stream alive
                log.exception("internal error in stream request_id=%s", req.request_id)
                resp = pb.ClassifyResponse(request_id=req.request_id,
                                           error=pb.RequestError(code="INTERNAL", message=str(e)[:200]))
            self.metrics.requests.labels("ClassifyStream", resp.error.code or "OK").inc()
            await queue.put(resp)

        async def reader():
            tasks = set()
            async for req in request_iterator:
                task = asyncio.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                while len(tasks) >= 32:  # bound in-flight work per stream
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks:
                await asyncio.wait(tasks)
            await queue.put(None)

        reader_task = asyncio.create_task(reader())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            reader_task.cancel()

    async def GetModelInfo(self, request, context):
        return getattr(self.pipeline, "model_info", None) or self.model_info  # a router's follows its live version


def server_credentials(tls) -> grpc.ServerCredentials:
    """TLS from a serving.config.TlsConfig; a client CA turns on mutual TLS."""
    key, cert = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@contextlib.asynccontextmanager
async def run_server(servicer: CatClassifierServicer, host: str = "127.0.0.1", port: int = 0,
                     max_message_bytes: int = 21 * 1024 * 1024, grace_s: float = 5.0, tls=None,
                     tokens: list[str] | None = None):
    """Serves on ``host:port`` (0 picks a free port) and yields ``(server, bound_port, health)``.

    On exit, health flips to NOT_SERVING, new calls are refused and in-flight calls get
    ``grace_s`` seconds to finish.
    """
    refused = servicer.metrics.unauthenticated
    interceptors = ([BearerTokenInterceptor(tokens, on_refused=lambda method: refused.labels(method).inc())]
                    if tokens else [])
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes + 64 * 1024),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ])
    pb_grpc.add_CatClassifierServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set(SERVICE_NAME, serving)
    tracker = VlmHealthTracker(health_servicer, servicer.pipeline)
    await tracker.update()
    watcher = asyncio.create_task(tracker.watch())
    try:
        yield server, bound, health_servicer
    finally:
        watcher.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace_s)


class VlmHealthTracker:
    """Publishes the VLM's state as its own health service name, so a VLM outage shows as
    degraded without taking the CNN path (the main service name) out of rotation."""

    def __init__(self, health_servicer, pipeline: CascadePipeline, period_s: float = 0.5):
        self.health = health_servicer
        self.pipeline = pipeline
        self.period_s = period_s
        self._last = None

    def status(self):
        from serving.circuit_breaker import BreakerState

        ok = self.pipeline.verifier is not None and (
            self.pipeline.breaker is None or self.pipeline.breaker.state != BreakerState.OPEN)
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
