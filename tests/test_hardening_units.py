"""Unit tests (issue #11, serving core), on fake clocks, of what keeps the service honest
under faults and overload: the breaker's leases (probes that end any way at all), the VLM watchdog, queue-delay admission,
and the pipeline's VLM call (what it calls, the verifier, is a stand-in here; the real vLLM
cases are in test_serving_hardening.py)."""
from __future__ import annotations

import asyncio

import pytest

from catcascade.serving.circuit_breaker import BreakerConfig, BreakerState, CircuitBreaker
from catcascade.serving.traffic.admission import AdmissionConfig, AdmissionController, AdmissionRefused
from catcascade.serving.traffic.vlm_watchdog import VlmWatchdog


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _open_breaker(clock, probe_with_requests: bool = True, **kw) -> CircuitBreaker:
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=5, **kw), clock,
                       probe_with_requests=probe_with_requests)
    with b.acquire() as lease:
        lease.failure()
    assert b.state == BreakerState.OPEN
    return b


# --- breaker leases ---------------------------------------------------------------------------

def test_probe_released_without_verdict_frees_the_probe_slot():
    clock = FakeClock()
    b = _open_breaker(clock)
    clock.t += 5
    probe = b.acquire()
    assert probe is not None and probe.probe and b.acquire() is None  # one probe at a time
    probe.release()  # e.g. cancelled by its client: no verdict, but the slot is free again
    assert b.state == BreakerState.HALF_OPEN
    again = b.acquire()
    assert again is not None and again.probe
    again.success()
    again.release()
    assert b.state == BreakerState.CLOSED


def test_lease_as_context_manager_releases_on_any_exception():
    clock = FakeClock()
    b = _open_breaker(clock)
    clock.t += 5
    with pytest.raises(KeyError):
        with b.acquire():
            raise KeyError("an exception nobody expected")
    assert b.acquire() is not None


def test_probe_that_is_never_released_expires_as_a_failure():
    clock = FakeClock()
    b = _open_breaker(clock, probe_timeout_s=10)
    clock.t += 5
    leaked = b.acquire()
    assert leaked is not None and b.acquire() is None
    clock.t += 9.9
    assert b.state == BreakerState.HALF_OPEN
    clock.t += 0.2
    assert b.state == BreakerState.OPEN  # the probe timed out by itself: a failed probe
    clock.t += 5
    fresh = b.acquire()
    assert fresh is not None and fresh.probe
    leaked.success()  # the leaked probe's late verdict counts for nothing
    assert b.state == BreakerState.HALF_OPEN
    fresh.success()
    assert b.state == BreakerState.CLOSED


def test_stale_leases_from_before_the_breaker_opened_carry_no_verdict():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=2, cooldown_s=5), clock)
    slow_ok, slow_bad, a, c = b.acquire(), b.acquire(), b.acquire(), b.acquire()
    a.failure()
    c.failure()
    assert b.state == BreakerState.OPEN
    slow_ok.success()  # a straggler answering late does not close an open breaker
    assert b.state == BreakerState.OPEN
    clock.t += 5
    probe = b.acquire()
    probe.success()
    assert b.state == BreakerState.CLOSED
    slow_bad.failure()  # nor does a straggler failing late count against the recovered VLM
    with b.acquire() as lease:
        lease.failure()
    assert b.state == BreakerState.CLOSED  # one current failure, threshold 2


def test_requests_do_not_probe_when_a_watchdog_does():
    clock = FakeClock()
    b = _open_breaker(clock, probe_with_requests=False)
    clock.t += 5
    assert b.acquire() is None  # a user request is answered CNN-only
    probe = b.acquire(probe=True)
    assert probe is not None and probe.probe


def test_trip_opens_at_once_and_success_sets_last_success():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=3), clock)
    with b.acquire() as lease:
        lease.success()
    assert b.last_success == clock.t
    with b.acquire() as lease:
        lease.trip()
    assert b.state == BreakerState.OPEN


# --- watchdog ---------------------------------------------------------------------------------

class ScriptedCheck:
    """Stands in for the probe request the watchdog sends: answers, fails or hangs."""

    def __init__(self):
        self.mode = "ok"
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "error":
            raise ConnectionError("refused")


