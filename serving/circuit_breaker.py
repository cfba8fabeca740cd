"""A circuit breaker around the VLM: stop calling a failing server, probe it now and then.

closed --(failure_threshold consecutive failures)--> open --(cooldown_s)--> half_open
half_open --(probe succeeds)--> closed;  half_open --(probe fails)--> open
While open, escalations are answered CNN-only at once instead of waiting on timeouts.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    cooldown_s: float = 5.0


class CircuitBreaker:
    def __init__(self, config: BreakerConfig = BreakerConfig(), clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState], None] | None = None):
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state == BreakerState.OPEN and self._clock() - self._opened_at >= self.config.cooldown_s:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """True when a call may go ahead; in half-open state only one probe at a time."""
        state = self.state
        if state == BreakerState.CLOSED:
            return True
        if state == BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        if self._state != BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._failures += 1
        was_probe, self._probe_in_flight = self._probe_in_flight, False
        if was_probe or self._failures >= self.config.failure_threshold:
            self._opened_at = self._clock()
            if self._state != BreakerState.OPEN:
                self._set(BreakerState.OPEN)

    def record_no_verdict(self) -> None:
        """The call ended for reasons unrelated to the VLM (e.g. the client's deadline)."""
        self._probe_in_flight = False

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change:
            self._on_change(state)
