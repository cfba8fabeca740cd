"""Request priorities: interactive traffic goes ahead of batch traffic wherever work waits.

Three places order by priority: the CNN queue (serving/batcher.py pops the lowest priority
value first), vLLM's scheduler (escalations carry vLLM's ``priority`` field; the server must
run ``--scheduling-policy priority``), and the escalation slots below, which decide who calls
the VLM next when ``limits.max_concurrent_escalations`` calls are already in flight. Within a
priority, arrival order holds. Priority is strict: a steady stream of interactive work can
hold batch work back indefinitely, which is what batch traffic signs up for.
"""
from __future__ import annotations

import asyncio
import enum
import heapq
import itertools


class Priority(enum.IntEnum):
    """Mirrors catcascade.v1.Priority; lower values are served first (as in vLLM)."""

    INTERACTIVE = 0
    BATCH = 1


class PrioritySlots:
    """At most ``capacity`` holders at once; up to ``max_waiting`` more callers wait for a
    slot and get it lowest priority value first, then first come. A released slot passes
    straight to the next waiter, so a newcomer cannot take it from under a queued caller."""

    def __init__(self, capacity: int, max_waiting: int = 0):
        if capacity < 0 or max_waiting < 0:
            raise ValueError(f"capacity and max_waiting must be >= 0, got {capacity} and {max_waiting}")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_use = 0
        self.waiting = 0
        self._heap: list[tuple[int, int, asyncio.Future]] = []
        self._arrivals = itertools.count()

    def try_acquire(self) -> bool:
        """A slot now if one is free and nobody is queued for it."""
        if self.in_use < self.capacity and self.waiting == 0:
            self.in_use += 1
            return True
        return False

    async def acquire(self, priority: int = 0, timeout: float | None = None) -> bool:
        """True once a slot is held (release it with `release`); False when the queue is full
        or ``timeout`` seconds passed first."""
        if self.try_acquire():
            return True
        if self.waiting >= self.max_waiting or (timeout is not None and timeout <= 0):
            return False
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (int(priority), next(self._arrivals), fut))
        self.waiting += 1
        try:
            await asyncio.wait((fut,), timeout=timeout)
        except asyncio.CancelledError:
            if fut.done():  # the slot was handed over just as the caller went away: pass it on
                self.release()
            else:
                fut.cancel()
            raise
        finally:
            self.waiting -= 1
        if fut.done():
            return True
        fut.cancel()
        return False

    def release(self) -> None:
        """Gives the slot to the first waiter still waiting, or frees it."""
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(True)
                return
        self.in_use -= 1
