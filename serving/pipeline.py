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
import functools
import inspect
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from catcascade.cnn_stage.native_memory import release_free_memory
from catcascade.cnn_stage.preprocessing import PreprocessConfig, decode_image, preprocess
from catcascade.cnn_stage.topk import TopK, softmax, top_k
from catcascade.ensemble.blending import Blender
from catcascade.ensemble.candidate_sets import set_size
from catcascade.ensemble.config import CandidateSetConfig
from catcascade.ensemble.escalation_policy import EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason
from catcascade.errors import CatcascadeError
from catcascade.serving.batcher import QueueFullError
from catcascade.serving.circuit_breaker import BreakerState, CircuitBreaker
from catcascade.serving.engines.cnn_engine import CnnEngine
from catcascade.serving.engines.thread_priority import lower_current_thread
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.observability.tracing import NoTracing, now_ns
from catcascade.serving.traffic.priorities import Priority, PrioritySlots
from catcascade.serving.traffic.tenant_budgets import TenantBudgets
from catcascade.vlm_stage.rationale import Rationale
from catcascade.vlm_stage.scoring import CandidateScores

log = logging.getLogger(__name__)


class Verifier(Protocol):
    async def verify(self, image: Image.Image, candidates: tuple[str, ...], *, priority: int = 0) -> CandidateScores:
        """``priority`` (lower first) is optional: verifiers without it are called without it."""

    async def explain(self, image: Image.Image, breed: str, max_tokens: int) -> Rationale: ...


