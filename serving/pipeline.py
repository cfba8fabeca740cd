"""The cascade for one request: decode -> batched CNN -> calibrate -> candidates -> policy ->
VLM -> blend (-> rationale, on request).

Stages are injected (a CNN batcher, a verifier, a policy, a blender), so tests and other
deployments can rewire them; the pipeline itself holds no model code. The VLM is asked about the
CNN's top ``candidates``, or, with conformal candidate sets in the cascade settings, about the
image's own set (ensemble/candidate_sets.py); a set of one breed needs no VLM in AUTO mode.
A rationale is a separate VLM call after the answer is final, so it cannot change it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from cnn_stage.native_memory import release_free_memory
from cnn_stage.preprocessing import PreprocessConfig, decode_image, preprocess
from cnn_stage.topk import TopK, softmax, top_k
from ensemble.blending import Blender
from ensemble.candidate_sets import set_size
from ensemble.config import CandidateSetConfig
from ensemble.escalation_policy import EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason
from serving.batcher import QueueFullError
from serving.circuit_breaker import BreakerState, CircuitBreaker
from serving.engines.cnn_engine import CnnEngine
from serving.metrics import ServiceMetrics
from vlm_stage.rationale import Rationale
from vlm_stage.scoring import CandidateScores

log = logging.getLogger(__name__)


class Verifier(Protocol):
    async def verify(self, image: Image.Image, candidates: tuple[str, ...]) -> CandidateScores: ...

    async def explain(self, image: Image.Image, breed: str, max_tokens: int) -> Rationale: ...


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


@dataclass(frozen=True)
class PipelineConfig:
    default_top_k: int = 3
    candidates: int = 3
    """How many CNN candidates the VLM is asked about (without candidate sets)."""
    candidate_sets: CandidateSetConfig | None = None
    """Conformal candidate sets: the VLM is asked about the image's own set instead."""
    rationale_max_tokens: int = 48
    """Token cap of a rationale (ClassifyRequest.explain)."""
    vlm_min_budget_ms: float = 50.0
    """Below this much remaining deadline, the VLM is skipped (reason DEADLINE)."""
    max_concurrent_escalations: int = 32
    """VLM calls in flight at once; beyond it escalations are shed (CNN-only, reason SHED)."""
    decode_threads: int = 2
    vlm_image_side: int = 448
    """Longest side of the copy kept for the VLM (bounds memory and image tokens)."""
    max_decode_queue: int = 64
    """Images waiting for a decode thread; beyond it, requests are refused (QueueFullError)."""
    trim_after_decode_ms: float | None = None
    """malloc_trim after a decode slower than this (a large image), so its memory goes back to the OS."""


class DeadlineExceededError(RuntimeError):
    """The request's deadline passed before its work started; nothing was done for it."""


