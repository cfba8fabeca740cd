"""A circuit breaker around the VLM: stop calling a failing server, probe it now and then.

closed --(failure_threshold consecutive failures, or trip())--> open --(cooldown_s)--> half_open
half_open --(probe succeeds)--> closed;  half_open --(probe fails or outlives probe_timeout_s)--> open
While open, escalations are answered CNN-only at once instead of waiting on timeouts.

Every call holds a ``BreakerLease`` from ``acquire()`` and releases it in ``finally``: however
the call ends (verdict, an unexpected exception, asyncio cancellation), the half-open probe
slot is given back, so the breaker cannot stay half-open forever. A probe lease that is never
released (a leak) expires after ``probe_timeout_s`` and counts as a failed probe. Verdicts of
leases taken before the breaker last opened are ignored: a straggler that fails late does not
re-open a breaker a probe has since closed, nor does one that succeeds late close it.
"""
from __future__ import annotations

import enum
import time
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class BreakerConfig(BaseModel):
    """ServeConfig's ``breaker`` section: the breaker's thresholds and the pace of the VLM
    health probe that feeds it (serving/traffic/vlm_watchdog.py); both take it as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_threshold: int = Field(3, ge=1, description="consecutive VLM failures that open the breaker")
    cooldown_s: float = Field(5.0, gt=0, description="time open before a half-open probe is let through")
    probe_timeout_s: float = Field(10.0, gt=0, description="a half-open probe not settled within this counts as "
                                   "failed (the breaker re-opens; it never stays half-open)")
    health_period_s: float = Field(1.0, ge=0, description="background VLM health probe (a tiny scoring request) "
                                   "whenever escalations were asked for and none succeeded for this long; 0 = off "
                                   "(then user requests probe a half-open breaker)")
    health_idle_period_s: float = Field(30.0, gt=0, description="the probe's pace when no escalation was asked for "
                                        "(each probe is a real VLM inference); at least health_period_s")
    health_timeout_s: float = Field(3.0, gt=0, description="a health probe not answered within this opens the "
                                    "breaker: a hung VLM is detected whatever the clients' deadlines")


class BreakerLease:
    """One call's permission to go ahead. Report at most one verdict, then ``release()``
    (always, in ``finally``); a lease released without a verdict counts as "no verdict"."""

    __slots__ = ("_breaker", "epoch", "probe", "_settled")

    def __init__(self, breaker: "CircuitBreaker", epoch: int, probe: bool):
        self._breaker = breaker
        self.epoch = epoch
        self.probe = probe
        self._settled = False

    def success(self) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._settle(self, ok=True)

    def failure(self) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._settle(self, ok=False)

    def trip(self) -> None:
        """A failure that opens the breaker at once (a hang seen by the watchdog), unless the
        breaker has moved on since this lease was taken."""
        if not self._settled:
            self._settled = True
            self._breaker._settle(self, ok=False, trip=True)

    def release(self) -> None:
        """No verdict (the client's deadline, cancellation): frees the probe slot, if held."""
        if not self._settled:
            self._settled = True
            self._breaker._settle(self, ok=None)

    def __enter__(self) -> "BreakerLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CircuitBreaker:
    def __init__(self, config: BreakerConfig = BreakerConfig(), clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState], None] | None = None, probe_with_requests: bool = True):
        """``probe_with_requests``: whether user requests may be the half-open probe; False
        when a health watchdog probes (derived from the setup, not a setting)."""
        self.config = config
        self.probe_with_requests = probe_with_requests
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._epoch = 0
        """Bumped each time the breaker opens: leases from older epochs carry no verdict."""
        self._probe: BreakerLease | None = None
        self._probe_started = 0.0
        self.last_success: float | None = None
        """clock() of the last successful call (the watchdog skips its probe when recent)."""
        self.last_attempt: float | None = None
        """clock() of the last call that asked for a lease on its own behalf (``probe=None``),
        granted or not: the watchdog probes fast only when calls came after the last success."""

    @property
    def state(self) -> BreakerState:
        now = self._clock()
        if self._state == BreakerState.OPEN and now - self._opened_at >= self.config.cooldown_s:
            self._set(BreakerState.HALF_OPEN)
        if (self._state == BreakerState.HALF_OPEN and self._probe is not None
                and now - self._probe_started >= self.config.probe_timeout_s):
            self._open()  # the probe timed out by itself: a failed probe
        return self._state

    @property
    def probe_in_flight(self) -> bool:
        return self.state == BreakerState.HALF_OPEN and self._probe is not None

    def acquire(self, probe: bool | None = None) -> BreakerLease | None:
        """A lease when a call may go ahead, else None. In half-open state only one probe at a
        time, and only for callers allowed to probe (``probe``; default: the breaker's
        ``probe_with_requests``)."""
        state = self.state
        if probe is None:
            self.last_attempt = self._clock()
        if state == BreakerState.CLOSED:
            return BreakerLease(self, self._epoch, probe=False)
        may_probe = self.probe_with_requests if probe is None else probe
        if state == BreakerState.HALF_OPEN and self._probe is None and may_probe:
            self._probe = BreakerLease(self, self._epoch, probe=True)
            self._probe_started = self._clock()
            return self._probe
        return None

    def allow(self) -> bool:
        """Compatibility shim: True when a call may go ahead; the caller then reports with
        ``record_success``/``record_failure``/``record_no_verdict``. Prefer ``acquire()``."""
        lease = self.acquire()
        if lease is None:
            return False
        if not lease.probe:
            lease._settled = True  # a closed-state lease holds nothing
        return True

    def record_success(self) -> None:
        self._settle(self._probe or BreakerLease(self, self._epoch, False), ok=True)

    def record_failure(self) -> None:
        self._settle(self._probe or BreakerLease(self, self._epoch, False), ok=False)

    def record_no_verdict(self) -> None:
        """The call ended for reasons unrelated to the VLM (e.g. the client's deadline)."""
        if self._probe is not None:
            self._settle(self._probe, ok=None)

    def trip(self) -> None:
        """Opens now (a hang detected by a watchdog), whatever the failure count."""
        if self._state != BreakerState.OPEN:
            self._open()

    def _settle(self, lease: BreakerLease, ok: bool | None, trip: bool = False) -> None:
        current = lease.epoch == self._epoch
        if lease is self._probe:
            self._probe = None
        elif lease.probe:  # an expired probe: the breaker already counted it as failed
            return
        if ok is None or not current:
            return
        if ok:
            self._failures = 0
            self.last_success = self._clock()
            if self._state != BreakerState.CLOSED and (lease.probe or self._state == BreakerState.HALF_OPEN):
                self._set(BreakerState.CLOSED)
            return
        self._failures += 1
        if trip or lease.probe or self._failures >= self.config.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._epoch += 1
        self._probe = None
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state == self._state:
            return
        self._state = state
        if self._on_change:
            self._on_change(state)
