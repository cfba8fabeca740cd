"""The chain every Classify call runs, in the order serving/front_door/__init__.py lists. Admission
is asked on a cache miss only: refusing a cached answer would refuse free work under overload."""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

from catcascade.cnn_stage.preprocessing import InvalidImageError
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import ANONYMOUS, CascadeResult, ClassifyRequest
from catcascade.serving.front_door.authentication import Authenticator
from catcascade.serving.front_door.caching import CacheStage
from catcascade.serving.front_door.observation import Observer
from catcascade.serving.front_door.routing import Route, VersionRouter
from catcascade.serving.front_door.validation import validated_request
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.request_errors import OverloadedError
from catcascade.serving.traffic.admission import AdmissionController, AdmissionRefused
from catcascade.serving.traffic.tenant_budgets import TenantBudgets

log = logging.getLogger("catcascade.serving.server")  # the request log keeps its name


def result_to_proto(request_id: str, r: CascadeResult) -> pb.ClassifyResponse:
    def scores(labels, probs) -> list[pb.LabelScore]:
        return [pb.LabelScore(label=name, probability=float(p)) for name, p in zip(labels, probs)]

    t = r.timings
    resp = pb.ClassifyResponse(
        request_id=request_id, labels=scores(r.labels.labels, r.labels.probabilities),
        cnn_top_k=scores(r.cnn.labels, r.cnn.probabilities), escalated=r.escalated,
        escalation_reason=int(r.reason), escalation_detail=r.detail,
        timings=pb.StageTimings(decode_ms=t.decode_ms, cnn_queue_ms=t.cnn_queue_ms, cnn_ms=t.cnn_ms, vlm_ms=t.vlm_ms,
                                blend_ms=t.blend_ms, total_ms=t.total_ms, cnn_batch_size=t.cnn_batch_size,
                                rationale_ms=t.rationale_ms),
        versions=r.versions)
    if r.rationale is not None:
        resp.rationale.CopyFrom(pb.Rationale(text=r.rationale.text, label=r.rationale.label,
                                             tokens=r.rationale.tokens, model=r.rationale.model))
    elif r.rationale_error:
        resp.rationale.CopyFrom(pb.Rationale(error=r.rationale_error))
    if r.vlm is not None:
        resp.vlm.CopyFrom(pb.VlmScores(candidates=scores(r.vlm.candidates, r.vlm.probabilities),
                                       none_probability=r.vlm.none_probability, model=r.vlm.model,
                                       scoring_mode=r.vlm.mode))
    return resp


class FrontDoor:
    def __init__(self, router: VersionRouter, metrics: ServiceMetrics, *, authenticator: Authenticator | None = None,
                 admission: AdmissionController | None = None, cache: CacheStage | None = None,
                 budgets: TenantBudgets | None = None, observer: Observer | None = None, max_inflight: int = 512):
        self.router = router
        self.metrics = metrics
        self.authenticator = authenticator or Authenticator([])
        self.admission = admission
        self.cache = cache
        self.budgets = budgets
        self.observer = observer or Observer(metrics)
        self.max_inflight = max_inflight
        self.inflight = 0
        metrics.inflight.set_function(lambda: self.inflight)
        if admission is not None:
            metrics.admission_wait_ms.set_function(lambda: admission.estimated_wait_s() * 1000.0)

    def tenant_of(self, metadata) -> str:
        """The caller's tenant (the interceptor already refused callers it cannot identify)."""
        return self.authenticator.identify(metadata) or ANONYMOUS

    async def classify(self, message: pb.ClassifyRequest, *, tenant: str, deadline: float | None,
                       trace_headers: Mapping[str, str] | None = None) -> pb.ClassifyResponse:
        request = validated_request(message, labels=len(self.router.live_engine().labels), deadline=deadline,
                                    tenant=tenant, trace_headers=trace_headers)
        if self.budgets is not None:
            self.budgets.count_request(tenant)
        route = self.router.route(request)
        if self.cache is None or request.explain:  # a rationale is generated text: never reused
            return await self._compute(request, route)
        return await self.cache.answer(request, route, lambda: self._compute(request, route))

    async def _compute(self, request: ClassifyRequest, route: Route) -> pb.ClassifyResponse:
        if self.inflight >= self.max_inflight:
            raise OverloadedError(f"server overloaded: {self.inflight} requests in flight "
                                  f"(limit {self.max_inflight})")
        ticket = None
        if self.admission is not None:
            try:
                ticket = self.admission.admit(request.deadline)
            except AdmissionRefused as e:
                self.metrics.admission_refusals.labels(e.reason).inc()
                raise
            request = dataclasses.replace(request, on_cnn_done=ticket.served)
        self.inflight += 1
        try:
            result = await route.run(request)
        except InvalidImageError as e:
            if ticket is not None:
                ticket.served()  # decoding it was the work
            self.metrics.images_refused.labels(e.reason).inc()
            log.info("invalid image request_id=%s: %s", request.request_id, e, extra={"request_id": request.request_id})
            raise
        finally:
            self.inflight -= 1
            if ticket is not None:
                ticket.release()
        self.observer.computed(request, result, self.router.live_engine())
        return result_to_proto(request.request_id, result)