class CascadePipeline:
    def __init__(self, labels: list[str], preprocess_config: PreprocessConfig, cnn: CnnEngine,
                 policy: EscalationPolicy, blender: Blender, verifier: Verifier | None = None,
                 temperature: float = 1.0, config: PipelineConfig = PipelineConfig(),
                 breaker: CircuitBreaker | None = None, metrics: ServiceMetrics | None = None):
        self.labels = labels
        self.preprocess_config = preprocess_config
        self.cnn = cnn
        self.policy = policy
        self.blender = blender
        self.verifier = verifier
        self.temperature = temperature
        self.config = config
        self.breaker = breaker
        self.metrics = metrics
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.decode_waiting = 0
        self.decodes_started = 0
        self._decode_lock = threading.Lock()
        self.vlm_calls = 0
        self.inflight_escalations = 0

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False)

    async def _decode_in_pool(self, data: bytes, keep_for_vlm: bool,
                              deadline: float | None) -> tuple[Image.Image | None, np.ndarray]:
        """Runs ``_decode`` on the decode pool. The pool's queue is bounded; a job whose
        request is cancelled (client gone, deadline passed in gRPC) before a thread picks it
        up is dropped, and a job that starts after its deadline returns at once, so the
        decode threads only ever work for requests someone still waits on."""
        with self._decode_lock:
            if self.decode_waiting >= self.config.max_decode_queue:
                raise QueueFullError(f"decode queue is full ({self.decode_waiting} images waiting)")
            self.decode_waiting += 1

        def job():
            late = deadline is not None and time.monotonic() >= deadline
            with self._decode_lock:
                self.decode_waiting -= 1
                self.decodes_started += not late
            if not late and self.metrics is not None:
                self.metrics.decodes_started.inc()
            if late:
                self._count_skipped_decode("deadline")
                raise DeadlineExceededError("the deadline passed while the image waited to be decoded")
            return self._decode(data, keep_for_vlm)

        future = self._decode_pool.submit(job)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.cancel():  # never ran, never will: give its queue slot back
                with self._decode_lock:
                    self.decode_waiting -= 1
                self._count_skipped_decode("cancelled")
            raise

    def _count_skipped_decode(self, why: str) -> None:
        if self.metrics is not None:
            self.metrics.decodes_skipped.labels(why).inc()

    @property
    def max_candidates(self) -> int:
        sets = self.config.candidate_sets
        return sets.max_size if sets is not None else self.config.candidates

    def candidate_count(self, size: int | None) -> int:
        """How many of the CNN's top breeds the VLM is asked about: the image's conformal set
        (at least 2: one option tells the VLM nothing), or the fixed number without sets."""
        return self.config.candidates if size is None else max(2, size)

    def _decode(self, data: bytes, keep_for_vlm: bool) -> tuple[Image.Image | None, np.ndarray]:
        """Decode + preprocess; keeps at most a ``vlm_image_side`` copy for the VLM, so the
        memory a request holds while it waits on the VLM is bounded whatever was uploaded."""
        cfg = self.preprocess_config
        t0 = time.perf_counter()
        img = decode_image(data, cfg.limits, draft_size=cfg.scale_size)
        x = preprocess(img, cfg)
        if keep_for_vlm:
            side = self.config.vlm_image_side
            if max(img.size) > side:
                img.thumbnail((side, side), Image.Resampling.BICUBIC)
        else:
            img = None  # the decoded image is freed before the trim below
        trim_ms = self.config.trim_after_decode_ms
        if trim_ms is not None and (time.perf_counter() - t0) * 1000.0 > trim_ms:
            release_free_memory()
        return img, x

    async def classify(self, data: bytes, k: int | None = None, mode: EscalationMode = EscalationMode.AUTO,
                       deadline: float | None = None, explain: bool = False) -> CascadeResult:
        """Classifies encoded image bytes. ``deadline`` is a time.monotonic() instant or None;
        ``explain`` asks the VLM for a short rationale after the answer is final.

        Raises InvalidImageError for bad bytes, QueueFullError when the decode or CNN queue is
        full, DeadlineExceededError when the deadline passed before decoding started.
        """
        t0 = time.perf_counter()
        k = k or self.config.default_top_k
        keep = mode != EscalationMode.NEVER and self.verifier is not None
        if getattr(self.cnn, "decodes_images", False):  # the engine decodes where the model runs (Ray replicas)
            img, res = None, await self.cnn.submit_encoded(data)
            t_decode = t0 + res.decode_ms / 1000.0
        else:
            img, x = await self._decode_in_pool(data, keep, deadline)
            t_decode = time.perf_counter()
            res = await self.cnn.submit(x)
        probs = softmax(res.output, self.temperature)
        cnn_top = top_k(probs, self.labels, max(k, self.max_candidates, 2))
        sets = self.config.candidate_sets
        size = set_size(sets, probs) if sets is not None else None
        decision = self.policy.decide(probs, mode, size, sets.skip_singletons if sets is not None else True)
        final, vlm_scores, vlm_ms, blend_ms = probs, None, 0.0, 0.0
        if img is None and keep and (decision.escalate or explain):  # decoded remotely: the VLM's copy, if needed
            img, _ = await self._decode_in_pool(data, True, deadline)
        if decision.escalate:
            decision, vlm_scores, vlm_ms = await self._ask_vlm(img, cnn_top, decision, deadline,
                                                               self.candidate_count(size))
            if vlm_scores is not None:
                tb = time.perf_counter()
                cand = cnn_top.indices[: len(vlm_scores.probabilities)]
                final = self.blender.blend(probs, cand, np.asarray(vlm_scores.probabilities))
                blend_ms = (time.perf_counter() - tb) * 1000.0
        answer = top_k(final, self.labels, k)
        rationale, why_not, rationale_ms = None, "", 0.0
        if explain:
            rationale, why_not, rationale_ms = await self._explain(img, mode, answer, vlm_scores, deadline)
        timings = StageTimings(
            decode_ms=(t_decode - t0) * 1000.0, cnn_queue_ms=res.queue_ms, cnn_ms=res.compute_ms, vlm_ms=vlm_ms,
            blend_ms=blend_ms, total_ms=(time.perf_counter() - t0) * 1000.0, cnn_batch_size=res.batch_size,
            rationale_ms=rationale_ms)
        cnn_k = TopK(cnn_top.indices[:k], cnn_top.labels[:k], cnn_top.probabilities[:k])
        return CascadeResult(answer, cnn_k, vlm_scores, vlm_scores is not None,
                             decision.reason, decision.detail, timings, rationale, why_not)

    async def _explain(self, img: Image.Image | None, mode: EscalationMode, answer: TopK,
                       vlm_scores: CandidateScores | None, deadline: float | None
                       ) -> tuple[Rationale | None, str, float]:
        """The VLM's rationale for the breed it favours (its best candidate when it scored the
        image, else the answer's top-1); every reason for not giving one is said."""
        if mode == EscalationMode.NEVER:
            return None, "not generated: the client asked for CNN only (escalation NEVER)", 0.0
        if self.verifier is None or img is None:
            return None, "not generated: no VLM stage is configured on this server", 0.0
        if not hasattr(self.verifier, "explain"):
            return None, "not generated: this VLM backend cannot explain", 0.0
        if self.breaker is not None and self.breaker.state == BreakerState.OPEN:
            return None, "not generated: the VLM circuit breaker is open", 0.0
        if self.inflight_escalations >= self.config.max_concurrent_escalations:
            return None, "not generated: the VLM is saturated", 0.0
        timeout = None
        if deadline is not None:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            if remaining_ms < self.config.vlm_min_budget_ms:
                return None, f"not generated: {remaining_ms:.0f} ms left of the deadline", 0.0
            timeout = (remaining_ms - self.config.vlm_min_budget_ms / 2) / 1000.0
        if vlm_scores is not None:
            breed = vlm_scores.candidates[int(np.argmax(vlm_scores.probabilities))]
        else:
            breed = answer.labels[0]
        t = time.perf_counter()
        self.inflight_escalations += 1
        try:
            rationale = await asyncio.wait_for(self.verifier.explain(img, breed, self.config.rationale_max_tokens),
                                               timeout)
        except asyncio.TimeoutError:
            return None, "not generated: the VLM did not answer within the deadline", (time.perf_counter() - t) * 1000.0
        except (RuntimeError, OSError, ValueError) as e:  # VlmUnavailableError, RationaleError, transport errors
            if self.metrics is not None:
                self.metrics.vlm_errors.labels("rationale").inc()
            log.warning("no rationale: %s", e)
            return None, f"not generated: {e}"[:300], (time.perf_counter() - t) * 1000.0
        finally:
            self.inflight_escalations -= 1
        return rationale, "", (time.perf_counter() - t) * 1000.0

    def _skip(self, reason: EscalationReason, decision: EscalationDecision, detail: str, vlm_ms: float = 0.0):
        return EscalationDecision(False, reason, decision.confidence, detail), None, vlm_ms

    async def _ask_vlm(self, img: Image.Image, cnn_top: TopK, decision: EscalationDecision,
                       deadline: float | None, n_candidates: int | None = None
                       ) -> tuple[EscalationDecision, CandidateScores | None, float]:
        """Asks the VLM unless something says not to; every skip comes with its reason."""
        if self.verifier is None:
            return self._skip(EscalationReason.VLM_DISABLED, decision, "no VLM stage is configured on this server")
        timeout = None
        if deadline is not None:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            if remaining_ms < self.config.vlm_min_budget_ms:
                return self._skip(EscalationReason.DEADLINE, decision, f"{remaining_ms:.0f} ms left of the deadline; "
                                  f"the VLM needs {self.config.vlm_min_budget_ms:.0f} ms")
            timeout = (remaining_ms - self.config.vlm_min_budget_ms / 2) / 1000.0
        if self.inflight_escalations >= self.config.max_concurrent_escalations:
            return self._skip(EscalationReason.SHED, decision, f"VLM saturated ({self.inflight_escalations} calls "
                              "in flight); escalation shed")
        if self.breaker is not None and not self.breaker.allow():
            return self._skip(EscalationReason.VLM_UNAVAILABLE, decision,
                              "VLM circuit breaker is open after repeated failures")
        candidates = cnn_top.labels[: n_candidates or self.config.candidates]
        t = time.perf_counter()
        self.vlm_calls += 1
        self.inflight_escalations += 1
        try:
            scores = await asyncio.wait_for(self.verifier.verify(img, candidates), timeout)
        except asyncio.TimeoutError:
            self._vlm_failed("deadline", count_for_breaker=False)
            return self._skip(EscalationReason.DEADLINE, decision, "the VLM did not answer within the client's deadline",
                              (time.perf_counter() - t) * 1000.0)
        except (RuntimeError, OSError, ValueError) as e:  # VlmUnavailableError, ScoringError, transport errors
            self._vlm_failed(type(e).__name__)
            log.warning("VLM unavailable, answering CNN-only: %s", e)
            return self._skip(EscalationReason.VLM_UNAVAILABLE, decision, f"VLM unavailable: {e}"[:300],
                              (time.perf_counter() - t) * 1000.0)
        finally:
            self.inflight_escalations -= 1
        if self.breaker is not None:
            self.breaker.record_success()
        return decision, scores, (time.perf_counter() - t) * 1000.0

    def _vlm_failed(self, kind: str, count_for_breaker: bool = True) -> None:
        if self.metrics is not None:
            self.metrics.vlm_errors.labels(kind).inc()
        if self.breaker is not None:
            if count_for_breaker:
                self.breaker.record_failure()
            else:  # a client's deadline says nothing about the VLM's health
                self.breaker.record_no_verdict()