def test_watchdog_opens_on_a_hang_and_closes_after_cooldown():
    async def main():
        clock, check, kinds = FakeClock(), ScriptedCheck(), []
        b = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=5, health_period_s=1, health_timeout_s=0.05),
                           clock, probe_with_requests=False)
        dog = VlmWatchdog(check, b, clock, on_failure=kinds.append)
        assert await dog.check_once() is True and b.state == BreakerState.CLOSED
        check.mode = "hang"
        clock.t += 0.1
        b.acquire().release()  # an escalation that ended without a verdict (its client's deadline)
        assert await dog.check_once() is False
        assert b.state == BreakerState.OPEN and kinds == ["health_timeout"]
        assert await dog.check_once() is None  # cooling down: no probe
        clock.t += 5
        assert b.state == BreakerState.HALF_OPEN and b.acquire() is None  # requests do not probe
        check.mode = "error"
        assert await dog.check_once() is False and b.state == BreakerState.OPEN
        clock.t += 5
        check.mode = "ok"
        assert await dog.check_once() is True and b.state == BreakerState.CLOSED
        assert kinds == ["health_timeout", "health_check"]

    asyncio.run(main())


def test_watchdog_is_quiet_while_traffic_succeeds_and_does_not_reset_failures():
    async def main():
        clock, check = FakeClock(), ScriptedCheck()
        b = CircuitBreaker(BreakerConfig(failure_threshold=2, health_period_s=1, health_timeout_s=1), clock)
        dog = VlmWatchdog(check, b, clock)
        with b.acquire() as lease:
            lease.success()
        assert await dog.check_once() is None and check.calls == 0
        clock.t += 1.5
        with b.acquire() as lease:
            lease.failure()
        assert await dog.check_once() is True and check.calls == 1
        with b.acquire() as lease:  # the passing probe did not wipe the earlier failure
            lease.failure()
        assert b.state == BreakerState.OPEN

    asyncio.run(main())


def test_watchdog_probes_at_the_idle_pace_until_escalations_go_unanswered():
    """Each probe is a real VLM inference: with nobody escalating it probes every
    idle_period_s; as soon as an escalation is asked for and nothing answers within period_s,
    it probes every period_s."""
    async def main():
        clock, check = FakeClock(), ScriptedCheck()
        b = CircuitBreaker(BreakerConfig(health_period_s=1, health_timeout_s=1, health_idle_period_s=30), clock,
                           probe_with_requests=False)
        dog = VlmWatchdog(check, b, clock)
        assert await dog.check_once() is True and check.calls == 1  # the first word on start
        for _ in range(29):
            clock.t += 1
            assert await dog.check_once() is None
        clock.t += 1
        assert await dog.check_once() is True and check.calls == 2  # idle_period_s later
        clock.t += 1
        b.acquire().release()  # an escalation, no verdict
        assert await dog.check_once() is True and check.calls == 3
        clock.t += 1
        assert await dog.check_once() is None  # the probe answered after that call: quiet again
        clock.t += 0.5
        with b.acquire() as lease:
            lease.success()
        clock.t += 2
        assert await dog.check_once() is None and check.calls == 3  # answered escalations
        b.acquire().release()
        clock.t += 1.5  # asked for, nothing answered within period_s
        assert await dog.check_once() is True and check.calls == 4

    asyncio.run(main())


def test_watchdog_idle_pace_is_never_faster_than_its_period():
    """breaker.health_idle_period_s below health_period_s loads (as it always did) and the
    watchdog probes an idle VLM every health_period_s, not faster."""
    async def main():
        clock, check = FakeClock(), ScriptedCheck()
        b = CircuitBreaker(BreakerConfig(health_period_s=5, health_idle_period_s=1), clock, probe_with_requests=False)
        dog = VlmWatchdog(check, b, clock)
        assert await dog.check_once() is True and check.calls == 1
        for _ in range(4):
            clock.t += 1
            assert await dog.check_once() is None
        clock.t += 1
        assert await dog.check_once() is True and check.calls == 2

    asyncio.run(main())


def test_no_watchdog_with_the_health_probe_off():
    with pytest.raises(ValueError, match="health_period_s is 0: the health probe is off"):
        VlmWatchdog(ScriptedCheck(), CircuitBreaker(BreakerConfig(health_period_s=0)))


# --- admission --------------------------------------------------------------------------------

