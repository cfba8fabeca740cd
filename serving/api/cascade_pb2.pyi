from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EscalationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESCALATION_MODE_AUTO: _ClassVar[EscalationMode]
    ESCALATION_MODE_NEVER: _ClassVar[EscalationMode]
    ESCALATION_MODE_ALWAYS: _ClassVar[EscalationMode]

class EscalationReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESCALATION_REASON_UNSPECIFIED: _ClassVar[EscalationReason]
    ESCALATION_REASON_CONFIDENT: _ClassVar[EscalationReason]
    ESCALATION_REASON_LOW_CONFIDENCE: _ClassVar[EscalationReason]
    ESCALATION_REASON_REQUESTED_ALWAYS: _ClassVar[EscalationReason]
    ESCALATION_REASON_REQUESTED_NEVER: _ClassVar[EscalationReason]
    ESCALATION_REASON_VLM_UNAVAILABLE: _ClassVar[EscalationReason]
    ESCALATION_REASON_DEADLINE: _ClassVar[EscalationReason]
    ESCALATION_REASON_SHED: _ClassVar[EscalationReason]
    ESCALATION_REASON_VLM_DISABLED: _ClassVar[EscalationReason]
    ESCALATION_REASON_TENANT_BUDGET: _ClassVar[EscalationReason]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]

class TrafficMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAFFIC_MODE_UNSPECIFIED: _ClassVar[TrafficMode]
    TRAFFIC_MODE_CANARY: _ClassVar[TrafficMode]
    TRAFFIC_MODE_SHADOW: _ClassVar[TrafficMode]
