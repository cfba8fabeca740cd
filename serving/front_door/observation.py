"""The last stage: what one computed answer tells the operators (stage metrics, escalation
reasons, drift of the live version, one log line) and the request span's attributes."""
from __future__ import annotations

import logging

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import CascadeEngine, CascadeResult, ClassifyRequest
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.observability.drift import DriftConfig, DriftMonitor, vlm_agrees

log = logging.getLogger("catcascade.serving.server")  # the request log keeps its name


class Observer:
    def __init__(self, metrics: ServiceMetrics, drift: DriftConfig | None = None):
        """``drift``: the drift signals' settings (None = off)."""
        self.metrics = metrics
        self.drift_config = drift
        self._drift: DriftMonitor | None = None

    def drift(self, live: CascadeEngine) -> DriftMonitor | None:
        """The drift monitor of the live version (a new one after a swap), or None when off."""
        if self.drift_config is None:
            return None
        identity = live.identity
        if self._drift is None or self._drift.version != identity.versions.bundle:
            self._drift = DriftMonitor(identity.versions.bundle, identity.confidence_reference, self.drift_config,
                                       self.metrics.registry)
        return self._drift

    def computed(self, request: ClassifyRequest, r: CascadeResult, live: CascadeEngine) -> None:
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
        drift = self.drift(live)
        if drift is not None and r.versions.bundle == live.identity.versions.bundle:
            drift.observe(float(r.cnn.probabilities[0]), r.escalated, vlm_agrees(r.cnn.labels[0], r.vlm))
        v = r.versions
        log.info("classified request_id=%s escalated=%s reason=%s total_ms=%.1f version=%s", request.request_id,
                 r.escalated, r.reason.name, t.total_ms, v.model_version or v.bundle,
                 extra={"request_id": request.request_id, "escalation_reason": r.reason.name,
                        "total_ms": round(t.total_ms, 2), "model_version": v.model_version or v.bundle,
                        "route": v.route})


def span_attributes(request: pb.ClassifyRequest, r: pb.ClassifyResponse) -> dict:
    return {"catcascade.request_id": r.request_id, "catcascade.escalated": r.escalated,
            "catcascade.escalation_reason": pb.EscalationReason.Name(r.escalation_reason),
            "catcascade.cached": r.cached, "catcascade.priority": pb.Priority.Name(request.priority),
            "catcascade.mode": pb.EscalationMode.Name(request.escalation),
            "catcascade.version.bundle": r.versions.bundle, "catcascade.version.cnn": r.versions.cnn,
            "catcascade.version.vlm": r.versions.vlm}
