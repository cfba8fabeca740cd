"""A background health probe of the VLM, feeding the circuit breaker.

Escalations bounded by short client deadlines end as "no verdict", so a VLM that accepts
connections and never answers (a hung vLLM) would never be seen by the breaker, and every
escalation would burn its client's whole deadline. The watchdog sends a request of its own
(a tiny image, the real scoring path) with its own timeout, whenever escalations were asked
for and none has succeeded for ``health_period_s``: under healthy traffic it sends nothing.
With no escalation traffic at all it probes only every ``health_idle_period_s`` (so that
health still reads true): each probe is a real inference, and vLLM's CPU worker busy-polls
for a second after every step, so a probe a second kept a whole core busy on an idle server.
A probe that fails or times out opens the breaker at once; in half-open state the watchdog is
the probe (every ``health_period_s``), and its success closes the breaker, so recovery needs
no user request to gamble on the VLM. Its settings are the breaker's (``BreakerConfig``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from catcascade.serving.circuit_breaker import BreakerState, CircuitBreaker

log = logging.getLogger(__name__)


class VlmWatchdog:
    """``check`` is one probe request (e.g. ``VllmVerifier.warm_up`` on a probe client);
    ``on_failure`` (optional) is told the kind of each failed probe (for metrics). The pace
    and timeout come from the breaker's config (``health_*``): ``health_period_s`` is how
    often to check when escalations were asked for and none succeeded within the last period
    (and how often a half-open breaker is probed), ``health_idle_period_s`` (never less than
    the period) how often with no escalation asked for, ``health_timeout_s`` how long a probe
    may take before the VLM counts as hung."""

    def __init__(self, check: Callable[[], Awaitable[object]], breaker: CircuitBreaker,
                 clock: Callable[[], float] = time.monotonic, on_failure: Callable[[str], None] | None = None):
        config = breaker.config
        if config.health_period_s <= 0:
            raise ValueError("breaker.health_period_s is 0: the health probe is off, start no watchdog")
        self.check = check
        self.breaker = breaker
        self.period_s = config.health_period_s
        self.idle_period_s = max(config.health_idle_period_s, config.health_period_s)
        self.timeout_s = config.health_timeout_s
        self._clock = clock
        self._on_failure = on_failure
        self.probes = 0
        self.failures = 0
        self._last_probe: float | None = None

    async def check_once(self) -> bool | None:
        """One round: True/False for a probe that passed/failed, None when none was needed."""
        state = self.breaker.state
        if state == BreakerState.OPEN:
            return None  # cooling down
        now, last = self._clock(), self.breaker.last_success
        if state == BreakerState.CLOSED:
            if last is not None and now - last < self.period_s:
                return None  # traffic has just shown the VLM answering
            if not self._calls_since_last_word() and self._last_probe is not None \
                    and now - self._last_probe < self.idle_period_s:
                return None  # nobody is waiting on the VLM: probe at the idle pace
        lease = self.breaker.acquire(probe=True)
        if lease is None:
            return None  # a request is the probe now
        self.probes += 1
        self._last_probe = now
        try:
            await asyncio.wait_for(self.check(), self.timeout_s)
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

    def _calls_since_last_word(self) -> bool:
        """Whether escalations asked for the VLM after its last success and the last probe."""
        attempt = self.breaker.last_attempt
        if attempt is None:
            return False
        heard = max((t for t in (self.breaker.last_success, self._last_probe) if t is not None), default=None)
        return heard is None or attempt > heard

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.period_s)
