"""Fakes of what the cascade pipeline calls (the CNN batcher, the VLM verifier), for unit tests
of the pipeline and the server. Integration tests use the real ONNX Runtime and vLLM instead."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from catcascade.cnn_stage.preprocessing import PreprocessConfig
from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.config import BlendConfig, EscalationConfig
from catcascade.ensemble.escalation_policy import EscalationPolicy
from catcascade.serving.batcher import BatchResult
from catcascade.ensemble.config import CandidateSetConfig, CascadeConfig
from catcascade.ensemble.escalation_policy import EscalationMode
from catcascade.serving.cascade_engine import ANONYMOUS, ClassifyRequest
from catcascade.serving.config import LimitsConfig, MemoryConfig, VlmEndpointConfig
from catcascade.serving.pipeline import CascadePipeline
from catcascade.serving.traffic.priorities import Priority
from catcascade.vlm_stage.rationale import Rationale
from catcascade.vlm_stage.scoring import CandidateScores

LABELS = ["Abyssinian", "Bengal", "Birman", "Bombay", "Persian", "Siamese"]
LOGITS = np.array([0.2, 3.0, -1.0, 2.2, 1.4, 0.0], dtype=np.float32)
"""CNN order Bengal, Bombay, Persian, Abyssinian, Siamese, Birman; unsure at temperature 2.
float32, as ONNX Runtime returns them."""


class FakeBatcher:
    """Answers every image with fixed logits and fixed timings, like DynamicBatcher.submit."""

    decodes_images = False

    def __init__(self, logits: np.ndarray = LOGITS, queue_ms: float = 1.5, compute_ms: float = 2.5,
                 batch_size: int = 3, error: Exception | None = None):
        self.logits, self.queue_ms, self.compute_ms, self.batch_size = logits, queue_ms, compute_ms, batch_size
        self.error = error
        self.inputs: list[np.ndarray] = []
        self.submitted: list[tuple[int, float | None]] = []
        """(priority, deadline) of each image, in order."""

    async def submit(self, x: np.ndarray, priority: int = 0, deadline: float | None = None) -> BatchResult:
        self.inputs.append(x)
        self.submitted.append((priority, deadline))
        if self.error is not None:
            raise self.error
        return BatchResult(self.logits.copy(), self.queue_ms, self.compute_ms, self.batch_size)

    async def submit_encoded(self, data: bytes, priority: int = 0, deadline: float | None = None):
        raise NotImplementedError("FakeBatcher takes tensors, like DynamicBatcher")


@dataclass
class FakeVerifier:
    """A VLM that gives fixed scores to whatever candidates it is asked about (the first
    len(candidates) of ``probabilities``), or raises ``error``; with ``hold`` set, each call
    waits until ``release`` is set (or forever). ``explain`` answers likewise."""

    probabilities: tuple[float, ...] = (0.1, 0.2, 0.6, 0.04, 0.03, 0.02)
    none_probability: float = 0.1
    error: BaseException | None = None
    hold: bool = False
    explain_error: BaseException | None = None
    hold_explain: bool = False
    calls: list[tuple[tuple[int, int], tuple[str, ...]]] = field(default_factory=list)
    explained: list[tuple[str, int]] = field(default_factory=list)
    explained_images: list = field(default_factory=list)
    priorities: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    """The extra headers of each call (verify and explain), in order."""
    waiting: int = 0
    model_name: str = "fake"

    def __post_init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def verify(self, image, candidates, *, priority: int = 0, headers=None) -> CandidateScores:
        self.calls.append((image.size, tuple(candidates)))
        self.priorities.append(priority)
        self.headers.append(dict(headers or {}))
        self.waiting += 1
        self.entered.set()
        try:
            if self.hold:
                await self.release.wait()
        finally:
            self.waiting -= 1
        if self.error is not None:
            raise self.error
        n = len(candidates)
        return CandidateScores(tuple(candidates), self.probabilities[:n], self.none_probability, self.model_name,
                               "multiple_choice", latency_ms=1.0)

    async def explain(self, image, breed: str, max_tokens: int, *, priority: int = 0, headers=None) -> Rationale:
        self.explained.append((breed, max_tokens))
        self.headers.append(dict(headers or {}))
        self.explained_images.append(image)
        self.waiting += 1
        try:
            if self.hold_explain:
                await self.release.wait()
        finally:
            self.waiting -= 1
        if self.explain_error is not None:
            raise self.explain_error
        return Rationale(f"it looks like a {breed}", breed, 7, self.model_name, 1.0)

    async def warm_up(self, candidates) -> None:
        """Fails like ``verify`` would, without counting as a call."""
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        """Nothing to release."""


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


async def until(condition, what: str, timeout_s: float = 30.0) -> None:
    """Polls ``condition`` on the event loop (other tasks run in between) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


