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

from catcascade.cnn_stage.preprocessing import InvalidImageError
from catcascade.ensemble.escalation_policy import EscalationMode
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.serving.auth import BearerTokenInterceptor
from catcascade.serving.batcher import QueueFullError
from catcascade.serving.engines.cnn_engine import EngineUnavailableError
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.observability.drift import DriftConfig, DriftMonitor, vlm_agrees
from catcascade.serving.observability.tracing import NoTracing
from catcascade.serving.pipeline import CascadePipeline, CascadeResult, DeadlineExceededError
from catcascade.serving.traffic.priorities import Priority
from catcascade.serving.traffic.response_cache import SingleFlight, cache_key
from catcascade.serving.traffic.admission import AdmissionController, AdmissionRefused

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CatClassifier"].full_name
VLM_HEALTH_NAME = SERVICE_NAME + ".vlm"
MAX_REQUEST_ID = 128
MAX_TOP_K = 100
# Answers the response cache may keep: the cascade ran as designed. A CNN-only answer given
# because the VLM was down, shed, out of time or out of the tenant's budget is not.
CACHEABLE_REASONS = frozenset({pb.ESCALATION_REASON_CONFIDENT, pb.ESCALATION_REASON_LOW_CONFIDENCE,
                               pb.ESCALATION_REASON_REQUESTED_ALWAYS, pb.ESCALATION_REASON_REQUESTED_NEVER,
                               pb.ESCALATION_REASON_VLM_DISABLED})


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


def cacheable(response: pb.ClassifyResponse) -> bool:
    return response.escalation_reason in CACHEABLE_REASONS