def test_admission_estimates_wait_from_measured_throughput():
    clock = FakeClock()
    adm = AdmissionController(AdmissionConfig(initial_service_ms=20, halflife_s=0.2, safety_factor=1.0,
                                              slack_ms=0), clock)
    assert adm.service_s() == pytest.approx(0.020)
    # 400 requests served at 10 ms each (batches of 4 every 40 ms) while the stage stays busy
    tickets = [adm.admit(None) for _ in range(8)]
    for _ in range(100):
        clock.t += 0.040
        for t in tickets[:4]:
            t.served()
        tickets = tickets[4:] + [adm.admit(None) for _ in range(4)]
    assert adm.service_s() == pytest.approx(0.010, rel=0.02)
    assert adm.pending == 8 and adm.expected_wait_s() == pytest.approx(9 * 0.010, rel=0.02)
    # idle time between requests is not service time
    clock.t += 0.080
    for t in tickets:
        t.served()
    clock.t += 60
    t = adm.admit(None)
    clock.t += 0.010
    t.served()
    assert adm.service_s() == pytest.approx(0.010, rel=0.05)


def test_admission_refuses_what_would_miss_its_deadline_and_admits_the_rest():
    clock = FakeClock()
    adm = AdmissionController(AdmissionConfig(initial_service_ms=10, safety_factor=1.5, slack_ms=30), clock)
    admitted = []
    with pytest.raises(AdmissionRefused) as err:
        while True:  # a burst, all with 1 s deadlines
            admitted.append(adm.admit(clock.t + 1.0))
    # 1.5 * (n + 1) * 10 ms > 970 ms  <=>  n + 1 > 64.7
    assert len(admitted) == 64 and adm.refused == 1
    assert err.value.reason == "deadline" and "overloaded" in str(err.value) and "64 requests ahead" in str(err.value)
    with pytest.raises(AdmissionRefused):
        adm.admit(clock.t + 0.5)
    assert adm.admit(clock.t + 5.0) is not None  # a longer deadline still fits
    for t in admitted[:10]:
        t.release()  # cancelled before service: frees its place, no completion measured
    assert adm.pending == 55 and adm.service_s() == pytest.approx(0.010)


def test_admission_without_deadline_uses_the_queue_wait_limit_and_can_be_disabled():
    clock = FakeClock()
    adm = AdmissionController(AdmissionConfig(initial_service_ms=10, safety_factor=1.0, max_queue_wait_ms=100), clock)
    for _ in range(9):  # the 10th waits (9 + 1) * 10 ms: at the limit, admitted
        adm.admit(None)
    adm.admit(None)
    with pytest.raises(AdmissionRefused) as err:
        adm.admit(None)
    assert err.value.reason == "queue_wait"
    off = AdmissionController(AdmissionConfig(enabled=False, initial_service_ms=10), clock)
    assert all(off.admit(clock.t) for _ in range(1000))


def test_admission_learns_from_late_requests_before_and_after_they_complete():
    clock = FakeClock()
    adm = AdmissionController(AdmissionConfig(initial_service_ms=10, safety_factor=1.0, slack_ms=0, halflife_s=0.5),
                              clock)
    tickets = [adm.admit(None) for _ in range(20)]  # predicted waits 10, 20, ... 200 ms
    assert adm.estimated_wait_s() == pytest.approx(21 * 0.010)
    clock.t += 0.150  # nothing done yet: the oldest (predicted 10 ms) is 140 ms late, so is everyone behind
    assert adm.lateness_s(clock.t) == pytest.approx(0.140)
    assert adm.estimated_wait_s() == pytest.approx(21 * 0.010 + 0.140)
    clock.t += 0.250
    for t in tickets:  # all done after 400 ms: two to four times what was predicted
        t.served()
    assert adm.lateness_s(clock.t) == 0.0
    assert 1.5 < adm.correction <= 4.0
    slowed = adm.estimated_wait_s()
    assert slowed > adm.expected_wait_s() * 1.5
    clock.t += 30.0  # the correction fades once nothing confirms it
    assert adm.estimated_wait_s() == pytest.approx(adm.expected_wait_s(), rel=0.01)