# Settings the pipeline tests name, and the config section each lives in (as section, field).
_SETTINGS = {"vlm_call_budget_s": ("vlm", "call_budget_s"), "vlm_image_side": ("vlm", "image_side"),
             "rationale_max_tokens": ("vlm", "rationale_max_tokens"), "candidates": ("cascade", "top_k"),
             "candidate_sets": ("cascade", "candidate_sets"), "trim_after_decode_ms": ("memory", "trim_after_decode_ms")}


def fake_pipeline(verifier=None, threshold: float = 0.6, temperature: float = 2.0, weight: float = 0.5, cnn=None,
                  breaker=None, metrics=None, preprocess: PreprocessConfig | None = None, tenant_budgets=None,
                  default_top_k: int = 3, decode_threads: int = 2, decode_nice: int = 0, tracing=None,
                  **settings) -> CascadePipeline:
    """The real CascadePipeline over the fake CNN and VLM: a top-1 policy at ``threshold`` and
    the log-linear blender at ``weight``; ``settings`` are fields of the ServeConfig's limits
    section or the names in _SETTINGS (no decode trim unless asked)."""
    sections: dict[str, dict] = {"limits": {}, "vlm": {}, "memory": {"trim_after_decode_ms": None}, "cascade": {}}
    for name, value in settings.items():
        section, field_name = _SETTINGS.get(name, ("limits", name))
        sections[section][field_name] = value
    sets = sections["cascade"].get("candidate_sets")
    if isinstance(sets, CandidateSetConfig):
        sections["cascade"]["candidate_sets"] = sets.model_dump()
    return CascadePipeline(
        labels=LABELS, preprocess_config=preprocess or PreprocessConfig(image_size=32), cnn=cnn or FakeBatcher(),
        policy=EscalationPolicy(EscalationConfig(metric="top1", threshold=threshold)),
        blender=LogLinearBlender(BlendConfig(weight=weight)), verifier=verifier, temperature=temperature,
        limits=LimitsConfig(**sections["limits"]), vlm=VlmEndpointConfig(**sections["vlm"]),
        memory=MemoryConfig(**sections["memory"]), cascade=CascadeConfig(**sections["cascade"]),
        default_top_k=default_top_k, decode_threads=decode_threads, decode_nice=decode_nice, breaker=breaker,
        metrics=metrics, tenant_budgets=tenant_budgets, tracing=tracing)


def request_for(image: bytes, k: int | None = None, mode: EscalationMode = EscalationMode.AUTO,
                deadline: float | None = None, explain: bool = False, *, priority: int = Priority.INTERACTIVE,
                tenant: str | None = ANONYMOUS, on_cnn_done=None) -> ClassifyRequest:
    """A ClassifyRequest from the arguments the tests pass positionally."""
    return ClassifyRequest(image, k or 0, mode, deadline, Priority(priority), tenant, explain,
                           on_cnn_done=on_cnn_done)


def fake_front_door(engine, **stages):
    """The real front door over one engine (``stages``: FrontDoor's keyword arguments)."""
    from catcascade.serving.front_door.chain import FrontDoor
    from catcascade.serving.front_door.routing import SingleVersion
    from catcascade.serving.metrics import ServiceMetrics

    return FrontDoor(SingleVersion(engine), stages.pop("metrics", None) or ServiceMetrics(), **stages)
