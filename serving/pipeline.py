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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from cnn_stage.preprocessing import PreprocessConfig, decode_image, preprocess
from cnn_stage.topk import TopK, softmax, top_k
from ensemble.blending import Blender
from ensemble.candidate_sets import set_size
from ensemble.config import CandidateSetConfig
from ensemble.escalation_policy import EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason
from serving.batcher import DynamicBatcher
from serving.circuit_breaker import BreakerState, CircuitBreaker
from serving.engines.thread_priority import lower_current_thread
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
    decode_nice: int = 0
    """Nice increment of the decode threads (serving/engines/thread_priority.py)."""
    vlm_image_side: int = 448
    """Longest side of the copy kept for the VLM (bounds memory and image tokens)."""
    vlm_call_budget_s: float = 5.0
    """The server's own bound on one escalation's VLM call (retries included): past it the call
    counts as a VLM failure for the breaker, whatever the client's deadline."""
    reply_margin_ms: float = 100.0
    """Kept back from the client's deadline after the VLM to blend and send the answer (an
    event loop busy with a burst can take tens of milliseconds to send it)."""


class CascadePipeline:
    def __init__(self, labels: list[str], preprocess_config: PreprocessConfig, cnn: DynamicBatcher,
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
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode",
                                               initializer=lower_current_thread, initargs=(config.decode_nice,))
        self.vlm_calls = 0
        self.inflight_escalations = 0

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False)

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
        img = decode_image(data, cfg.limits, draft_size=cfg.scale_size)
        x = preprocess(img, cfg)
        if not keep_for_vlm:
            return None, x
        side = self.config.vlm_image_side
        if max(img.size) > side:
            img.thumbnail((side, side), Image.Resampling.BICUBIC)
        return img, x

    async def classify(self, data: bytes, k: int | None = None, mode: EscalationMode = EscalationMode.AUTO,
                       deadline: float | None = None, explain: bool = False,
                       on_cnn_done: Callable[[], None] | None = None) -> CascadeResult:
        """Classifies encoded image bytes. ``deadline`` is a time.monotonic() instant or None;
        ``explain`` asks the VLM for a short rationale after the answer is final;
        ``on_cnn_done`` is called once the CNN has answered (admission control's completions).

        Raises InvalidImageError for bad bytes and QueueFullError when the CNN queue is full
        (DeadlineUnmeetableError, a QueueFullError, when the deadline is too close to run it).
        """
        t0 = time.perf_counter()
        k = k or self.config.default_top_k
        loop = asyncio.get_running_loop()
        keep = mode != EscalationMode.NEVER and self.verifier is not None
        img, x = await loop.run_in_executor(self._decode_pool, self._decode, data, keep)
        t_decode = time.perf_counter()
        res = await self.cnn.submit(x, deadline)
        if on_cnn_done is not None:
            on_cnn_done()
        probs = softmax(res.output, self.temperature)
        cnn_top = top_k(probs, self.labels, max(k, self.max_candidates, 2))
        sets = self.config.candidate_sets
        size = set_size(sets, probs) if sets is not None else None
        decision = self.policy.decide(probs, mode, size, sets.skip_singletons if sets is not None else True)
        final, vlm_scores, vlm_ms, blend_ms = probs, None, 0.0, 0.0
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
        if self.breaker is not None and self.breaker.state != BreakerState.CLOSED:
            return None, "not generated: the VLM circuit breaker is not closed", 0.0
        if self.inflight_escalations >= self.config.max_concurrent_escalations:
            return None, "not generated: the VLM is saturated", 0.0
        timeout = self.config.vlm_call_budget_s
        if deadline is not None:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            usable_ms = remaining_ms - self.config.reply_margin_ms
            if usable_ms < self.config.vlm_min_budget_ms:
                return None, f"not generated: {remaining_ms:.0f} ms left of the deadline", 0.0
            timeout = min(timeout, usable_ms / 1000.0)
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
        """Asks the VLM unless something says not to; every skip comes with its reason.

        The call is bounded by the client's deadline and by the server's own VLM budget
        (``vlm_call_budget_s``). Only the budget running out counts against the VLM in the
        breaker: the client's deadline says nothing about the VLM's health, but a VLM that
        cannot answer within the server's budget is failing whatever the clients ask for.
        """
        if self.verifier is None:
            return self._skip(EscalationReason.VLM_DISABLED, decision, "no VLM stage is configured on this server")
        client_timeout = None
        if deadline is not None:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            usable_ms = remaining_ms - self.config.reply_margin_ms
            if usable_ms < self.config.vlm_min_budget_ms:
                return self._skip(EscalationReason.DEADLINE, decision, f"{remaining_ms:.0f} ms left of the deadline; "
                                  f"the VLM needs {self.config.vlm_min_budget_ms:.0f} ms, and "
                                  f"{self.config.reply_margin_ms:.0f} ms are kept to answer")
            client_timeout = usable_ms / 1000.0
        if self.inflight_escalations >= self.config.max_concurrent_escalations:
            return self._skip(EscalationReason.SHED, decision, f"VLM saturated ({self.inflight_escalations} calls "
                              "in flight); escalation shed")
        lease = None
        if self.breaker is not None:
            lease = self.breaker.acquire()
            if lease is None:
                state = "half-open (a probe is checking the VLM)" if self.breaker.state == BreakerState.HALF_OPEN \
                    else "open after repeated failures"
                return self._skip(EscalationReason.VLM_UNAVAILABLE, decision, f"VLM circuit breaker is {state}")
        budget = self.config.vlm_call_budget_s
        client_bound = client_timeout is not None and client_timeout < budget
        timeout = client_timeout if client_bound else budget
        candidates = cnn_top.labels[: n_candidates or self.config.candidates]
        t = time.perf_counter()
        self.vlm_calls += 1
        self.inflight_escalations += 1
        try:
            scores = await asyncio.wait_for(self.verifier.verify(img, candidates), timeout)
        except asyncio.TimeoutError:
            elapsed = (time.perf_counter() - t) * 1000.0
            if client_bound:  # no verdict on the VLM: the lease is released below
                self._count_error("deadline")
                return self._skip(EscalationReason.DEADLINE, decision,
                                  "the VLM did not answer within the client's deadline", elapsed)
            self._vlm_failed(lease, "budget")
            log.warning("VLM did not answer within its %.1f s budget, answering CNN-only", budget)
            return self._skip(EscalationReason.VLM_UNAVAILABLE, decision,
                              f"VLM did not answer within the server's {budget:g} s budget", elapsed)
        except Exception as e:  # VlmUnavailableError, ScoringError, transport errors, and whatever else
            self._vlm_failed(lease, type(e).__name__)
            why = str(e) or type(e).__name__
            log.warning("VLM unavailable, answering CNN-only: %s", why)
            return self._skip(EscalationReason.VLM_UNAVAILABLE, decision, f"VLM unavailable: {why}"[:300],
                              (time.perf_counter() - t) * 1000.0)
        else:
            if lease is not None:
                lease.success()
        finally:  # also on cancellation (the client went away): the probe slot is given back
            self.inflight_escalations -= 1
            if lease is not None:
                lease.release()
        return decision, scores, (time.perf_counter() - t) * 1000.0

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.vlm_errors.labels(kind).inc()

    def _vlm_failed(self, lease, kind: str) -> None:
        self._count_error(kind)
        if lease is not None:
            lease.failure()