def test_admission_learns_from_requests_abandoned_late_but_not_from_early_cancels():
    """When the CPU drops, the first requests to end are the ones whose deadline passed in the
    queue: their wait counts (before, only completions taught the correction)."""
    clock = FakeClock()
    adm = AdmissionController(AdmissionConfig(initial_service_ms=10, safety_factor=1.0, slack_ms=0), clock)
    tickets = [adm.admit(None) for _ in range(30)]  # predicted waits 10 ... 300 ms
    clock.t += 0.05
    for t in tickets[20:]:  # cancelled early, before their predicted waits (210-300 ms)
        t.release()
    assert adm.correction == 1.0
    clock.t += 0.55  # 600 ms after admission: 2 to 6 times what was predicted, none served
    for t in tickets[10:20]:  # abandoned late (predicted 110-200 ms)
        t.release()
    assert adm.correction > 1.5 and adm.service_s() == pytest.approx(0.010)  # no completion counted
    assert adm.estimated_wait_s() > 1.5 * adm.expected_wait_s()


def test_admission_never_refuses_a_request_with_nothing_ahead():
    """A slow spell can leave the measured cost above a whole deadline; refused requests
    measure nothing, so without this an idle server would refuse everything forever."""
    clock = FakeClock()
    adm = AdmissionController(AdmissionConfig(initial_service_ms=10, safety_factor=1.5, slack_ms=30,
                                              max_queue_wait_ms=100), clock)
    slow = adm.admit(clock.t + 5.0)
    clock.t += 2.0  # one request took 2 s to get through the CNN
    slow.served()
    assert adm.estimated_wait_s() > 1.0 and adm.pending == 0
    first = adm.admit(clock.t + 1.0)  # nothing ahead: admitted although the estimate says 3 s
    with pytest.raises(AdmissionRefused, match="1 requests ahead"):
        adm.admit(clock.t + 1.0)  # behind it: judged by the estimate
    with pytest.raises(AdmissionRefused, match="queue_wait|without a deadline"):
        adm.admit(None)
    clock.t += 0.02
    first.served()  # fast again: the estimate learns from the admitted request
    assert adm.service_s() < 2.0
    with pytest.raises(AdmissionRefused):
        adm.admit(clock.t - 0.001)  # a deadline already gone is refused even with nothing ahead
    assert adm.admit(None) is not None


def test_admission_config_is_validated():
    with pytest.raises(ValueError):
        AdmissionConfig(safety_factor=0.5)
    with pytest.raises(ValueError):
        BreakerConfig(health_timeout_s=0)
    with pytest.raises(ValueError):
        BreakerConfig(probe_timeout_s=0)


# --- the pipeline's VLM call --------------------------------------------------------------------

class StandInVerifier:
    """What the pipeline calls: answers, raises what the pipeline never heard of, or hangs."""

    def __init__(self, mode: str):
        self.mode = mode
        self.started = asyncio.Event()

    async def verify(self, image, candidates, *, priority=0, headers=None):
        from catcascade.vlm_stage.scoring import CandidateScores

        self.started.set()
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "keyerror":
            raise KeyError("choices")
        n = len(candidates)
        return CandidateScores(tuple(candidates), tuple([0.9 / n] * n), 0.1, "stand-in", "multiple_choice")


def _pipeline(verifier, breaker, **settings):
    from tests.fakes import fake_pipeline

    return fake_pipeline(verifier, breaker=breaker, **settings)


def _ask(p, deadline=None):
    from catcascade.cnn_stage.topk import TopK
    from catcascade.ensemble.escalation_policy import EscalationDecision, EscalationReason

    from tests.fakes import request_for

    decision = EscalationDecision(True, EscalationReason.REQUESTED_ALWAYS, 0.5, "")
    return p._ask_vlm(None, TopK((0, 1, 2), ("a", "b", "c"), (0.5, 0.3, 0.2)), decision,
                      request_for(b"", deadline=deadline))


def test_cancelled_probe_escalation_leaves_the_breaker_able_to_recover():
    from catcascade.ensemble.escalation_policy import EscalationReason

    async def main():
        clock = FakeClock()
        b = _open_breaker(clock)
        clock.t += 5
        hung = StandInVerifier("hang")
        p = _pipeline(hung, b)
        task = asyncio.create_task(_ask(p))
        await hung.started.wait()
        assert b.probe_in_flight and p.inflight_escalations == 1
        task.cancel()  # the client went away mid-probe
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not b.probe_in_flight and p.inflight_escalations == 0
        p.verifier = StandInVerifier("ok")
        decision, scores, _ = await _ask(p)
        assert scores is not None and decision.reason == EscalationReason.REQUESTED_ALWAYS
        assert b.state == BreakerState.CLOSED

    asyncio.run(main())


