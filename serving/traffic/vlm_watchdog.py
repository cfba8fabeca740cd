"""A background health probe of the VLM, feeding the circuit breaker.

Escalations bounded by short client deadlines end as "no verdict", so a VLM that accepts
connections and never answers (a hung vLLM) would never be seen by the breaker, and every
escalation would burn its client's whole deadline. The watchdog sends a request of its own
(a tiny image, the real scoring path) with its own timeout, whenever no escalation has
succeeded for ``period_s``: under healthy traffic it sends nothing. A probe that fails or
times out opens the breaker at once; in half-open state the watchdog is the probe, and its
success closes the breaker, so recovery needs no user request to gamble on the VLM.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from serving.circuit_breaker import BreakerState, CircuitBreaker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchdogConfig:
    period_s: float = 1.0
    """How often to check when no escalation succeeded within the last period."""
    timeout_s: float = 3.0
    """A probe request not answered within this means the VLM hangs."""

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"invalid watchdog config {self}")


class VlmWatchdog:
    """``check`` is one probe request (e.g. ``VllmVerifier.warm_up`` on a probe client);
    ``on_failure`` (optional) is told the kind of each failed probe (for metrics)."""

    def __init__(self, check: Callable[[], Awaitable[object]], breaker: CircuitBreaker,
                 config: WatchdogConfig = WatchdogConfig(), clock: Callable[[], float] = time.monotonic,
                 on_failure: Callable[[str], None] | None = None):
        self.check = check
        self.breaker = breaker
        self.config = config
        self._clock = clock
        self._on_failure = on_failure
        self.probes = 0
        self.failures = 0

    async def check_once(self) -> bool | None:
        """One round: True/False for a probe that passed/failed, None when none was needed."""
        state = self.breaker.state
        if state == BreakerState.OPEN:
            return None  # cooling down
        last = self.breaker.last_success
        if state == BreakerState.CLOSED and last is not None and self._clock() - last < self.config.period_s:
            return None  # traffic has just shown the VLM answering
        lease = self.breaker.acquire(probe=True)
        if lease is None:
            return None  # a request is the probe now
        self.probes += 1
        try:
            await asyncio.wait_for(self.check(), self.config.timeout_s)
        except Exception as e:  # a timeout, a transport error, a bad answer: the VLM is not serving
            self.failures += 1
            kind = "health_timeout" if isinstance(e, asyncio.TimeoutError) else "health_check"
            if self._on_failure:
                self._on_failure(kind)
            log.warning("VLM health probe failed (%s), VLM circuit breaker opens: %s", kind, str(e) or type(e).__name__)
            lease.trip()
            return False
        else:
            if lease.probe:
                lease.success()  # closes a half-open breaker
            # In closed state a passing probe carries no verdict: it must not wipe out the
            # failures real escalations have counted.
            return True
        finally:
            lease.release()

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.config.period_s)
