"""Typed answers: small frozen dataclasses over the protobuf messages (``raw`` keeps the message)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from catcascade.serving.api import cascade_pb2 as pb


def _enum_from_proto(name: str, proto_enum, prefix: str) -> type[enum.IntEnum]:
    """An IntEnum with the proto enum's values, so it never falls behind the contract and
    compares equal to the raw protobuf numbers (``r.escalation_reason == pb.ESCALATION_REASON_SHED``)."""
    return enum.IntEnum(name, {k.removeprefix(prefix): v for k, v in proto_enum.items()}, module=__name__)


EscalationReason = _enum_from_proto("EscalationReason", pb.EscalationReason, "ESCALATION_REASON_")
EscalationMode = _enum_from_proto("EscalationMode", pb.EscalationMode, "ESCALATION_MODE_")
Priority = _enum_from_proto("Priority", pb.Priority, "PRIORITY_")
TrafficMode = _enum_from_proto("TrafficMode", pb.TrafficMode, "TRAFFIC_MODE_")


def parse_enum(kind: type[enum.IntEnum], value) -> enum.IntEnum:
    """``"auto"``, ``"AUTO"``, 0 or the member itself; a clear ValueError otherwise."""
    if isinstance(value, str):
        try:
            return kind[value.upper()]
        except KeyError:
            pass
    else:
        try:
            return kind(value)
        except ValueError:
            pass
    choices = ", ".join(m.name.lower() for m in kind)
    raise ValueError(f"unknown {kind.__name__} {value!r} (expected one of: {choices})")


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float


@dataclass(frozen=True)
class VlmVerdict:
    """The VLM's scores over the CNN's candidates (in the CNN's rank order)."""

    candidates: tuple[LabelScore, ...]
    none_probability: float
    model: str
    scoring_mode: str


@dataclass(frozen=True)
class Timings:
    """Server-measured milliseconds per stage (zero for stages that did not run)."""

    decode_ms: float
    cnn_queue_ms: float
    cnn_ms: float
    vlm_ms: float
    blend_ms: float
    total_ms: float
    cnn_batch_size: int
    rationale_ms: float = 0.0


@dataclass(frozen=True)
class Rationale:
    """The VLM's short explanation (asked for with ``explain=True``); ``error`` says why there is none."""

    text: str
    label: str
    tokens: int
    model: str
    error: str


@dataclass(frozen=True)
class ModelVersions:
    bundle: str
    cnn: str
    vlm: str
    model_version: str = ""
    """The repository version under ``serve --models``; empty with one bundle."""
    route: str = ""
    """How the request reached it: "live" or "canary" (empty with one bundle)."""


def _scores(items) -> tuple[LabelScore, ...]:
    return tuple(LabelScore(s.label, s.probability) for s in items)


def _versions(v: pb.ModelVersions) -> ModelVersions:
    return ModelVersions(v.bundle, v.cnn, v.vlm, v.model_version, v.route)


@dataclass(frozen=True)
class ClassifyResult:
    """One classified image. ``labels`` is the final ranking (blended when the VLM answered),
    ``cnn_top_k`` the calibrated CNN's own; ``vlm`` is None unless the VLM answered."""

    request_id: str
    labels: tuple[LabelScore, ...]
    cnn_top_k: tuple[LabelScore, ...]
    vlm: VlmVerdict | None
    escalated: bool
    escalation_reason: EscalationReason
    escalation_detail: str
    timings: Timings
    versions: ModelVersions
    cached: bool
    rationale: Rationale | None = None
    """Present when the request asked for an explanation."""
    attempts: int = 1
    """Calls the client made for this answer (1 + retries)."""
    raw: pb.ClassifyResponse = field(default=None, repr=False, compare=False)

    @property
    def top(self) -> LabelScore:
        return self.labels[0]

    @classmethod
    def from_proto(cls, r: pb.ClassifyResponse, attempts: int = 1) -> "ClassifyResult":
        vlm = None
        if r.HasField("vlm"):
            vlm = VlmVerdict(_scores(r.vlm.candidates), r.vlm.none_probability, r.vlm.model, r.vlm.scoring_mode)
        t = r.timings
        why = None
        if r.HasField("rationale"):
            w = r.rationale
            why = Rationale(w.text, w.label, w.tokens, w.model, w.error)
        return cls(request_id=r.request_id, labels=_scores(r.labels), cnn_top_k=_scores(r.cnn_top_k), vlm=vlm,
                   escalated=r.escalated, escalation_reason=EscalationReason(r.escalation_reason),
                   escalation_detail=r.escalation_detail,
                   timings=Timings(t.decode_ms, t.cnn_queue_ms, t.cnn_ms, t.vlm_ms, t.blend_ms, t.total_ms,
                                   t.cnn_batch_size, t.rationale_ms),
                   versions=_versions(r.versions), cached=r.cached, rationale=why, attempts=attempts, raw=r)


@dataclass(frozen=True)
class ModelInfo:
    labels: tuple[str, ...]
    versions: ModelVersions
    image_size: int
    escalation_threshold: float
    escalation_metric: str
    blend_weight: float
    vlm_enabled: bool
    candidate: ModelVersions | None = None
    """The candidate model version (serve --models), if any, with how it gets traffic."""
    candidate_mode: TrafficMode = TrafficMode.UNSPECIFIED
    candidate_share: float = 0.0
    vlm_candidate_rule: str = ""
    raw: pb.ModelInfo = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> "ModelInfo":
        candidate = _versions(m.candidate) if m.HasField("candidate") else None
        return cls(tuple(m.labels), _versions(m.versions), m.image_size, m.escalation_threshold,
                   m.escalation_metric, m.blend_weight, m.vlm_enabled, candidate, TrafficMode(m.candidate_mode),
                   m.candidate_share, m.vlm_candidate_rule, raw=m)
