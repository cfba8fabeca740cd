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
import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping

import numpy as np
from PIL import Image

from catcascade.cnn_stage.decode_budget import decode_work
from catcascade.cnn_stage.native_memory import release_free_memory
from catcascade.cnn_stage.preprocessing import PreprocessConfig, decode_image, preprocess
from catcascade.cnn_stage.topk import TopK, softmax, top_k
from catcascade.ensemble.blending import Blender
from catcascade.ensemble.candidate_sets import set_size
from catcascade.ensemble.config import CascadeConfig
from catcascade.ensemble.escalation_policy import EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason
from catcascade.errors import CatcascadeError
from catcascade.serving.batcher import QueueFullError
from catcascade.serving.cascade_engine import (CascadeResult, ClassifyRequest, EngineIdentity, StageTimings,
                                               Verifier)
from catcascade.serving.circuit_breaker import BreakerState, CircuitBreaker
from catcascade.serving.config import LimitsConfig, MemoryConfig, VlmEndpointConfig
from catcascade.serving.engines.cnn_engine import CnnEngine
from catcascade.serving.engines.thread_priority import lower_current_thread
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.observability.tracing import NoTracing, now_ns
from catcascade.serving.traffic.priorities import Priority, PrioritySlots
from catcascade.serving.traffic.tenant_budgets import TenantBudgets
from catcascade.vlm_stage.rationale import Rationale
from catcascade.vlm_stage.scoring import CandidateScores

log = logging.getLogger(__name__)
DEFAULT_TOP_K = 3


class DeadlineExceededError(CatcascadeError, RuntimeError):
    """The request's deadline passed before its work started; nothing was done for it."""