def test_unexpected_verifier_exception_is_a_vlm_failure_not_a_crash():
    from catcascade.ensemble.escalation_policy import EscalationReason

    async def main():
        clock = FakeClock()
        b = _open_breaker(clock)
        clock.t += 5
        p = _pipeline(StandInVerifier("keyerror"), b)
        decision, scores, _ = await _ask(p)
        assert scores is None and decision.reason == EscalationReason.VLM_UNAVAILABLE
        assert "choices" in decision.detail and b.state == BreakerState.OPEN  # the probe failed
        clock.t += 5
        p.verifier = StandInVerifier("ok")
        assert (await _ask(p))[1] is not None and b.state == BreakerState.CLOSED

    asyncio.run(main())


def test_server_budget_counts_against_the_vlm_but_the_clients_deadline_does_not():
    import time

    from catcascade.ensemble.escalation_policy import EscalationReason

    async def main():
        b = CircuitBreaker(BreakerConfig(failure_threshold=2))
        p = _pipeline(StandInVerifier("hang"), b, vlm_call_budget_s=0.05, vlm_min_budget_ms=10, reply_margin_ms=5)
        for _ in range(3):  # client deadlines shorter than the budget: no verdict
            decision, _, _ = await _ask(p, deadline=time.monotonic() + 0.03)
            assert decision.reason == EscalationReason.DEADLINE
        assert b.state == BreakerState.CLOSED
        for _ in range(2):  # no deadline, or a long one: the server's budget is a failure
            decision, _, _ = await _ask(p, deadline=time.monotonic() + 30)
            assert decision.reason == EscalationReason.VLM_UNAVAILABLE and "budget" in decision.detail
        assert b.state == BreakerState.OPEN and p.inflight_escalations == 0
        decision, _, _ = await _ask(p)
        assert decision.reason == EscalationReason.VLM_UNAVAILABLE and "open" in decision.detail

    asyncio.run(main())


# --- compute threads below the event loop -----------------------------------------------------

@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_compute_threads_run_below_the_loop_and_the_loop_does_not():
    import threading

    import numpy as np

    from catcascade.serving.batcher import DynamicBatcher
    from catcascade.serving.engines.thread_priority import build_in_lowered_thread, thread_niceness

    base = thread_niceness()
    seen = {}

    def build():  # e.g. an ONNX Runtime session starting its pool threads
        child = threading.Thread(target=lambda: seen.update(child=thread_niceness()))
        child.start()
        child.join()
        return thread_niceness()

    assert build_in_lowered_thread(build, 3) == min(19, base + 3)
    assert seen["child"] == min(19, base + 3)  # threads started there inherit it
    assert thread_niceness() == base  # the caller (the event loop's thread) is untouched

    def run_batch(x):
        seen["batch"] = thread_niceness()
        return x

    async def main():
        b = DynamicBatcher(run_batch, thread_nice=2)
        await b.start()
        try:
            await b.submit(np.zeros(2))
        finally:
            await b.stop()

    asyncio.run(main())
    assert seen["batch"] == min(19, base + 2) and thread_niceness() == base


def test_batcher_sheds_what_can_no_longer_meet_its_deadline():
    import time

    import numpy as np

    from catcascade.serving.batcher import BatchingConfig, DeadlineUnmeetableError, DynamicBatcher, QueueFullError

    def slow(x):
        time.sleep(0.05)
        return x

    async def main():
        b = DynamicBatcher(slow, BatchingConfig(max_batch_size=1, instances=1))
        await b.start()
        try:
            await b.submit(np.zeros(1))  # a batch takes about 50 ms: the batcher learns it
            assert b.batch_s >= 0.04
            ok = await b.submit(np.ones(1), deadline=time.monotonic() + 5.0)
            assert ok.output[0] == 1.0
            with pytest.raises(DeadlineUnmeetableError, match="shed from the CNN queue") as err:
                await b.submit(np.ones(1), deadline=time.monotonic() + 0.02)  # less than a batch takes
            assert isinstance(err.value, QueueFullError) and b.shed == 1  # answered RESOURCE_EXHAUSTED
        finally:
            await b.stop()

    asyncio.run(main())
