"""Queue-delay admission: refuse at once what the queue cannot serve before its deadline.

A burst should turn into fast RESOURCE_EXHAUSTED refusals, not into requests that wait in a
queue until their deadline passes. Like Triton's queue policy (reject what would time out in
the queue) and CoDel (judge a queue by the delay it causes, not by its length), the controller
estimates how long a new request would take to get through decode and the CNN, and refuses it
when ``now + estimate + slack + loop lag`` is past its deadline (or, without a deadline, when
the estimate exceeds ``max_queue_wait_ms``). Deciding costs microseconds.

The estimate is ``safety_factor * correction * (requests ahead + 1) * cost + lateness``:

- cost per request is measured, not configured: busy time (while an admitted request is in
  the stage) over completions, decayed with a half-life in busy seconds, i.e. 1 / the
  throughput the server achieves now (batching, contention, the VLM's CPU use included);
- a burst leaves less throughput than was measured before it (taking in and refusing the
  excess costs CPU too), which an average learns only as late requests complete, so:
  ``correction`` is a moving average (1 to 4, fading back to 1) of actual over predicted
  waits of requests that queued (predictions of 100 ms or more; a request abandoned after its
  predicted wait counts with the time it waited, a lower bound), and ``lateness`` is how far
  the oldest waiting request already is past its prediction (everyone behind it is at least
  that late), known before anything completes;
- the event loop's lag (how late a 20 ms timer fires, a decayed maximum) is added to the
  slack: every answer needs the loop to be sent.

A request with nothing ahead of it is admitted whatever the estimate (unless its deadline is
already gone): an idle stage causes no queueing delay, and refused requests teach the estimate
nothing, so an estimate left high by a slow spell (a frozen VLM's timeouts, a CPU-heavy
neighbour) would otherwise refuse everything forever on an idle server.

What the estimate still misses, the CNN batcher catches: it sheds a request whose deadline
can no longer be met when its turn comes. The VLM stage needs no admission: it bounds itself
by the remaining deadline.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from catcascade.errors import CatcascadeError


class AdmissionConfig(BaseModel):
    """ServeConfig's ``admission`` section, taken by the controller as it is: refuse with
    RESOURCE_EXHAUSTED at once when the estimated queue wait would miss the deadline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    safety_factor: float = Field(1.5, ge=1.0, description="multiplies the estimated wait (the service rate can "
                                 "drop while a request waits)")
    slack_ms: float = Field(30.0, ge=0, description="time kept for what follows the CNN (answer, jitter)")
    max_queue_wait_ms: float = Field(10_000.0, gt=0, description="longest estimated wait admitted for requests "
                                     "without a deadline")
    initial_service_ms: float = Field(20.0, gt=0, description="cost per request assumed before any is measured "
                                      "(a prior worth one completion)")
    halflife_s: float = Field(0.5, gt=0, description="how fast the measured cost per request adapts, in "
                              "seconds of busy time")


