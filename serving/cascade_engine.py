"""One request type, one result type and the interfaces every engine declares.

A request crosses the server once, as a ``ClassifyRequest``: the front door builds it from the
protobuf, and every engine takes the same object (the local pipeline, a pipeline over Ray stages,
each model-repository version). What a stage must honour (priority, deadline, explain, trace
context, where the image is decoded) is part of the stage interfaces below, so an engine that
drops one of them is visible in its signature instead of hidden behind an attribute probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from PIL import Image

from catcascade.cnn_stage.topk import TopK
from catcascade.ensemble.escalation_policy import EscalationMode, EscalationReason
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.traffic.priorities import Priority
from catcascade.vlm_stage.rationale import Rationale
from catcascade.vlm_stage.scoring import CandidateScores

ANONYMOUS = "anonymous"
"""The tenant of requests without a known bearer token."""


@dataclass(frozen=True)
class ClassifyRequest:
    """One image to classify, with everything that decides how."""

    image: bytes
    top_k: int = 0
    """Labels to return; 0 = the engine's default."""
    mode: EscalationMode = EscalationMode.AUTO
    deadline: float | None = None
    """A time.monotonic() instant, or None."""
    priority: Priority = Priority.INTERACTIVE
    tenant: str | None = ANONYMOUS
    """Whose VLM budget an escalation spends; None: no tenant's (shadow copies)."""
    explain: bool = False
    trace_headers: Mapping[str, str] = field(default_factory=dict)
    """W3C trace context to pass on to the VLM."""
    request_id: str = ""
    model_version: str = ""
    """A served version this request must run on; empty: the router picks."""
    on_cnn_done: Callable[[], None] | None = None
    """Called once the CNN has answered (admission control's completions)."""


@dataclass(frozen=True)
class StageTimings:
    decode_ms: float = 0.0
    cnn_queue_ms: float = 0.0
    cnn_ms: float = 0.0
    vlm_ms: float = 0.0
    blend_ms: float = 0.0
    total_ms: float = 0.0
    cnn_batch_size: int = 0
    rationale_ms: float = 0.0


@dataclass(frozen=True)
class CascadeResult:
    labels: TopK
    cnn: TopK
    vlm: CandidateScores | None
    escalated: bool
    reason: EscalationReason
    detail: str
    timings: StageTimings
    rationale: Rationale | None = None
    rationale_error: str = ""
    """Why no rationale came back although one was asked for (empty otherwise)."""
    versions: pb.ModelVersions = field(default_factory=pb.ModelVersions)
    """The versions that answered (a repository version adds its name and route)."""


@dataclass(frozen=True)
class EngineIdentity:
    """What a version tells clients about itself, and what its answers depend on."""

    versions: pb.ModelVersions = field(default_factory=pb.ModelVersions)
    info: pb.ModelInfo = field(default_factory=pb.ModelInfo)
    content_key: str = ""
    """A digest of everything an answer depends on (CNN weights and precision, calibration,
    policy, candidates, blend, VLM model and adapter): the response cache's version key."""
    confidence_reference: object | None = None
    """The validation confidence histogram drift is measured against (None: none shipped)."""


class CascadeEngine(Protocol):
    """A model version that answers requests: ``CascadePipeline`` (local or Ray stages)."""

    labels: list[str]
    identity: EngineIdentity

    async def classify(self, request: ClassifyRequest) -> CascadeResult: ...

    def vlm_serving(self) -> bool:
        """Whether escalations can reach the VLM now (a VLM is configured and its breaker is closed)."""


class Verifier(Protocol):
    """The VLM stage, whatever runs it (vLLM over HTTP, in-process transformers, a Ray deployment).
    ``priority``: lower first; ``headers``: W3C trace context for this one call."""

    model_name: str

    async def verify(self, image: Image.Image, candidates: tuple[str, ...], *, priority: int = 0,
                     headers: Mapping[str, str] | None = None) -> CandidateScores: ...

    async def explain(self, image: Image.Image, breed: str, max_tokens: int, *, priority: int = 0,
                      headers: Mapping[str, str] | None = None) -> Rationale: ...

    async def warm_up(self, candidates: tuple[str, ...]) -> None: ...

    async def aclose(self) -> None: ...
