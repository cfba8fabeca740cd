"""CascadePipeline.classify with fakes of what it calls (the CNN batcher, the VLM verifier):
exact values for the temperature, the policy, the blend and every reason an escalation is
skipped. The real ONNX Runtime, vLLM and gRPC are exercised in the integration tests."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest

from catcascade.cnn_stage.preprocessing import InvalidImageError
from catcascade.cnn_stage.topk import softmax
from catcascade.ensemble.escalation_policy import EscalationMode, EscalationReason
from catcascade.serving.batcher import QueueFullError
from catcascade.serving.circuit_breaker import BreakerConfig, BreakerState, CircuitBreaker
from catcascade.serving.metrics import ServiceMetrics
from catcascade.serving.pipeline import CascadePipeline
from tests.conftest import jpeg_bytes
from tests.fakes import LABELS, LOGITS, FakeBatcher, FakeClock, FakeVerifier, fake_pipeline, request_for, until
from catcascade.vlm_stage.scoring import ScoringError
from catcascade.vlm_stage.vllm_client import VlmClientConfig, VllmVerifier, VlmUnavailableError

T = 2.0
P = softmax(LOGITS, T)  # the calibrated CNN distribution every test starts from
TOP3 = (1, 3, 4)  # Bengal, Bombay, Persian
IMAGE = jpeg_bytes((40, 30), seed=1)


def make(verifier=None, **kwargs) -> CascadePipeline:
    return fake_pipeline(verifier, temperature=kwargs.pop("temperature", T), **kwargs)


def classify(pipeline, image: bytes = IMAGE, k=None, mode=EscalationMode.AUTO, deadline=None):
    async def go():
        try:
            return await pipeline.classify(request_for(image, k, mode, deadline))
        finally:
            pipeline.close()

    return asyncio.run(go())


def blended(vlm=(0.1, 0.2, 0.6), weight: float = 0.5) -> np.ndarray:
    """The log-linear pool by hand: inside the top 3, q ∝ p^(1-w) v^w with the VLM's scores
    renormalised without "none", rescaled to the CNN's mass there; outside, the CNN's."""
    v = np.asarray(vlm) / sum(vlm)
    p = P[list(TOP3)]
    q = p ** (1 - weight) * v ** weight
    out = P.copy()
    out[list(TOP3)] = q / q.sum() * p.sum()
    return out


def ranked(probs: np.ndarray, k: int):
    idx = sorted(range(len(probs)), key=lambda i: -probs[i])[:k]
    return tuple(LABELS[i] for i in idx), pytest.approx(tuple(probs[i] for i in idx), abs=1e-12)


def test_cnn_probabilities_are_the_logits_at_the_bundles_temperature():
    r = classify(make(), k=6, mode=EscalationMode.NEVER)
    assert r.cnn.labels == ("Bengal", "Bombay", "Persian", "Abyssinian", "Siamese", "Birman")
    assert r.cnn.indices == (1, 3, 4, 0, 5, 2)
    e = np.exp(LOGITS.astype(np.float64) / T)
    assert r.cnn.probabilities == pytest.approx(tuple(e[list(r.cnn.indices)] / e.sum()), abs=1e-12)
    assert (r.labels.labels, r.labels.probabilities) == ranked(P, 6)
    plain = classify(make(temperature=1.0), k=1, mode=EscalationMode.NEVER)
    assert plain.cnn.probabilities[0] == pytest.approx(np.exp(3.0) / np.exp(LOGITS.astype(np.float64)).sum(), abs=1e-12)


def test_never_answers_with_the_cnn_and_reports_its_timings():
    verifier, cnn = FakeVerifier(), FakeBatcher(queue_ms=1.5, compute_ms=2.5, batch_size=3)
    r = classify(make(verifier, cnn=cnn), mode=EscalationMode.NEVER)
    assert not verifier.calls and not r.escalated and r.vlm is None
    assert r.reason == EscalationReason.REQUESTED_NEVER and r.detail == "client asked for CNN only"
    assert r.labels == r.cnn and len(r.labels.labels) == 3
    t = r.timings
    assert (t.cnn_queue_ms, t.cnn_ms, t.cnn_batch_size, t.vlm_ms, t.blend_ms) == (1.5, 2.5, 3, 0.0, 0.0)
    assert t.total_ms >= t.decode_ms > 0
    assert cnn.inputs[0].shape == (3, 32, 32) and cnn.inputs[0].dtype == np.float32


@pytest.mark.parametrize("mode,reason", [(EscalationMode.AUTO, EscalationReason.LOW_CONFIDENCE),
                                         (EscalationMode.ALWAYS, EscalationReason.REQUESTED_ALWAYS)])
def test_escalation_asks_the_vlm_about_the_top3_and_answers_with_the_blend(mode, reason):
    verifier = FakeVerifier(probabilities=(0.1, 0.2, 0.6), none_probability=0.1)
    r = classify(make(verifier, threshold=0.6), k=5, mode=mode)
    assert verifier.calls == [((40, 30), ("Bengal", "Bombay", "Persian"))]
    assert r.escalated and r.reason == reason
    assert r.vlm.candidates == ("Bengal", "Bombay", "Persian") and r.vlm.probabilities == (0.1, 0.2, 0.6)
    assert (r.labels.labels, r.labels.probabilities) == ranked(blended(), 5)
    assert r.labels.labels[0] == "Persian"  # the VLM's strong vote moved it to the top
    assert (r.cnn.labels, r.cnn.probabilities) == ranked(P, 5)  # the CNN's own answer is kept beside
    assert r.timings.vlm_ms > 0 and r.timings.blend_ms > 0
    if mode == EscalationMode.AUTO:
        assert r.detail == f"top1 confidence {P.max():.3f} < 0.600"


def test_blend_weight_comes_from_the_blender():
    r = classify(make(FakeVerifier(), weight=0.9), k=6, mode=EscalationMode.ALWAYS)
    assert (r.labels.labels, r.labels.probabilities) == ranked(blended(weight=0.9), 6)


def test_policy_decides_with_the_calibrated_probabilities():
    """Top-1 is 0.367 at T=2 and 0.562 at T=1: a threshold of 0.45 separates them."""
    r = classify(make(FakeVerifier(), threshold=0.45))
    assert r.escalated and r.reason == EscalationReason.LOW_CONFIDENCE
    assert r.detail == f"top1 confidence {P.max():.3f} < 0.450"
    sure = classify(make(FakeVerifier(), threshold=0.45, temperature=1.0))
    assert not sure.escalated and sure.reason == EscalationReason.CONFIDENT
    assert sure.detail == f"top1 confidence {softmax(LOGITS).max():.3f} >= 0.450"


def test_confident_answer_makes_no_vlm_call():
    verifier = FakeVerifier()
    r = classify(make(verifier, threshold=0.3))
    assert not verifier.calls and not r.escalated and r.vlm is None
    assert r.reason == EscalationReason.CONFIDENT and r.labels == r.cnn


def test_top_k_default_and_candidates_are_separate():
    verifier = FakeVerifier()
    r = classify(make(verifier, default_top_k=2, candidates=3), mode=EscalationMode.ALWAYS)
    assert len(r.labels.labels) == 2 and len(r.cnn.labels) == 2
    assert verifier.calls[0][1] == ("Bengal", "Bombay", "Persian")
    r = classify(make(FakeVerifier(probabilities=(0.3, 0.7)), candidates=2), k=1, mode=EscalationMode.ALWAYS)
    assert r.vlm.candidates == ("Bengal", "Bombay") and r.labels.labels == ("Bombay",)


def test_vlm_sees_a_bounded_copy_of_the_upload():
    verifier = FakeVerifier()
    classify(make(verifier, vlm_image_side=100), image=jpeg_bytes((400, 200), seed=2), mode=EscalationMode.ALWAYS)
    classify(make(verifier, vlm_image_side=100), image=jpeg_bytes((80, 60), seed=2), mode=EscalationMode.ALWAYS)
    assert [size for size, _ in verifier.calls] == [(100, 50), (80, 60)]


def test_no_verifier_means_vlm_disabled():
    r = classify(make(None), mode=EscalationMode.ALWAYS)
    assert not r.escalated and r.vlm is None and r.reason == EscalationReason.VLM_DISABLED
    assert r.detail == "no VLM stage is configured on this server" and r.labels == r.cnn


def test_too_little_deadline_left_skips_the_vlm():
    verifier = FakeVerifier()
    r = classify(make(verifier, vlm_min_budget_ms=5000.0), mode=EscalationMode.ALWAYS,
                 deadline=time.monotonic() + 2.0)
    assert not verifier.calls and not r.escalated and r.reason == EscalationReason.DEADLINE
    assert r.detail.endswith("ms left of the deadline; the VLM needs 5000 ms, and 100 ms are kept to answer")
    assert r.labels == r.cnn


def test_vlm_timeout_inside_the_deadline_answers_cnn_only_and_spares_the_breaker():
    """The VLM call gets what is left of the deadline less the reply margin (100 ms); a VLM
    that does not answer in time gives a CNN-only answer, and says nothing about its health."""
    verifier, metrics = FakeVerifier(hold=True), ServiceMetrics()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1))
    pipeline = make(verifier, vlm_min_budget_ms=20.0, breaker=breaker, metrics=metrics)
    t0 = time.monotonic()
    r = classify(pipeline, mode=EscalationMode.ALWAYS, deadline=t0 + 1.0)
    waited = time.monotonic() - t0
    assert len(verifier.calls) == 1 and not r.escalated and r.vlm is None
    assert r.reason == EscalationReason.DEADLINE and r.detail == "the VLM did not answer within the client's deadline"
    assert r.labels == r.cnn and 0.85 <= waited and r.timings.vlm_ms > 500
    assert breaker.state == BreakerState.CLOSED and breaker.acquire() is not None
    assert metrics.vlm_errors.labels("deadline")._value.get() == 1
    assert pipeline.inflight_escalations == 0


def test_vlm_past_the_servers_own_budget_is_a_vlm_failure():
    """Without a client deadline the server's VLM budget bounds the call, and running out of
    it does count against the VLM (the breaker opens at its threshold of 1)."""
    verifier, metrics = FakeVerifier(hold=True), ServiceMetrics()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1))
    pipeline = make(verifier, vlm_call_budget_s=0.3, breaker=breaker, metrics=metrics)
    r = classify(pipeline, mode=EscalationMode.ALWAYS)
    assert r.reason == EscalationReason.VLM_UNAVAILABLE
    assert r.detail == "VLM did not answer within the server's 0.3 s budget"
    assert r.timings.vlm_ms >= 300 and breaker.state == BreakerState.OPEN
    assert metrics.vlm_errors.labels("budget")._value.get() == 1 and pipeline.inflight_escalations == 0


@pytest.mark.parametrize("error", [VlmUnavailableError("vLLM unavailable after 3 attempts"),
                                   ScoringError("none of the options"), ConnectionResetError("reset"),
                                   ValueError("options share a first token"), TypeError("a bug in a backend"),
                                   KeyError("choices")], ids=lambda e: type(e).__name__)
def test_vlm_failure_answers_cnn_only_with_the_reason(error):
    metrics = ServiceMetrics()
    pipeline = make(FakeVerifier(error=error), metrics=metrics)
    r = classify(pipeline, mode=EscalationMode.ALWAYS)
    assert not r.escalated and r.vlm is None and r.reason == EscalationReason.VLM_UNAVAILABLE
    assert r.detail == f"VLM unavailable: {error}" and r.labels == r.cnn
    assert metrics.vlm_errors.labels(type(error).__name__)._value.get() == 1
    assert pipeline.inflight_escalations == 0 and pipeline.vlm_calls == 1


def test_a_vlm_error_without_a_message_is_named_by_its_type():
    r = classify(make(FakeVerifier(error=ScoringError())), mode=EscalationMode.ALWAYS)
    assert r.reason == EscalationReason.VLM_UNAVAILABLE and r.detail == "VLM unavailable: ScoringError"


def test_vlm_answering_200_with_malformed_logprobs_gives_a_cnn_only_answer():
    """The real vLLM client over a fake network: HTTP 200, logprobs of the wrong shape."""
    def handler(request: httpx.Request):
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [ord(json.loads(request.content)["prompt"])]})
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": [{"top_logprobs": [
            {"token": "A", "logprob": "high"}]}]}}]})

    async def go():
        verifier = VllmVerifier(VlmClientConfig(urls=["http://vlm:1"], max_retries=0),
                                transport=httpx.MockTransport(handler))
        pipeline = make(verifier)
        try:
            return await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))
        finally:
            pipeline.close()
            await verifier.aclose()

    r = asyncio.run(go())
    assert not r.escalated and r.reason == EscalationReason.VLM_UNAVAILABLE
    assert r.detail.startswith("VLM unavailable: vLLM answered with malformed logprobs") and r.labels == r.cnn


def test_escalations_beyond_the_limit_are_shed():
    async def go():
        verifier = FakeVerifier(hold=True)
        pipeline = make(verifier, max_concurrent_escalations=1)
        first = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
        await until(lambda: verifier.waiting == 1, "the first escalation waits on the VLM")
        assert pipeline.inflight_escalations == 1
        second = await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))
        verifier.release.set()
        first = await first
        third = await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))
        pipeline.close()
        return first, second, third, verifier, pipeline

    first, second, third, verifier, pipeline = asyncio.run(go())
    assert first.escalated and third.escalated and len(verifier.calls) == 2
    assert not second.escalated and second.reason == EscalationReason.SHED and second.labels == second.cnn
    assert second.detail == "VLM saturated (1 calls in flight, 0 waiting); escalation shed"
    assert pipeline.inflight_escalations == 0 and pipeline.vlm_calls == 2


def test_breaker_opens_after_failures_then_a_probe_closes_it():
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=2, cooldown_s=5.0), clock=clock)
    verifier = FakeVerifier(error=VlmUnavailableError("down"))
    pipeline = make(verifier, breaker=breaker)

    def ask():
        return asyncio.run(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))

    assert [ask().reason for _ in range(2)] == [EscalationReason.VLM_UNAVAILABLE] * 2
    assert breaker.state == BreakerState.OPEN and len(verifier.calls) == 2
    skipped = ask()
    assert skipped.reason == EscalationReason.VLM_UNAVAILABLE and len(verifier.calls) == 2  # not even tried
    assert skipped.detail == "VLM circuit breaker is open after repeated failures"
    clock.t = 5.0
    verifier.error = None
    probe = ask()
    assert probe.escalated and probe.reason == EscalationReason.REQUESTED_ALWAYS and len(verifier.calls) == 3
    assert breaker.state == BreakerState.CLOSED
    pipeline.close()


def test_success_resets_the_breakers_failure_count():
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=2), clock=FakeClock())
    verifier = FakeVerifier()
    pipeline = make(verifier, breaker=breaker)
    for error in (VlmUnavailableError("down"), None, VlmUnavailableError("down"), None):
        verifier.error = error
        asyncio.run(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
    assert breaker.state == BreakerState.CLOSED and len(verifier.calls) == 4
    pipeline.close()


def test_bad_image_and_full_queue_are_raised_to_the_caller():
    with pytest.raises(InvalidImageError, match="not a decodable image"):
        classify(make(FakeVerifier()), image=b"not an image")
    with pytest.raises(QueueFullError):
        classify(make(FakeVerifier(), cnn=FakeBatcher(error=QueueFullError("full"))))


def _timings_hold_together(r):
    t = r.timings
    assert 0 < t.decode_ms <= t.total_ms and 0 <= t.vlm_ms <= t.total_ms and 0 <= t.blend_ms <= t.total_ms
    assert 0 <= t.rationale_ms <= t.total_ms


@pytest.mark.parametrize("make_args,mode,reason", [
    ({}, EscalationMode.ALWAYS, EscalationReason.VLM_DISABLED),
    ({"verifier": FakeVerifier(), "max_concurrent_escalations": 0}, EscalationMode.ALWAYS, EscalationReason.SHED),
    ({"verifier": FakeVerifier(), "vlm_min_budget_ms": 60_000.0}, EscalationMode.ALWAYS, EscalationReason.DEADLINE),
])
def test_skips_before_calling_the_vlm_cost_no_vlm_time(make_args, mode, reason):
    r = classify(make(**make_args), mode=mode, deadline=time.monotonic() + 30)
    assert r.reason == reason and not r.escalated and r.timings.vlm_ms == 0.0 and r.timings.blend_ms == 0.0
    _timings_hold_together(r)


def test_vlm_time_is_measured_around_the_call():
    async def go():
        verifier = FakeVerifier(hold=True)
        pipeline = make(verifier)
        task = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
        await until(lambda: verifier.waiting == 1, "the VLM call is under way")
        t0 = time.perf_counter()
        await until(lambda: time.perf_counter() - t0 > 0.05, "some time passes inside the VLM call")
        held_ms = (time.perf_counter() - t0) * 1000.0
        verifier.release.set()
        r = await task
        pipeline.close()
        return r, held_ms

    r, held_ms = asyncio.run(go())
    assert r.escalated and held_ms <= r.timings.vlm_ms <= r.timings.total_ms
    _timings_hold_together(r)


def test_vlm_failure_time_is_measured_too():
    async def go():
        verifier = FakeVerifier(hold=True, error=VlmUnavailableError("down"))
        pipeline = make(verifier)
        task = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
        await until(lambda: verifier.waiting == 1, "the VLM call is under way")
        t0 = time.perf_counter()
        await until(lambda: time.perf_counter() - t0 > 0.05, "some time passes inside the VLM call")
        verifier.release.set()
        r = await task
        pipeline.close()
        return r, (time.perf_counter() - t0) * 1000.0

    r, held_ms = asyncio.run(go())
    assert r.reason == EscalationReason.VLM_UNAVAILABLE and 50.0 <= r.timings.vlm_ms <= r.timings.total_ms


def test_decoding_uses_the_bundles_limits_and_draft_mode():
    from catcascade.cnn_stage.preprocessing import DecodeLimits, PreprocessConfig

    tight = PreprocessConfig(image_size=32, limits=DecodeLimits(max_pixels=1000))
    with pytest.raises(InvalidImageError, match="image has 1200 pixels; the limit is 1000"):
        classify(make(FakeVerifier(), preprocess=tight))
    verifier = FakeVerifier()
    # a JPEG is decoded once, at the smallest DCT scale covering the CNN's resize (36 px here):
    # 800x600 -> 1/8 -> 100x75, which the VLM gets as it is (under vlm_image_side)
    classify(make(verifier), image=jpeg_bytes((800, 600), seed=4), mode=EscalationMode.ALWAYS)
    # a PNG has no draft mode: the full image, bounded for the VLM
    classify(make(verifier, vlm_image_side=100), image=jpeg_bytes((400, 200), seed=2, fmt="PNG"),
             mode=EscalationMode.ALWAYS)
    classify(make(verifier, vlm_image_side=100), image=jpeg_bytes((100, 40), seed=2, fmt="PNG"),
             mode=EscalationMode.ALWAYS)
    assert [size for size, _ in verifier.calls] == [(100, 75), (100, 50), (100, 40)]


# --- conformal candidate sets ------------------------------------------------------------
# Calibrated P (sorted): 0.367, 0.246, 0.165, 0.090, 0.082, 0.050. The mass above each rank
# (APS score) is 0, 0.367, 0.613, 0.778, 0.868, 0.950: qhat 0.2 gives a set of 1, 0.5 of 2,
# 0.7 of 3, 0.8 of 4.

def _sets(qhat, **kw):
    from catcascade.ensemble.config import CandidateSetConfig

    return CandidateSetConfig(method="aps", qhat=qhat, **kw)


@pytest.mark.parametrize("qhat,asked", [(0.5, ("Bengal", "Bombay")), (0.7, ("Bengal", "Bombay", "Persian")),
                                        (0.8, ("Bengal", "Bombay", "Persian", "Abyssinian"))])
def test_the_vlm_is_asked_about_the_images_conformal_set(qhat, asked):
    verifier = FakeVerifier()
    r = classify(make(verifier, candidate_sets=_sets(qhat), candidates=3), k=1)
    assert r.escalated and verifier.calls[0][1] == asked and r.vlm.candidates == asked
    assert len(r.labels.labels) == 1 and len(r.cnn.labels) == 1


def test_a_singleton_set_is_answered_by_the_cnn_unless_asked_otherwise():
    verifier = FakeVerifier()
    r = classify(make(verifier, candidate_sets=_sets(0.2)))
    assert not r.escalated and not verifier.calls and r.reason == EscalationReason.CONFIDENT
    assert r.detail == f"the conformal candidate set holds one breed; top1 confidence {P.max():.3f} < 0.600"
    always = classify(make(verifier, candidate_sets=_sets(0.2)), mode=EscalationMode.ALWAYS)
    assert always.escalated and verifier.calls[-1][1] == ("Bengal", "Bombay")  # one option tells the VLM nothing
    kept = classify(make(verifier, candidate_sets=_sets(0.2, skip_singletons=False)))
    assert kept.escalated and kept.reason == EscalationReason.LOW_CONFIDENCE and verifier.calls[-1][1] == (
        "Bengal", "Bombay")


# --- rationales (ClassifyRequest.explain) -------------------------------------------------

def explain(pipeline, mode=EscalationMode.AUTO, deadline=None):
    async def go():
        try:
            return await pipeline.classify(request_for(IMAGE, None, mode, deadline, explain=True))
        finally:
            pipeline.close()

    return asyncio.run(go())


def test_rationale_is_for_the_breed_the_vlm_favours():
    verifier = FakeVerifier(probabilities=(0.1, 0.2, 0.6))
    r = explain(make(verifier, rationale_max_tokens=20), EscalationMode.ALWAYS)
    assert verifier.explained == [("Persian", 20)]
    assert r.rationale.label == "Persian" and r.rationale.text == "it looks like a Persian" and r.rationale_error == ""
    assert r.timings.rationale_ms > 0
    _timings_hold_together(r)


def test_rationale_without_escalation_is_for_the_answers_top1():
    verifier = FakeVerifier()
    r = explain(make(verifier, threshold=0.3))
    assert not r.escalated and not verifier.calls and verifier.explained == [("Bengal", 48)]
    assert r.rationale.label == "Bengal" and r.rationale_error == ""


def test_no_rationale_unless_asked():
    verifier = FakeVerifier()
    r = classify(make(verifier), mode=EscalationMode.ALWAYS)
    assert r.rationale is None and r.rationale_error == "" and not verifier.explained and r.timings.rationale_ms == 0.0


@pytest.mark.parametrize("make_args,mode,why", [
    ({"verifier": FakeVerifier()}, EscalationMode.NEVER,
     "not generated: the client asked for CNN only (escalation NEVER)"),
    ({}, EscalationMode.ALWAYS, "not generated: no VLM stage is configured on this server"),
    ({"verifier": FakeVerifier(), "max_concurrent_rationales": 0}, EscalationMode.ALWAYS,
     "not generated: all 0 rationale slots are in use"),
], ids=["never", "no verifier", "saturated"])
def test_every_reason_for_no_rationale_is_said(make_args, mode, why):
    r = explain(make(**make_args), mode)
    assert r.rationale is None and r.rationale_error == why and r.timings.rationale_ms == 0.0
    if "verifier" in make_args and hasattr(make_args["verifier"], "explained"):
        assert make_args["verifier"].explained == []


def test_no_rationale_while_the_breaker_is_open():
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=60.0), clock=FakeClock())
    verifier = FakeVerifier(error=VlmUnavailableError("down"))
    r = explain(make(verifier, breaker=breaker), EscalationMode.ALWAYS)  # the failed call opens the breaker
    assert r.reason == EscalationReason.VLM_UNAVAILABLE and breaker.state == BreakerState.OPEN
    assert r.rationale is None and r.rationale_error == "not generated: the VLM circuit breaker is not closed"
    assert r.timings.rationale_ms == 0.0
    assert verifier.explained == []


def test_no_rationale_when_the_deadline_is_too_close():
    verifier = FakeVerifier()
    r = explain(make(verifier, vlm_min_budget_ms=60_000.0), EscalationMode.ALWAYS, deadline=time.monotonic() + 30)
    assert r.reason == EscalationReason.DEADLINE and r.rationale is None and not verifier.explained
    assert re.fullmatch(r"not generated: \d+ ms left of the deadline", r.rationale_error), r.rationale_error


def test_rationale_timeout_and_failure_are_said_and_counted():
    verifier, metrics = FakeVerifier(hold_explain=True), ServiceMetrics()
    pipeline = make(verifier, threshold=0.3, vlm_min_budget_ms=200.0, metrics=metrics)
    t0 = time.monotonic()
    r = explain(pipeline, deadline=t0 + 1.0)
    assert r.rationale is None and r.rationale_error == "not generated: the VLM did not answer within the deadline"
    assert time.monotonic() - t0 >= 0.85 and r.timings.rationale_ms >= 850  # the deadline less half the budget
    assert pipeline.inflight_escalations == 0
    from catcascade.vlm_stage.rationale import RationaleError

    failing = make(FakeVerifier(explain_error=RationaleError("the VLM returned no text")), metrics=metrics)
    r = explain(failing, EscalationMode.ALWAYS)
    assert r.rationale is None and r.rationale_error == "not generated: the VLM returned no text"
    assert metrics.vlm_errors.labels("rationale")._value.get() == 1 and failing.inflight_escalations == 0


def _explain_held_60ms(verifier: FakeVerifier):
    """An AUTO classification with explain, the verifier's rationale held open for at least
    60 ms; returns the result and the wall time around the whole call."""
    async def go():
        pipeline = make(verifier, threshold=0.3)
        t0 = time.perf_counter()
        task = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.AUTO, None, True)))
        await until(lambda: verifier.waiting == 1, "the rationale is being written")
        await asyncio.sleep(0.06)
        verifier.release.set()
        r = await task
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        pipeline.close()
        return r, elapsed_ms

    return asyncio.run(go())


def test_rationale_time_is_the_vlm_time_and_the_image_is_sent():
    """rationale_ms is the time the VLM took (held open here for at least 60 ms), never more
    than the wall time around the call; the VLM gets the decoded image."""
    verifier = FakeVerifier(hold_explain=True)
    r, elapsed_ms = _explain_held_60ms(verifier)
    assert r.rationale is not None and 60.0 <= r.timings.rationale_ms <= elapsed_ms
    assert [im.size for im in verifier.explained_images] == [(40, 30)]  # IMAGE, decoded


def test_a_failed_rationale_reports_its_time_a_bounded_message_and_a_warning(caplog):
    from catcascade.vlm_stage.rationale import RationaleError

    verifier = FakeVerifier(hold_explain=True, explain_error=RationaleError("x" * 1000))
    with caplog.at_level("WARNING", logger="catcascade.serving.pipeline"):
        r, elapsed_ms = _explain_held_60ms(verifier)
    assert r.rationale is None and r.rationale_error == ("not generated: " + "x" * 1000)[:300]
    assert 60.0 <= r.timings.rationale_ms <= elapsed_ms
    assert any(rec.getMessage() == "no rationale: " + "x" * 1000 for rec in caplog.records)


def test_no_rationale_when_the_deadline_leaves_less_than_the_vlm_budget_after_the_reply_margin():
    """250 ms left: more than the 200 ms VLM budget, but not once the 100 ms kept to answer are
    taken off."""
    verifier = FakeVerifier()
    pipeline = make(verifier, threshold=0.3, vlm_min_budget_ms=200.0, reply_margin_ms=100.0)
    r = explain(pipeline, deadline=time.monotonic() + 0.25)
    assert r.rationale is None and not verifier.explained and r.timings.rationale_ms == 0.0
    assert re.fullmatch(r"not generated: \d+ ms left of the deadline", r.rationale_error), r.rationale_error


def test_rationales_have_their_own_slots_and_never_take_plain_escalations():
    """Defect pinned (issue 25: 40 explain callers cut plain ALWAYS escalations from 34.5/s to
    2.1/s): with explain callers holding every rationale slot, the next explain gets no
    rationale, and plain ALWAYS escalations still get VLM slots, none shed."""
    async def go():
        verifier = FakeVerifier(hold_explain=True)
        pipeline = make(verifier, threshold=0.3, max_concurrent_escalations=2, max_concurrent_rationales=2)
        explaining = [asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.AUTO, None, True)))
                      for _ in range(2)]
        await until(lambda: verifier.waiting == 2, "both rationale slots are taken")
        assert pipeline.inflight_escalations == 2  # rationales are VLM calls in flight too
        refused = await pipeline.classify(request_for(IMAGE, None, EscalationMode.AUTO, None, True))
        plain = await asyncio.gather(*(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))
                                       for _ in range(2)))
        verifier.release.set()
        done = await asyncio.gather(*explaining)
        pipeline.close()
        return refused, plain, done, pipeline

    refused, plain, done, pipeline = asyncio.run(go())
    assert refused.rationale is None and refused.rationale_error == "not generated: all 2 rationale slots are in use"
    assert all(r.escalated and r.reason == EscalationReason.REQUESTED_ALWAYS for r in plain), [r.reason for r in plain]
    assert all(r.rationale.label == "Bengal" for r in done)
    assert pipeline.inflight_escalations == 0


# --- decode pool, priorities, budgets and queues (the paths admission control added) -------

def test_a_full_decode_queue_refuses_and_a_passed_deadline_skips_the_decode():
    full = make(FakeVerifier(), max_decode_queue=1)
    full.decode_waiting = 1  # one image already waits for a decode thread
    with pytest.raises(QueueFullError, match=r"^decode queue is full \(1 images waiting\)$"):
        classify(full)
    from catcascade.serving.pipeline import DeadlineExceededError

    metrics, cnn = ServiceMetrics(), FakeBatcher()
    pipeline = make(FakeVerifier(), metrics=metrics, cnn=cnn)
    with pytest.raises(DeadlineExceededError, match="the deadline passed while the image waited to be decoded"):
        classify(pipeline, deadline=time.monotonic() - 1.0)
    assert metrics.decodes_skipped.labels("deadline")._value.get() == 1 and pipeline.decodes_started == 0
    assert not cnn.inputs and pipeline.decode_waiting == 0


def test_priority_and_deadline_reach_the_cnn_and_the_vlm():
    from catcascade.serving.traffic.priorities import Priority

    cnn, verifier, done, metrics = FakeBatcher(), FakeVerifier(), [], ServiceMetrics()
    pipeline = make(verifier, cnn=cnn, metrics=metrics)
    deadline = time.monotonic() + 60

    async def go():
        try:
            return await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS, deadline, priority=Priority.BATCH,
                                           on_cnn_done=lambda: done.append(len(cnn.inputs))))
        finally:
            pipeline.close()

    r = asyncio.run(go())
    assert r.escalated and cnn.submitted == [(Priority.BATCH, deadline)] and verifier.priorities == [1]
    assert done == [1]  # called once, after the CNN answered
    assert pipeline.decodes_started == 1 and metrics.decodes_started._value.get() == 1 and pipeline.decode_waiting == 0


def test_a_tenant_over_its_escalation_budget_gets_a_cnn_answer():
    from catcascade.serving.traffic.tenant_budgets import TenantBudgets, TenantBudgetsConfig

    budgets = TenantBudgets(TenantBudgetsConfig(tenants={"t": {"rate_per_s": 0.0, "burst": 1}}), clock=FakeClock())
    verifier = FakeVerifier()
    pipeline = make(verifier, tenant_budgets=budgets)

    def ask(tenant):
        return asyncio.run(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS, tenant=tenant)))

    assert ask("t").escalated  # the one escalation of its burst
    over = ask("t")
    assert not over.escalated and over.reason == EscalationReason.TENANT_BUDGET
    assert over.detail == "tenant 't' has spent its VLM escalation budget" and over.timings.vlm_ms == 0.0
    assert ask("other").escalated and len(verifier.calls) == 2  # others are not limited
    pipeline.close()


def test_a_shed_escalation_gives_its_budget_token_back():
    from catcascade.serving.traffic.tenant_budgets import TenantBudgets, TenantBudgetsConfig

    budgets = TenantBudgets(TenantBudgetsConfig(tenants={"t": {"rate_per_s": 0.0, "burst": 1}}), clock=FakeClock())
    shed = classify(make(FakeVerifier(), tenant_budgets=budgets, max_concurrent_escalations=0),
                    mode=EscalationMode.ALWAYS)
    assert shed.reason == EscalationReason.SHED
    r = asyncio.run(make(FakeVerifier(), tenant_budgets=budgets).classify(
        request_for(IMAGE, None, EscalationMode.ALWAYS, tenant="t")))
    assert r.escalated  # the token is still there


def test_escalations_may_wait_for_a_vlm_slot():
    async def go():
        verifier = FakeVerifier(hold=True)
        pipeline = make(verifier, max_concurrent_escalations=1, escalation_queue_size=1)
        first = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
        await until(lambda: verifier.waiting == 1, "the first escalation holds the slot")
        second = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
        await until(lambda: pipeline.waiting_escalations == 1, "the second waits for the slot")
        third = await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))  # the queue is full: shed
        verifier.release.set()
        out = await asyncio.gather(first, second)
        pipeline.close()
        return out, third, pipeline

    (first, second), third, pipeline = asyncio.run(go())
    assert first.escalated and second.escalated
    assert third.reason == EscalationReason.SHED
    assert third.detail == "VLM saturated (1 calls in flight, 1 waiting); escalation shed"
    assert pipeline.inflight_escalations == 0 and pipeline.waiting_escalations == 0
    assert len(pipeline.verifier.calls) == 2


def test_waiting_for_a_slot_ends_at_the_deadline():
    async def go():
        verifier = FakeVerifier(hold=True)
        pipeline = make(verifier, max_concurrent_escalations=1, escalation_queue_size=4, vlm_min_budget_ms=10.0,
                        reply_margin_ms=10.0)
        first = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
        await until(lambda: verifier.waiting == 1, "the first escalation holds the slot")
        late = await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS, time.monotonic() + 0.5))
        verifier.release.set()
        await first
        pipeline.close()
        return late, pipeline

    late, pipeline = asyncio.run(go())
    assert late.reason == EscalationReason.DEADLINE and late.detail == "the deadline ran out waiting for a VLM slot"
    assert pipeline.waiting_escalations == 0


def test_a_half_open_breaker_lets_one_probe_through_and_says_so_to_the_others():
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=5.0), clock=clock)

    async def go():
        verifier = FakeVerifier(error=VlmUnavailableError("down"))
        pipeline = make(verifier, breaker=breaker)
        await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))  # opens the breaker
        clock.t = 5.0
        verifier.error, verifier.hold = None, True
        probe = asyncio.create_task(pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS)))
        await until(lambda: verifier.waiting == 1, "the probe is under way")
        other = await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))
        verifier.release.set()
        probe = await probe
        pipeline.close()
        return probe, other

    probe, other = asyncio.run(go())
    assert probe.escalated and breaker.state == BreakerState.CLOSED
    assert other.reason == EscalationReason.VLM_UNAVAILABLE
    assert other.detail == "VLM circuit breaker is half-open (a probe is checking the VLM)"


def test_memory_is_trimmed_after_a_slow_decode(monkeypatch):
    import catcascade.serving.pipeline as pipeline_module

    trims = []
    monkeypatch.setattr(pipeline_module, "release_free_memory", lambda: trims.append(1))
    classify(make(FakeVerifier(), trim_after_decode_ms=0.0), mode=EscalationMode.NEVER)
    classify(make(FakeVerifier(), trim_after_decode_ms=60_000.0), mode=EscalationMode.NEVER)
    classify(make(FakeVerifier()), mode=EscalationMode.NEVER)
    assert trims == [1]


# --- tracing: the stage spans the pipeline records -------------------------------------------

def test_stage_spans_follow_the_batchers_timings():
    """decode, cnn_queue, cnn, vlm and blend spans under the request's span; cnn_queue and cnn
    are placed from the batcher's own readings (1.5 ms queue, 2.5 ms model here), back to back."""
    from catcascade.serving.observability.tracing import TracingConfig, make_tracing

    tracing = make_tracing(TracingConfig(exporter="memory"))
    verifier = FakeVerifier()
    pipeline = fake_pipeline(verifier, temperature=T, cnn=FakeBatcher(queue_ms=1.5, compute_ms=2.5, batch_size=3))
    pipeline.tracing = tracing

    async def go():
        with tracing.request_span("catcascade.Classify"):
            return await pipeline.classify(request_for(IMAGE, None, EscalationMode.ALWAYS))

    try:
        r = asyncio.run(go())
    finally:
        pipeline.close()
    spans = {s.name: s for s in tracing.memory_exporter.get_finished_spans()}
    tracing.shutdown()
    assert r.escalated and set(spans) == {"catcascade.Classify", "decode", "cnn_queue", "cnn", "vlm", "blend"}
    root = spans["catcascade.Classify"].context.span_id
    assert all(s.parent.span_id == root for name, s in spans.items() if name != "catcascade.Classify")
    queue, cnn = spans["cnn_queue"], spans["cnn"]
    assert queue.end_time == cnn.start_time
    assert queue.end_time - queue.start_time == 1_500_000 and cnn.end_time - cnn.start_time == 2_500_000
    assert dict(cnn.attributes) == {"catcascade.cnn.batch_size": 3}
    assert cnn.end_time <= spans["vlm"].start_time <= spans["vlm"].end_time <= spans["blend"].start_time
    assert 0.0 <= r.timings.blend_ms <= (spans["blend"].end_time - spans["blend"].start_time) / 1e6 + 0.5