class AdmissionRefused(CatcascadeError):
    """The request cannot be served in time: answer RESOURCE_EXHAUSTED with this message."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class AdmissionTicket:
    """An admitted request's place in the stage: ``served()`` when the CNN answered it,
    ``release()`` always (in ``finally``); release without service is not a completion."""

    __slots__ = ("_controller", "_done", "admitted_at", "predicted_s")

    def __init__(self, controller: "AdmissionController", admitted_at: float, predicted_s: float):
        self._controller = controller
        self._done = False
        self.admitted_at = admitted_at
        self.predicted_s = predicted_s
        """The wait predicted at admission (before the safety factor)."""

    def served(self) -> None:
        if not self._done:
            self._done = True
            self._controller._depart(self, served=True)

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._controller._depart(self, served=False)


class AdmissionController:
    def __init__(self, config: AdmissionConfig = AdmissionConfig(), clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._busy_s = config.initial_service_ms / 1000.0
        self._completions = 1.0
        self._busy_since_last = 0.0
        self._mark = clock()
        self.pending = 0
        """Admitted requests that have not got through the CNN yet."""
        self.refused = 0
        self.loop_lag_s = 0.0
        """Recent event-loop lag (decayed maximum), from ``watch_loop_lag``."""
        self._lag_mark = clock()
        self.correction = 1.0
        """Recent actual / predicted wait of requests that queued (moving average, 1 to 4)."""
        self._correction_mark = clock()
        self._waiting: dict[int, AdmissionTicket] = {}
        """Tickets not yet served, oldest first (dicts keep insertion order)."""

    def service_s(self) -> float:
        """Recent wall time per completed request while the stage was busy (1 / throughput)."""
        return self._busy_s / self._completions

    def expected_wait_s(self) -> float:
        """How long a request admitted now would take to get through the CNN (uncorrected)."""
        return (self.pending + 1) * self.service_s()

    def _correction_now(self, now: float) -> float:
        decay = 0.5 ** ((now - self._correction_mark) / (4 * self.config.halflife_s))
        return 1.0 + (self.correction - 1.0) * decay

    def lateness_s(self, now: float) -> float:
        """How far the oldest waiting request is past its (corrected) predicted wait."""
        head = next(iter(self._waiting.values()), None)
        if head is None:
            return 0.0
        return max(0.0, now - head.admitted_at - head.predicted_s * self._correction_now(now))

    def estimated_wait_s(self, now: float | None = None) -> float:
        """What admission compares with the time left: the corrected estimate, safety
        factor and lateness included."""
        now = self._clock() if now is None else now
        return (self.config.safety_factor * self._correction_now(now) * self.expected_wait_s()
                + self.lateness_s(now))

    def observe_loop_lag(self, lag_s: float) -> None:
        now = self._clock()
        decay = 0.5 ** ((now - self._lag_mark) / self.config.halflife_s)
        self._lag_mark = now
        self.loop_lag_s = max(lag_s, self.loop_lag_s * decay)

    async def watch_loop_lag(self, period_s: float = 0.02) -> None:
        """Measures how late the event loop runs a timer, forever (run it as a task)."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(period_s)
            self.observe_loop_lag(max(0.0, time.monotonic() - t - period_s))

    def admit(self, deadline: float | None) -> AdmissionTicket:
        """A ticket, or AdmissionRefused when the estimated wait would miss ``deadline`` (a
        ``clock()`` instant) or, without one, exceed ``max_queue_wait_ms``."""
        now = self._clock()
        if self.config.enabled:
            wait_s = self.estimated_wait_s(now)
            if deadline is not None:
                left_s = deadline - now - self.config.slack_ms / 1000.0 - self.loop_lag_s
                if wait_s > left_s and (self.pending > 0 or deadline <= now):
                    self.refused += 1
                    raise AdmissionRefused(
                        f"server overloaded: {self.pending} requests ahead, an estimated {wait_s * 1000.0:.0f} ms wait "
                        f"would miss the deadline ({(deadline - now) * 1000.0:.0f} ms left); retry later or "
                        "elsewhere", "deadline")
            elif wait_s * 1000.0 > self.config.max_queue_wait_ms and self.pending > 0:
                self.refused += 1
                raise AdmissionRefused(
                    f"server overloaded: {self.pending} requests ahead, an estimated {wait_s * 1000.0:.0f} ms wait "
                    f"exceeds the {self.config.max_queue_wait_ms:.0f} ms limit for requests without a deadline",
                    "queue_wait")
        ticket = AdmissionTicket(self, now, self.expected_wait_s())
        self._advance()
        self.pending += 1
        self._waiting[id(ticket)] = ticket
        return ticket

    def _advance(self) -> None:
        now = self._clock()
        if self.pending > 0:
            self._busy_since_last += now - self._mark
        self._mark = now

    def _depart(self, ticket: AdmissionTicket, served: bool) -> None:
        self._advance()
        self.pending -= 1
        self._waiting.pop(id(ticket), None)
        if ticket.predicted_s >= 0.1:  # shorter predictions are mostly fixed overhead
            now = self._clock()
            ratio = (now - ticket.admitted_at) / ticket.predicted_s
            # A request given up before service (its deadline passed while it queued) says the
            # wait was at least this long: the first news of a slowdown, long before the slow
            # requests complete. One cancelled early says nothing about the wait.
            if served or ratio > 1.0:
                self.correction = 0.8 * self._correction_now(now) + 0.2 * min(4.0, max(1.0, ratio))
                self._correction_mark = now
        if served:
            decay = 0.5 ** (self._busy_since_last / self.config.halflife_s)
            self._busy_s = self._busy_s * decay + self._busy_since_last
            self._completions = self._completions * decay + 1.0
            self._busy_since_last = 0.0