ESCALATION_MODE_AUTO: EscalationMode
ESCALATION_MODE_NEVER: EscalationMode
ESCALATION_MODE_ALWAYS: EscalationMode
ESCALATION_REASON_UNSPECIFIED: EscalationReason
ESCALATION_REASON_CONFIDENT: EscalationReason
ESCALATION_REASON_LOW_CONFIDENCE: EscalationReason
ESCALATION_REASON_REQUESTED_ALWAYS: EscalationReason
ESCALATION_REASON_REQUESTED_NEVER: EscalationReason
ESCALATION_REASON_VLM_UNAVAILABLE: EscalationReason
ESCALATION_REASON_DEADLINE: EscalationReason
ESCALATION_REASON_SHED: EscalationReason
ESCALATION_REASON_VLM_DISABLED: EscalationReason
ESCALATION_REASON_TENANT_BUDGET: EscalationReason
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority
TRAFFIC_MODE_UNSPECIFIED: TrafficMode
TRAFFIC_MODE_CANARY: TrafficMode
TRAFFIC_MODE_SHADOW: TrafficMode

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "top_k", "escalation", "request_id", "explain", "priority", "model_version")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    escalation: EscalationMode
    request_id: str
    explain: bool
    priority: Priority
    model_version: str
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., escalation: _Optional[_Union[EscalationMode, str]] = ..., request_id: _Optional[str] = ..., explain: _Optional[bool] = ..., priority: _Optional[_Union[Priority, str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class VlmScores(_message.Message):
    __slots__ = ("candidates", "none_probability", "model", "scoring_mode")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    NONE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORING_MODE_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[LabelScore]
    none_probability: float
    model: str
    scoring_mode: str
    def __init__(self, candidates: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., none_probability: _Optional[float] = ..., model: _Optional[str] = ..., scoring_mode: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_ms", "cnn_queue_ms", "cnn_ms", "vlm_ms", "blend_ms", "total_ms", "cnn_batch_size", "rationale_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    CNN_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    CNN_MS_FIELD_NUMBER: _ClassVar[int]
    VLM_MS_FIELD_NUMBER: _ClassVar[int]
    BLEND_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    CNN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    cnn_queue_ms: float
    cnn_ms: float
    vlm_ms: float
    blend_ms: float
    total_ms: float
    cnn_batch_size: int
    rationale_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., cnn_queue_ms: _Optional[float] = ..., cnn_ms: _Optional[float] = ..., vlm_ms: _Optional[float] = ..., blend_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., cnn_batch_size: _Optional[int] = ..., rationale_ms: _Optional[float] = ...) -> None: ...

class Rationale(_message.Message):
    __slots__ = ("text", "label", "tokens", "model", "error")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    text: str
    label: str
    tokens: int
    model: str
    error: str
    def __init__(self, text: _Optional[str] = ..., label: _Optional[str] = ..., tokens: _Optional[int] = ..., model: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ModelVersions(_message.Message):
    __slots__ = ("bundle", "cnn", "vlm", "model_version", "route")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    CNN_FIELD_NUMBER: _ClassVar[int]
    VLM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    bundle: str
    cnn: str
    vlm: str
    model_version: str
    route: str
    def __init__(self, bundle: _Optional[str] = ..., cnn: _Optional[str] = ..., vlm: _Optional[str] = ..., model_version: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "labels", "cnn_top_k", "vlm", "escalated", "escalation_reason", "escalation_detail", "timings", "versions", "error", "rationale", "cached")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CNN_TOP_K_FIELD_NUMBER: _ClassVar[int]
    VLM_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_REASON_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_DETAIL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    cnn_top_k: _containers.RepeatedCompositeFieldContainer[LabelScore]
    vlm: VlmScores
    escalated: bool
    escalation_reason: EscalationReason
    escalation_detail: str
    timings: StageTimings
    versions: ModelVersions
    error: RequestError
    rationale: Rationale
    cached: bool
    def __init__(self, request_id: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., cnn_top_k: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., vlm: _Optional[_Union[VlmScores, _Mapping]] = ..., escalated: _Optional[bool] = ..., escalation_reason: _Optional[_Union[EscalationReason, str]] = ..., escalation_detail: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., versions: _Optional[_Union[ModelVersions, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ..., rationale: _Optional[_Union[Rationale, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("labels", "versions", "image_size", "escalation_threshold", "escalation_metric", "blend_weight", "vlm_enabled", "candidate", "candidate_mode", "candidate_share", "vlm_candidate_rule")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_METRIC_FIELD_NUMBER: _ClassVar[int]
    BLEND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VLM_ENABLED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_MODE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SHARE_FIELD_NUMBER: _ClassVar[int]
    VLM_CANDIDATE_RULE_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    versions: ModelVersions
    image_size: int
    escalation_threshold: float
    escalation_metric: str
    blend_weight: float
    vlm_enabled: bool
    candidate: ModelVersions
    candidate_mode: TrafficMode
    candidate_share: float
    vlm_candidate_rule: str
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., versions: _Optional[_Union[ModelVersions, _Mapping]] = ..., image_size: _Optional[int] = ..., escalation_threshold: _Optional[float] = ..., escalation_metric: _Optional[str] = ..., blend_weight: _Optional[float] = ..., vlm_enabled: _Optional[bool] = ..., candidate: _Optional[_Union[ModelVersions, _Mapping]] = ..., candidate_mode: _Optional[_Union[TrafficMode, str]] = ..., candidate_share: _Optional[float] = ..., vlm_candidate_rule: _Optional[str] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("live", "candidate", "mode", "share", "previous", "seed")
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    live: str
    candidate: str
    mode: TrafficMode
    share: float
    previous: str
    seed: int
    def __init__(self, live: _Optional[str] = ..., candidate: _Optional[str] = ..., mode: _Optional[_Union[TrafficMode, str]] = ..., share: _Optional[float] = ..., previous: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class ModelVersionState(_message.Message):
    __slots__ = ("version", "state", "versions", "error", "inflight", "adapter")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: str
    versions: ModelVersions
    error: str
    inflight: int
    adapter: str
    def __init__(self, version: _Optional[str] = ..., state: _Optional[str] = ..., versions: _Optional[_Union[ModelVersions, _Mapping]] = ..., error: _Optional[str] = ..., inflight: _Optional[int] = ..., adapter: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("routing", "versions")
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    routing: Routing
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionState]
    def __init__(self, routing: _Optional[_Union[Routing, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[ModelVersionState, _Mapping]]] = ...) -> None: ...

class ReloadModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RejectedVersion(_message.Message):
    __slots__ = ("version", "reason", "message")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    version: str
    reason: str
    message: str
    def __init__(self, version: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReloadReport(_message.Message):
    __slots__ = ("models", "loaded", "rejected", "changed")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    models: ModelList
    loaded: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedVersion]
    changed: bool
    def __init__(self, models: _Optional[_Union[ModelList, _Mapping]] = ..., loaded: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[_Union[RejectedVersion, _Mapping]]] = ..., changed: _Optional[bool] = ...) -> None: ...

class SetCandidateRequest(_message.Message):
    __slots__ = ("version", "mode", "share")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    version: str
    mode: TrafficMode
    share: float
    def __init__(self, version: _Optional[str] = ..., mode: _Optional[_Union[TrafficMode, str]] = ..., share: _Optional[float] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgreementReportRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionTraffic(_message.Message):
    __slots__ = ("version", "requests", "errors", "escalation_rate", "latency_p50_ms", "latency_p95_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    version: str
    requests: int
    errors: int
    escalation_rate: float
    latency_p50_ms: float
    latency_p95_ms: float
    def __init__(self, version: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., escalation_rate: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ...) -> None: ...

class AgreementReport(_message.Message):
    __slots__ = ("routing", "live", "candidate", "compared", "top1_agreement", "shadow_dropped", "window_s")
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DROPPED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    routing: Routing
    live: VersionTraffic
    candidate: VersionTraffic
    compared: int
    top1_agreement: float
    shadow_dropped: int
    window_s: float
    def __init__(self, routing: _Optional[_Union[Routing, _Mapping]] = ..., live: _Optional[_Union[VersionTraffic, _Mapping]] = ..., candidate: _Optional[_Union[VersionTraffic, _Mapping]] = ..., compared: _Optional[int] = ..., top1_agreement: _Optional[float] = ..., shadow_dropped: _Optional[int] = ..., window_s: _Optional[float] = ...) -> None: ...