class CascadePipeline:
    """One model version's cascade; implements serving.cascade_engine.CascadeEngine."""

    def __init__(self, labels: list[str], preprocess_config: PreprocessConfig, cnn: CnnEngine,
                 policy: EscalationPolicy, blender: Blender, verifier: Verifier | None = None,
                 temperature: float = 1.0, *, limits: LimitsConfig = LimitsConfig(),
                 vlm: VlmEndpointConfig = VlmEndpointConfig(), memory: MemoryConfig = MemoryConfig(),
                 cascade: CascadeConfig = CascadeConfig(), default_top_k: int = DEFAULT_TOP_K,
                 decode_threads: int = 2, decode_nice: int = 0, breaker: CircuitBreaker | None = None,
                 metrics: ServiceMetrics | None = None, tracing: NoTracing | None = None,
                 tenant_budgets: TenantBudgets | None = None, identity: EngineIdentity = EngineIdentity()):
        """``limits``, ``vlm`` and ``memory`` are the ServeConfig's sections; ``cascade`` the
        bundle's cascade settings (candidates; the policy and blender come built from it)."""
        self.labels = labels
        self.preprocess_config = preprocess_config
        self.cnn = cnn
        self.policy = policy
        self.blender = blender
        self.verifier = verifier
        self.temperature = temperature
        self.limits, self.vlm, self.memory, self.cascade = limits, vlm, memory, cascade
        self.default_top_k = default_top_k
        self.decode_threads = decode_threads
        self.breaker = breaker
        self.metrics = metrics
        self.identity = identity
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode",
                                               initializer=lower_current_thread, initargs=(decode_nice,))
        self.tracing = tracing or NoTracing()
        self.tenant_budgets = tenant_budgets
        self.decode_waiting = 0
        self.decode_work_waiting = 0.0
        self.decodes_started = 0
        self._decode_jobs: list[tuple[int, int, Future, object]] = []  # heap: (priority, arrival, future, job)
        self._decode_arrivals = itertools.count()
        self._decode_lock = threading.Lock()
        self.vlm_calls = 0
        self._escalation_slots = PrioritySlots(limits.max_concurrent_escalations, limits.escalation_queue_size)
        self._rationale_slots = PrioritySlots(limits.max_concurrent_rationales)

    def vlm_serving(self) -> bool:
        return self.verifier is not None and (self.breaker is None or self.breaker.state == BreakerState.CLOSED)

    @property
    def inflight_escalations(self) -> int:
        """VLM calls in flight now (escalations and rationales)."""
        return self._escalation_slots.in_use + self._rationale_slots.in_use

    @property
    def waiting_escalations(self) -> int:
        """Escalations queued for a VLM slot (``escalation_queue_size`` > 0)."""
        return self._escalation_slots.waiting

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False)

    async def _decode_in_pool(self, data: bytes, keep_for_vlm: bool, deadline: float | None,
                              priority: int = Priority.INTERACTIVE) -> tuple[Image.Image | None, np.ndarray]:
        """Runs ``_decode`` on the decode pool, interactive images first: a free thread takes the
        waiting job of lowest priority value, then the oldest. The queue is bounded in images
        and in predicted decode work (a many-scan JPEG counts for what it costs); a job whose
        request is cancelled (client gone, deadline passed in gRPC) before a thread picks it
        up is dropped, and a job that starts after its deadline returns at once, so the
        decode threads only ever work for requests someone still waits on."""
        work = decode_work(data, self.preprocess_config.limits)
        with self._decode_lock:
            if self.decode_waiting >= self.limits.max_decode_queue:
                raise QueueFullError(f"decode queue is full ({self.decode_waiting} images waiting)")
            if self.decode_waiting and self.decode_work_waiting + work > self.limits.max_decode_work:
                raise QueueFullError(f"decode queue is full ({self.decode_work_waiting:.0f} units of decode work "
                                     f"waiting, limit {self.limits.max_decode_work:g}; this image is {work:.1f})")
            self.decode_waiting += 1
            self.decode_work_waiting += work

        def job():
            late = deadline is not None and time.monotonic() >= deadline
            with self._decode_lock:
                self.decode_waiting -= 1
                self.decode_work_waiting -= work
                self.decodes_started += not late
            if not late and self.metrics is not None:
                self.metrics.decodes_started.inc()
            if late:
                self._count_skipped_decode("deadline")
                raise DeadlineExceededError("the deadline passed while the image waited to be decoded")
            return self._decode(data, keep_for_vlm)

        future: Future = Future()
        with self._decode_lock:
            heapq.heappush(self._decode_jobs, (int(priority), next(self._decode_arrivals), future, job))
        self._decode_pool.submit(self._run_next_decode)  # one pool task per job: every job is taken once
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.cancel():  # never ran, never will: give its queue slot back
                with self._decode_lock:
                    self.decode_waiting -= 1
                    self.decode_work_waiting -= work
                self._count_skipped_decode("cancelled")
            raise

    def _run_next_decode(self) -> None:
        """On a decode thread: runs the most urgent waiting job (a cancelled one is skipped)."""
        with self._decode_lock:
            _, _, future, job = heapq.heappop(self._decode_jobs)
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(job())
            except BaseException as e:
                future.set_exception(e)

    def _count_skipped_decode(self, why: str) -> None:
        if self.metrics is not None:
            self.metrics.decodes_skipped.labels(why).inc()

    @property
    def max_candidates(self) -> int:
        return self.cascade.max_candidates

    def candidate_count(self, size: int | None) -> int:
        """How many of the CNN's top breeds the VLM is asked about: the image's conformal set
        (at least 2: one option tells the VLM nothing), or the fixed number without sets."""
        return self.cascade.top_k if size is None else max(2, size)

    def _decode(self, data: bytes, keep_for_vlm: bool) -> tuple[Image.Image | None, np.ndarray]:
        """Decode + preprocess; keeps at most a ``vlm_image_side`` copy for the VLM, so the
        memory a request holds while it waits on the VLM is bounded whatever was uploaded."""
        cfg = self.preprocess_config
        t0 = time.perf_counter()
        img = decode_image(data, cfg.limits, draft_size=cfg.scale_size)
        x = preprocess(img, cfg)
        if keep_for_vlm:
            side = self.vlm.image_side
            if max(img.size) > side:
                img.thumbnail((side, side), Image.Resampling.BICUBIC)
        else:
            img = None  # the decoded image is freed before the trim below
        trim_ms = self.memory.trim_after_decode_ms
        if trim_ms is not None and (time.perf_counter() - t0) * 1000.0 > trim_ms:
            release_free_memory()
        return img, x

    async def classify(self, request: ClassifyRequest) -> CascadeResult:
        """Classifies ``request.image``: the CNN's queue and the VLM's are ordered by its
        priority; an escalation spends its tenant's budget; ``explain`` asks the VLM for a short
        rationale after the answer is final.

        Raises InvalidImageError for bad bytes, QueueFullError when the decode or CNN queue is
        full (DeadlineUnmeetableError, a QueueFullError, when the deadline is too close for a
        CNN batch to run), DeadlineExceededError when the deadline passed before decoding started.
        """
        t0 = time.perf_counter()
        data, mode, deadline, priority = request.image, request.mode, request.deadline, request.priority
        k = request.top_k or self.default_top_k
        keep = mode != EscalationMode.NEVER and self.verifier is not None
        tracing = self.tracing
        if self.cnn.decodes_images:  # the engine decodes where the model runs (Ray replicas)
            img, res = None, await self.cnn.submit_encoded(data, priority, deadline)
            t_decode = t0 + res.decode_ms / 1000.0
        else:
            with tracing.stage("decode"):
                img, x = await self._decode_in_pool(data, keep, deadline, priority)
            t_decode = time.perf_counter()
            res = await self.cnn.submit(x, priority, deadline)
        if request.on_cnn_done is not None:
            request.on_cnn_done()
        if tracing.enabled:  # the batcher timed both; spans from its readings
            end = now_ns()
            cnn_start = end - int(res.compute_ms * 1e6)
            tracing.record_stage("cnn_queue", cnn_start - int(res.queue_ms * 1e6), cnn_start)
            tracing.record_stage("cnn", cnn_start, end, {"catcascade.cnn.batch_size": res.batch_size})
        probs = softmax(res.output, self.temperature)
        cnn_top = top_k(probs, self.labels, max(k, self.max_candidates, 2))
        sets = self.cascade.candidate_sets
        size = set_size(sets, probs) if sets is not None else None
        decision = self.policy.decide(probs, mode, size, sets.skip_singletons if sets is not None else True)
        final, vlm_scores, vlm_ms, blend_ms = probs, None, 0.0, 0.0
        if img is None and keep and (decision.escalate or request.explain):  # decoded remotely: the VLM's copy
            img, _ = await self._decode_in_pool(data, True, deadline, priority)
        if decision.escalate:
            with tracing.stage("vlm"):
                decision, vlm_scores, vlm_ms = await self._ask_vlm(img, cnn_top, decision, request,
                                                                   self.candidate_count(size))
            if vlm_scores is not None:
                with tracing.stage("blend"):
                    tb = time.perf_counter()
                    cand = cnn_top.indices[: len(vlm_scores.probabilities)]
                    final = self.blender.blend(probs, cand, np.asarray(vlm_scores.probabilities))
                    blend_ms = (time.perf_counter() - tb) * 1000.0
        answer = top_k(final, self.labels, k)
        rationale, why_not, rationale_ms = None, "", 0.0
        if request.explain:
            rationale, why_not, rationale_ms = await self._explain(img, answer, vlm_scores, request)
        timings = StageTimings(
            decode_ms=(t_decode - t0) * 1000.0, cnn_queue_ms=res.queue_ms, cnn_ms=res.compute_ms, vlm_ms=vlm_ms,
            blend_ms=blend_ms, total_ms=(time.perf_counter() - t0) * 1000.0, cnn_batch_size=res.batch_size,
            rationale_ms=rationale_ms)
        cnn_k = TopK(cnn_top.indices[:k], cnn_top.labels[:k], cnn_top.probabilities[:k])
        return CascadeResult(answer, cnn_k, vlm_scores, vlm_scores is not None, decision.reason, decision.detail,
                             timings, rationale, why_not, self.identity.versions)

    def _trace_headers(self, request: ClassifyRequest) -> Mapping[str, str]:
        """W3C trace context for a VLM call: the current stage's span when tracing, else the request's."""
        return self.tracing.outgoing_headers() if self.tracing.enabled else request.trace_headers

    def _take_budget(self, tenant: str | None) -> bool:
        """One VLM call from ``tenant``'s budget (None: a call no tenant pays for, e.g. a shadow copy)."""
        return self.tenant_budgets is None or tenant is None or self.tenant_budgets.allow_escalation(tenant)

    def _give_back_budget(self, tenant: str | None) -> None:
        if self.tenant_budgets is not None and tenant is not None:
            self.tenant_budgets.give_back(tenant)

    async def _explain(self, img: Image.Image | None, answer: TopK, vlm_scores: CandidateScores | None,
                       request: ClassifyRequest) -> tuple[Rationale | None, str, float]:
        """The VLM's rationale for the breed it favours (its best candidate when it scored the
        image, else the answer's top-1); every reason for not giving one is said. A rationale is
        a VLM call: it spends the tenant's budget like an escalation, but takes one of its own
        slots, so that explain callers never take plain escalations' slots."""
        if request.mode == EscalationMode.NEVER:
            return None, "not generated: the client asked for CNN only (escalation NEVER)", 0.0
        if self.verifier is None or img is None:
            return None, "not generated: no VLM stage is configured on this server", 0.0
        if self.breaker is not None and self.breaker.state != BreakerState.CLOSED:
            return None, "not generated: the VLM circuit breaker is not closed", 0.0
        timeout = self.vlm.call_budget_s
        if request.deadline is not None:
            remaining_ms = (request.deadline - time.monotonic()) * 1000.0
            usable_ms = remaining_ms - self.limits.reply_margin_ms
            if usable_ms < self.limits.vlm_min_budget_ms:
                return None, f"not generated: {remaining_ms:.0f} ms left of the deadline", 0.0
            timeout = min(timeout, usable_ms / 1000.0)
        if not self._take_budget(request.tenant):
            return None, f"not generated: tenant {request.tenant!r} has spent its VLM escalation budget", 0.0
        if not self._rationale_slots.try_acquire():  # a rationale never waits for a slot
            self._give_back_budget(request.tenant)
            return None, f"not generated: all {self.limits.max_concurrent_rationales} rationale slots are in use", 0.0
        if vlm_scores is not None:
            breed = vlm_scores.candidates[int(np.argmax(vlm_scores.probabilities))]
        else:
            breed = answer.labels[0]
        t = time.perf_counter()
        try:
            rationale = await asyncio.wait_for(self.verifier.explain(img, breed, self.vlm.rationale_max_tokens,
                                                                     priority=int(request.priority),
                                                                     headers=self._trace_headers(request)), timeout)
        except asyncio.TimeoutError:
            return None, "not generated: the VLM did not answer within the deadline", (time.perf_counter() - t) * 1000.0
        except (RuntimeError, OSError, ValueError) as e:  # VlmUnavailableError, RationaleError, transport errors
            if self.metrics is not None:
                self.metrics.vlm_errors.labels("rationale").inc()
            log.warning("no rationale: %s", e)
            return None, f"not generated: {e}"[:300], (time.perf_counter() - t) * 1000.0
        finally:
            self._rationale_slots.release()
        return rationale, "", (time.perf_counter() - t) * 1000.0

    def _skip(self, reason: EscalationReason, decision: EscalationDecision, detail: str, vlm_ms: float = 0.0):
        return EscalationDecision(False, reason, decision.confidence, detail), None, vlm_ms

    async def _ask_vlm(self, img: Image.Image, cnn_top: TopK, decision: EscalationDecision,
                       request: ClassifyRequest, n_candidates: int | None = None
                       ) -> tuple[EscalationDecision, CandidateScores | None, float]:
        """Asks the VLM unless something says not to; every skip comes with its reason.

        The call is bounded by the client's deadline (less ``reply_margin_ms`` to answer) and by
        the server's own VLM budget (``vlm_call_budget_s``). Only the budget running out counts
        against the VLM in the breaker: the client's deadline says nothing about the VLM's
        health, but a VLM that cannot answer within the server's budget is failing whatever the
        clients ask for. The breaker's lease is released however the call ends.
        """
        if self.verifier is None:
            return self._skip(EscalationReason.VLM_DISABLED, decision, "no VLM stage is configured on this server")
        min_budget_s = self.limits.vlm_min_budget_ms / 1000.0
        margin_s = self.limits.reply_margin_ms / 1000.0
        deadline, priority, tenant = request.deadline, request.priority, request.tenant
        if deadline is not None and deadline - time.monotonic() - margin_s < min_budget_s:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            return self._skip(EscalationReason.DEADLINE, decision, f"{remaining_ms:.0f} ms left of the deadline; "
                              f"the VLM needs {self.limits.vlm_min_budget_ms:.0f} ms, and "
                              f"{self.limits.reply_margin_ms:.0f} ms are kept to answer")
        if not self._take_budget(tenant):
            return self._skip(EscalationReason.TENANT_BUDGET, decision,
                              f"tenant {tenant or 'anonymous'!r} has spent its VLM escalation budget")
        slots = self._escalation_slots
        if not slots.try_acquire():
            if slots.waiting >= slots.max_waiting:
                self._give_back_budget(tenant)
                return self._skip(EscalationReason.SHED, decision, f"VLM saturated ({slots.in_use} calls in flight, "
                                  f"{slots.waiting} waiting); escalation shed")
            wait_s = None if deadline is None else deadline - time.monotonic() - min_budget_s - margin_s
            if not await slots.acquire(priority, wait_s):
                self._give_back_budget(tenant)
                return self._skip(EscalationReason.DEADLINE, decision, "the deadline ran out waiting for a VLM slot")
        lease = None
        if self.breaker is not None:
            lease = self.breaker.acquire()
            if lease is None:
                slots.release()
                self._give_back_budget(tenant)
                state = "half-open (a probe is checking the VLM)" if self.breaker.state == BreakerState.HALF_OPEN \
                    else "open after repeated failures"
                return self._skip(EscalationReason.VLM_UNAVAILABLE, decision, f"VLM circuit breaker is {state}")
        budget = self.vlm.call_budget_s
        client_timeout = None if deadline is None else deadline - time.monotonic() - margin_s
        client_bound = client_timeout is not None and client_timeout < budget
        timeout = client_timeout if client_bound else budget
        candidates = cnn_top.labels[: n_candidates or self.cascade.top_k]
        t = time.perf_counter()
        self.vlm_calls += 1
        try:
            scores = await asyncio.wait_for(self.verifier.verify(img, candidates, priority=int(priority),
                                                                 headers=self._trace_headers(request)), timeout)
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