class CatClassifierServicer(pb_grpc.CatClassifierServicer):
    def __init__(self, pipeline: CascadePipeline, versions: pb.ModelVersions, model_info: pb.ModelInfo,
                 metrics: ServiceMetrics | None = None, max_inflight: int = 512, cache=None,
                 tracing: NoTracing | None = None, tenants=None, drift: DriftConfig | None = None,
                 admission: AdmissionController | None = None):
        """``cache``: a serving.traffic.response_cache.ResponseCache of ClassifyResponses;
        ``tenants``: serving.traffic.tenant_budgets.TenantBudgets (names each request's
        tenant); ``drift``: the drift signals' settings; ``admission``: queue-delay admission
        (serving.traffic.admission). Each None = off."""
        self.pipeline = pipeline
        self.versions = versions
        self.model_info = model_info
        self.metrics = metrics or ServiceMetrics()
        self.max_inflight = max_inflight
        self.admission = admission
        self.inflight = 0
        self.metrics.inflight.set_function(lambda: self.inflight)
        self.cache = cache
        self.tracing = tracing or NoTracing()
        self.tenants = tenants
        self.drift_config = drift
        self._drift: DriftMonitor | None = None
        self._flights = SingleFlight()
        if admission is not None:
            self.metrics.admission_wait_ms.set_function(lambda: admission.estimated_wait_s() * 1000.0)

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
        if request.priority not in pb.Priority.values():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown priority {request.priority}")
        return request.request_id or uuid.uuid4().hex, request.top_k, EscalationMode(request.escalation)

    def _live_versions(self) -> pb.ModelVersions:
        """The versions serving now (a model repository's router swaps them; a bundle's are fixed)."""
        return getattr(self.pipeline, "versions", None) or self.versions

    def _tenant(self, context) -> str:
        return self.tenants.tenant_of(context.invocation_metadata()) if self.tenants is not None else ""

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None,
                        tenant: str = "") -> pb.ClassifyResponse:
        if self.tenants is not None:
            self.tenants.count_request(tenant)
        if self.cache is None or request.explain:  # a rationale is generated text: never reused
            return await self._compute(request, deadline, tenant)
        t0 = time.perf_counter()
        request_id, k, mode = self._validate(request)
        v = self._live_versions()
        key = cache_key(request.image, mode, k or self.pipeline.config.default_top_k, f"{v.bundle}|{v.cnn}|{v.vlm}")
        hit = self.cache.get(key)
        if hit is not None:
            return self._reused(hit, request_id, t0)
        response, shared = await self._flights.run(key, lambda: self._compute_and_store(key, request, deadline, tenant))
        if not shared:
            return response
        if cacheable(response):
            self.cache.count_shared()
            return self._reused(response, request_id, t0)
        # The answer in flight was degraded for its own caller (deadline, budget, VLM down):
        # this caller gets a computation of its own.
        return await self._compute(request, deadline, tenant)

    async def _compute_and_store(self, key: bytes, request: pb.ClassifyRequest, deadline: float | None,
                                 tenant: str) -> pb.ClassifyResponse:
        response = await self._compute(request, deadline, tenant)
        if cacheable(response):
            self.cache.put(key, response)
        return response

    @staticmethod
    def _reused(response: pb.ClassifyResponse, request_id: str, t0: float) -> pb.ClassifyResponse:
        """A stored or shared answer as this request's: its id, cached=True, its own total time."""
        out = pb.ClassifyResponse()
        out.CopyFrom(response)
        out.request_id = request_id
        out.cached = True
        out.timings.CopyFrom(pb.StageTimings(total_ms=(time.perf_counter() - t0) * 1000.0))
        return out

    async def _compute(self, request: pb.ClassifyRequest, deadline: float | None, tenant: str) -> pb.ClassifyResponse:
        request_id, k, mode = self._validate(request)
        if self.inflight >= self.max_inflight:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server overloaded: {self.inflight} requests in flight (limit {self.max_inflight})")
        ticket = None
        if self.admission is not None:
            try:
                ticket = self.admission.admit(deadline)
            except AdmissionRefused as e:
                self.metrics.admission_refusals.labels(e.reason).inc()
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        self.inflight += 1
        try:
            result = await self.pipeline.classify(request.image, k or None, mode, deadline, explain=request.explain,
                                                  priority=Priority(request.priority), tenant=tenant,
                                                  on_cnn_done=ticket.served if ticket else None)
        except InvalidImageError as e:
            if ticket is not None:
                ticket.served()  # decoding it was the work
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
            if ticket is not None:
                ticket.release()
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
        drift = self.drift
        if drift is not None:
            drift.observe(float(r.cnn.probabilities[0]), r.escalated, vlm_agrees(r.cnn.labels[0], r.vlm))

    @property
    def drift(self) -> DriftMonitor | None:
        """The drift monitor of the live model version (a new one after a swap), or None when off."""
        if self.drift_config is None:
            return None
        version = self._live_versions().bundle
        if self._drift is None or self._drift.version != version:
            self._drift = DriftMonitor(version, getattr(self.pipeline, "confidence_reference", None),
                                       self.drift_config, self.metrics.registry)
        return self._drift

    async def Classify(self, request, context: grpc.aio.ServicerContext):
        if self.tracing.enabled:
            with self.tracing.request_span("catcascade.Classify", context.invocation_metadata()) as span:
                response = await self._classify_rpc(request, context)
                self.tracing.annotate(span, self._span_attributes(request, response))
                return response
        return await self._classify_rpc(request, context)

    def _span_attributes(self, request: pb.ClassifyRequest, r: pb.ClassifyResponse) -> dict:
        return {"catcascade.request_id": r.request_id, "catcascade.escalated": r.escalated,
                "catcascade.escalation_reason": pb.EscalationReason.Name(r.escalation_reason),
                "catcascade.cached": r.cached, "catcascade.priority": pb.Priority.Name(request.priority),
                "catcascade.mode": pb.EscalationMode.Name(request.escalation),
                "catcascade.version.bundle": r.versions.bundle, "catcascade.version.cnn": r.versions.cnn,
                "catcascade.version.vlm": r.versions.vlm}

    async def _classify_rpc(self, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            response = await self._classify(request, deadline, self._tenant(context))
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
        """Each message is classified under the stream's deadline; when the stream ends early
        (client cancelled, deadline passed, connection lost) its messages' work is cancelled,
        so no orphaned escalation keeps a VLM slot."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        tasks: set[asyncio.Task] = set()
        tenant = self._tenant(context)

        async def one(req):
            try:
                resp = await self._classify(req, deadline, tenant)
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
            async for req in request_iterator:
                task = asyncio.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                while len(tasks) >= 32:  # bound in-flight work per stream
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks:
                await asyncio.wait(tasks)
            await queue.put(None)

        handler = asyncio.current_task()

        def reader_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:  # the stream broke: end the call
                log.warning("stream reader failed: %r", task.exception())
                handler.cancel()

        reader_task = asyncio.create_task(reader())
        reader_task.add_done_callback(reader_done)
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            reader_task.cancel()
            pending = list(tasks)
            for task in pending:
                task.cancel()
            if pending:  # wait for their cleanup (escalation slots, breaker leases) to run
                await asyncio.wait(pending, timeout=5.0)

    async def GetModelInfo(self, request, context):
        return getattr(self.pipeline, "model_info", None) or self.model_info  # a router's follows its live version


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
        *EXCLUSIVE_PORT,
    ])
    pb_grpc.add_CatClassifierServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = bind_port(server, f"{host}:{port}", tls, "the gRPC server")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set(SERVICE_NAME, serving)
    tracker = VlmHealthTracker(health_servicer, servicer.pipeline)
    await tracker.update()
    watchers = [asyncio.create_task(tracker.watch())]
    if servicer.admission is not None:
        watchers.append(asyncio.create_task(servicer.admission.watch_loop_lag()))
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

    def __init__(self, health_servicer, pipeline: CascadePipeline, period_s: float = 0.5):
        self.health = health_servicer
        self.pipeline = pipeline
        self.period_s = period_s
        self._last = None

    def status(self):
        """SERVING only while the breaker is closed: open (failing, or a hang the watchdog saw)
        and half-open (not yet known to be back) are both NOT_SERVING."""
        from catcascade.serving.circuit_breaker import BreakerState

        ok = self.pipeline.verifier is not None and (
            self.pipeline.breaker is None or self.pipeline.breaker.state == BreakerState.CLOSED)
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
