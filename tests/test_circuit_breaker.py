"""The VLM circuit breaker on a fake clock: one verdict per lease, trips, and the
record_*/allow() shims for callers that predate leases."""
from __future__ import annotations

import pytest

from catcascade.serving.circuit_breaker import BreakerConfig, BreakerState, CircuitBreaker
from tests.fakes import FakeClock


def test_a_lease_gives_one_verdict():
    b = CircuitBreaker(BreakerConfig(failure_threshold=1), FakeClock())
    lease = b.acquire()
    lease.success()
    lease.failure()  # too late: the lease has spoken
    lease.release()
    assert b.state == BreakerState.CLOSED
    lease = b.acquire()
    lease.release()  # no verdict...
    lease.failure()  # ...and none after it
    assert b.state == BreakerState.CLOSED
    b.acquire().failure()
    assert b.state == BreakerState.OPEN


def test_trip_opens_a_closed_breaker_and_does_not_restart_an_open_ones_cooldown():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=5, cooldown_s=5.0), clock)
    b.trip()
    assert b.state == BreakerState.OPEN
    clock.t = 3.0
    b.trip()  # already open: the cooldown still ends at 5
    clock.t = 5.0
    assert b.state == BreakerState.HALF_OPEN


def test_the_record_shims_reset_and_count_failures_like_leases():
    clock = FakeClock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=5.0), clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # resets the count: two more failures do not open it
    for _ in range(2):
        b.record_failure()
    assert b.state == BreakerState.CLOSED
    b.record_failure()
    assert b.state == BreakerState.OPEN and not b.allow()
    clock.t = 5.0
    assert b.allow() and not b.allow()  # one probe while half-open
    b.record_no_verdict()  # the probe ended without a verdict: the slot is free again
    assert b.allow()
    b.record_success()
    assert b.state == BreakerState.CLOSED and b.last_success == 5.0


@pytest.mark.parametrize("field,value", [("failure_threshold", 0), ("cooldown_s", 0.0), ("probe_timeout_s", 0.0),
                                         ("health_period_s", -1.0), ("health_idle_period_s", 0.0),
                                         ("health_timeout_s", 0.0)])
def test_breaker_config_is_validated(field, value):
    with pytest.raises(ValueError, match=rf"^1 validation error for BreakerConfig\n{field}\n"):
        BreakerConfig(**{field: value})


def test_a_failed_lease_counts_once_however_often_it_is_reported():
    b = CircuitBreaker(BreakerConfig(failure_threshold=2), FakeClock())
    lease = b.acquire()
    lease.failure()
    lease.failure()
    lease.trip()  # after its verdict a lease can no longer trip the breaker either
    assert b.state == BreakerState.CLOSED
    b.acquire().failure()
    assert b.state == BreakerState.OPEN


def test_state_changes_are_reported_once_and_only_when_they_happen():
    clock, changes = FakeClock(), []
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=5.0), clock, on_change=changes.append)
    with b.acquire() as lease:
        lease.success()  # closed stays closed: nothing to report
    assert changes == []
    b.acquire().failure()
    clock.t += 5
    assert b.state == BreakerState.HALF_OPEN
    b.record_success()  # the shim's success in half-open state closes it
    assert b.state == BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_probe_timeout_below_a_second_is_valid():
    assert BreakerConfig(probe_timeout_s=0.5).probe_timeout_s == 0.5
