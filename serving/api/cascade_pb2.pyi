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

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "top_k", "escalation", "request_id", "priority")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    escalation: EscalationMode
    request_id: str
    priority: Priority
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., escalation: _Optional[_Union[EscalationMode, str]] = ..., request_id: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

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
    __slots__ = ("decode_ms", "cnn_queue_ms", "cnn_ms", "vlm_ms", "blend_ms", "total_ms", "cnn_batch_size")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    CNN_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    CNN_MS_FIELD_NUMBER: _ClassVar[int]
    VLM_MS_FIELD_NUMBER: _ClassVar[int]
    BLEND_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    CNN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    cnn_queue_ms: float
    cnn_ms: float
    vlm_ms: float
    blend_ms: float
    total_ms: float
    cnn_batch_size: int
    def __init__(self, decode_ms: _Optional[float] = ..., cnn_queue_ms: _Optional[float] = ..., cnn_ms: _Optional[float] = ..., vlm_ms: _Optional[float] = ..., blend_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., cnn_batch_size: _Optional[int] = ...) -> None: ...

class ModelVersions(_message.Message):
    __slots__ = ("bundle", "cnn", "vlm")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    CNN_FIELD_NUMBER: _ClassVar[int]
    VLM_FIELD_NUMBER: _ClassVar[int]
    bundle: str
    cnn: str
    vlm: str
    def __init__(self, bundle: _Optional[str] = ..., cnn: _Optional[str] = ..., vlm: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "labels", "cnn_top_k", "vlm", "escalated", "escalation_reason", "escalation_detail", "timings", "versions", "error", "cached")
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
    cached: bool
    def __init__(self, request_id: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., cnn_top_k: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., vlm: _Optional[_Union[VlmScores, _Mapping]] = ..., escalated: _Optional[bool] = ..., escalation_reason: _Optional[_Union[EscalationReason, str]] = ..., escalation_detail: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., versions: _Optional[_Union[ModelVersions, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("labels", "versions", "image_size", "escalation_threshold", "escalation_metric", "blend_weight", "vlm_enabled")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_METRIC_FIELD_NUMBER: _ClassVar[int]
    BLEND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VLM_ENABLED_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    versions: ModelVersions
    image_size: int
    escalation_threshold: float
    escalation_metric: str
    blend_weight: float
    vlm_enabled: bool
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., versions: _Optional[_Union[ModelVersions, _Mapping]] = ..., image_size: _Optional[int] = ..., escalation_threshold: _Optional[float] = ..., escalation_metric: _Optional[str] = ..., blend_weight: _Optional[float] = ..., vlm_enabled: _Optional[bool] = ...) -> None: ...