@functools.lru_cache(maxsize=None)
def _takes_priority(verifier_type: type) -> bool:
    """Whether a verifier's ``verify`` accepts ``priority`` (verifiers written before
    priorities existed do not, and keep working)."""
    params = inspect.signature(verifier_type.verify).parameters.values()
    return any(p.name == "priority" or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


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
    """VLM calls in flight at once; beyond it escalations wait (see below) or are shed (CNN-only, reason SHED)."""
    escalation_queue_size: int = 0
    """Escalations that may wait for a VLM slot, interactive ones first; 0 = shed at once."""
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
    max_decode_queue: int = 64
    """Images waiting for a decode thread; beyond it, requests are refused (QueueFullError)."""
    trim_after_decode_ms: float | None = None
    """malloc_trim after a decode slower than this (a large image), so its memory goes back to the OS."""


class DeadlineExceededError(CatcascadeError, RuntimeError):
    """The request's deadline passed before its work started; nothing was done for it."""


class CascadePipeline:
    def __init__(self, labels: list[str], preprocess_config: PreprocessConfig, cnn: CnnEngine,
                 policy: EscalationPolicy, blender: Blender, verifier: Verifier | None = None,
                 temperature: float = 1.0, config: PipelineConfig = PipelineConfig(),
                 breaker: CircuitBreaker | None = None, metrics: ServiceMetrics | None = None,
                 tracing: NoTracing | None = None, tenant_budgets: TenantBudgets | None = None):
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
        self.tracing = tracing or NoTracing()
        self.tenant_budgets = tenant_budgets
        self.decode_waiting = 0
        self.decodes_started = 0
        self._decode_lock = threading.Lock()
        self.vlm_calls = 0
        self._escalation_slots = PrioritySlots(config.max_concurrent_escalations, config.escalation_queue_size)

    @property
    def inflight_escalations(self) -> int:
        """VLM calls in flight now."""
        return self._escalation_slots.in_use

    @property
    def waiting_escalations(self) -> int:
        """Escalations queued for a VLM slot (``escalation_queue_size`` > 0)."""
        return self._escalation_slots.waiting

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
                       deadline: float | None = None, explain: bool = False, *,
                       priority: int = Priority.INTERACTIVE, tenant: str = "",
                       on_cnn_done: Callable[[], None] | None = None) -> CascadeResult:
        """Classifies encoded image bytes. ``deadline`` is a time.monotonic() instant or None;
        ``explain`` asks the VLM for a short rationale after the answer is final; ``priority``
        orders the CNN queue and the VLM's; ``tenant`` names whose escalation budget an
        escalation spends; ``on_cnn_done`` is called once the CNN has answered (admission
        control's completions).

        Raises InvalidImageError for bad bytes, QueueFullError when the decode or CNN queue is
        full (DeadlineUnmeetableError, a QueueFullError, when the deadline is too close for a
        CNN batch to run), DeadlineExceededError when the deadline passed before decoding started.
        """
        t0 = time.perf_counter()
        k = k or self.config.default_top_k
        keep = mode != EscalationMode.NEVER and self.verifier is not None
        tracing = self.tracing
        if getattr(self.cnn, "decodes_images", False):  # the engine decodes where the model runs (Ray replicas)
            img, res = None, await self.cnn.submit_encoded(data)
            t_decode = t0 + res.decode_ms / 1000.0
        else:
            with tracing.stage("decode"):
                img, x = await self._decode_in_pool(data, keep, deadline)
            t_decode = time.perf_counter()
            res = await self.cnn.submit(x, priority, deadline)
        if on_cnn_done is not None:
            on_cnn_done()
        if tracing.enabled:  # the batcher timed both; spans from its readings
            end = now_ns()
            cnn_start = end - int(res.compute_ms * 1e6)
            tracing.record_stage("cnn_queue", cnn_start - int(res.queue_ms * 1e6), cnn_start)
            tracing.record_stage("cnn", cnn_start, end, {"catcascade.cnn.batch_size": res.batch_size})
        probs = softmax(res.output, self.temperature)
        cnn_top = top_k(probs, self.labels, max(k, self.max_candidates, 2))
        sets = self.config.candidate_sets
        size = set_size(sets, probs) if sets is not None else None
        decision = self.policy.decide(probs, mode, size, sets.skip_singletons if sets is not None else True)
        final, vlm_scores, vlm_ms, blend_ms = probs, None, 0.0, 0.0
        if img is None and keep and (decision.escalate or explain):  # decoded remotely: the VLM's copy, if needed
            img, _ = await self._decode_in_pool(data, True, deadline)
        if decision.escalate:
            with tracing.stage("vlm"):
                decision, vlm_scores, vlm_ms = await self._ask_vlm(img, cnn_top, decision, deadline,
                                                                   self.candidate_count(size), priority, tenant)
            if vlm_scores is not None:
                with tracing.stage("blend"):
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
        timeout = self.config.vlm_call_budget_s
        if deadline is not None:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            usable_ms = remaining_ms - self.config.reply_margin_ms
            if usable_ms < self.config.vlm_min_budget_ms:
                return None, f"not generated: {remaining_ms:.0f} ms left of the deadline", 0.0
            timeout = min(timeout, usable_ms / 1000.0)
        if not self._escalation_slots.try_acquire():  # a rationale never waits for a VLM slot
            return None, "not generated: the VLM is saturated", 0.0
        if vlm_scores is not None:
            breed = vlm_scores.candidates[int(np.argmax(vlm_scores.probabilities))]
        else:
            breed = answer.labels[0]
        t = time.perf_counter()
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
            self._escalation_slots.release()
        return rationale, "", (time.perf_counter() - t) * 1000.0

    def _skip(self, reason: EscalationReason, decision: EscalationDecision, detail: str, vlm_ms: float = 0.0):
        return EscalationDecision(False, reason, decision.confidence, detail), None, vlm_ms

    async def _ask_vlm(self, img: Image.Image, cnn_top: TopK, decision: EscalationDecision,
                       deadline: float | None, n_candidates: int | None = None,
                       priority: int = Priority.INTERACTIVE,
                       tenant: str = "") -> tuple[EscalationDecision, CandidateScores | None, float]:
        """Asks the VLM unless something says not to; every skip comes with its reason.

        The call is bounded by the client's deadline (less ``reply_margin_ms`` to answer) and by
        the server's own VLM budget (``vlm_call_budget_s``). Only the budget running out counts
        against the VLM in the breaker: the client's deadline says nothing about the VLM's
        health, but a VLM that cannot answer within the server's budget is failing whatever the
        clients ask for. The breaker's lease is released however the call ends.
        """
        if self.verifier is None:
            return self._skip(EscalationReason.VLM_DISABLED, decision, "no VLM stage is configured on this server")
        min_budget_s = self.config.vlm_min_budget_ms / 1000.0
        margin_s = self.config.reply_margin_ms / 1000.0
        if deadline is not None and deadline - time.monotonic() - margin_s < min_budget_s:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            return self._skip(EscalationReason.DEADLINE, decision, f"{remaining_ms:.0f} ms left of the deadline; "
                              f"the VLM needs {self.config.vlm_min_budget_ms:.0f} ms, and "
                              f"{self.config.reply_margin_ms:.0f} ms are kept to answer")
        budgets = self.tenant_budgets
        if budgets is not None and not budgets.allow_escalation(tenant):
            return self._skip(EscalationReason.TENANT_BUDGET, decision,
                              f"tenant {tenant or 'anonymous'!r} has spent its VLM escalation budget")
        slots = self._escalation_slots
        if not slots.try_acquire():
            if slots.waiting >= slots.max_waiting:
                if budgets is not None:
                    budgets.give_back(tenant)
                return self._skip(EscalationReason.SHED, decision, f"VLM saturated ({slots.in_use} calls in flight, "
                                  f"{slots.waiting} waiting); escalation shed")
            wait_s = None if deadline is None else deadline - time.monotonic() - min_budget_s - margin_s
            if not await slots.acquire(priority, wait_s):
                if budgets is not None:
                    budgets.give_back(tenant)
                return self._skip(EscalationReason.DEADLINE, decision, "the deadline ran out waiting for a VLM slot")
        lease = None
        if self.breaker is not None:
            lease = self.breaker.acquire()
            if lease is None:
                slots.release()
                if budgets is not None:
                    budgets.give_back(tenant)
                state = "half-open (a probe is checking the VLM)" if self.breaker.state == BreakerState.HALF_OPEN \
                    else "open after repeated failures"
                return self._skip(EscalationReason.VLM_UNAVAILABLE, decision, f"VLM circuit breaker is {state}")
        budget = self.config.vlm_call_budget_s
        client_timeout = None if deadline is None else deadline - time.monotonic() - margin_s
        client_bound = client_timeout is not None and client_timeout < budget
        timeout = client_timeout if client_bound else budget
        candidates = cnn_top.labels[: n_candidates or self.config.candidates]
        t = time.perf_counter()
        self.vlm_calls += 1
        try:
            extra = {"priority": int(priority)} if _takes_priority(type(self.verifier)) else {}
            scores = await asyncio.wait_for(self.verifier.verify(img, candidates, **extra), timeout)
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
        finally:  # also on cancellation (the client went away): the slot and the probe are given back
            slots.release()
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
