"""Unit tests of the client library's pure parts: retry pacing within a deadline, request
building, typed results. The client against real servers: tests/test_integration_features.py."""
from __future__ import annotations

import random

import grpc
import pytest

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.client import ClassifyResult, EscalationReason, Priority, RetryPolicy, classify_request
from catcascade.client.retry import Attempts, CatcascadeRpcError, is_retryable


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "boom"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_backoff_is_jittered_below_an_exponential_cap():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    rng = random.Random(0)
    for retry, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        waits = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert 0.0 <= min(waits) and max(waits) <= cap and max(waits) > 0.8 * cap
        assert len(set(waits)) == 200  # jittered: no two clients in step
    with pytest.raises(ValueError):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_only_unavailable_and_resource_exhausted_are_retried():
    assert is_retryable(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    assert is_retryable(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded: 512 in flight"))
    assert not is_retryable(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"))
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED,
                 grpc.StatusCode.INTERNAL):
        assert not is_retryable(FakeRpcError(code))


def test_attempts_stop_at_max_attempts():
    clock = FakeClock()
    attempts = Attempts(RetryPolicy(max_attempts=3), timeout_s=None, clock=clock, rng=random.Random(0))
    waits = []
    with pytest.raises(CatcascadeRpcError) as err:
        while True:
            assert attempts.remaining() is None
            waits.append(attempts.after_failure(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")))
    assert len(waits) == 2 and err.value.attempts == 3
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "gave up after 3 attempts" in err.value.details()
    assert isinstance(err.value, grpc.RpcError)


def test_attempts_give_each_call_what_is_left_and_stop_before_the_deadline():
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=None, initial_backoff_s=0.5, max_backoff_s=0.5)
    attempts = Attempts(policy, timeout_s=3.0, clock=clock, rng=random.Random(1))
    remaining = []
    with pytest.raises(CatcascadeRpcError) as err:
        while True:
            remaining.append(attempts.remaining())
            clock.t += 0.2  # each failed call takes 0.2 s
            clock.t += attempts.after_failure(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    assert remaining[0] == 3.0 and remaining == sorted(remaining, reverse=True)
    assert clock.t <= 103.0 and err.value.elapsed_s > 3.0 - 0.5 - 0.2  # gave up within a backoff of the deadline
    assert err.value.attempts == len(remaining) > 3


def test_non_retryable_errors_end_at_once():
    attempts = Attempts(RetryPolicy(), timeout_s=10, clock=FakeClock())
    attempts.remaining()
    with pytest.raises(CatcascadeRpcError) as err:
        attempts.after_failure(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "not a decodable image"))
    assert err.value.attempts == 1 and err.value.details() == "not a decodable image"


def test_classify_request_names_and_errors(tmp_path):
    path = tmp_path / "cat.jpg"
    path.write_bytes(b"\xff\xd8jpeg")
    req = classify_request(path, top_k=5, mode="always", request_id="r1", priority="batch", model_version="v2")
    assert (req.image, req.top_k, req.escalation, req.priority, req.request_id, req.model_version) == \
        (b"\xff\xd8jpeg", 5, pb.ESCALATION_MODE_ALWAYS, pb.PRIORITY_BATCH, "r1", "v2")
    assert classify_request(b"x").model_version == ""
    assert classify_request(b"x", mode=pb.ESCALATION_MODE_NEVER, priority=Priority.INTERACTIVE).escalation == 1
    with pytest.raises(ValueError, match="auto, never, always"):
        classify_request(b"x", mode="sometimes")
    with pytest.raises(ValueError, match="interactive, batch"):
        classify_request(b"x", priority="urgent")
    with pytest.raises(FileNotFoundError):
        classify_request(tmp_path / "missing.jpg")


def test_typed_result_from_proto_keeps_the_raw_message():
    raw = pb.ClassifyResponse(
        request_id="r", labels=[pb.LabelScore(label="Bengal", probability=0.7)],
        cnn_top_k=[pb.LabelScore(label="Bengal", probability=0.6)], escalated=True,
        escalation_reason=pb.ESCALATION_REASON_LOW_CONFIDENCE, cached=True,
        vlm=pb.VlmScores(candidates=[pb.LabelScore(label="Bengal", probability=0.9)], none_probability=0.1,
                         model="cats", scoring_mode="multiple_choice"),
        timings=pb.StageTimings(total_ms=4.5, cnn_batch_size=2), versions=pb.ModelVersions(bundle="b:1"))
    r = ClassifyResult.from_proto(raw, attempts=2)
    assert r.top.label == "Bengal" and r.top.probability == pytest.approx(0.7)
    assert r.escalation_reason is EscalationReason.LOW_CONFIDENCE and r.escalation_reason == 2
    assert r.vlm.candidates[0].probability == pytest.approx(0.9) and r.vlm.model == "cats"
    assert r.cached and r.attempts == 2 and r.timings.cnn_batch_size == 2 and r.versions.bundle == "b:1"
    assert r.raw is raw
    assert ClassifyResult.from_proto(pb.ClassifyResponse()).vlm is None
    with pytest.raises(AttributeError):
        r.cached = False  # frozen
