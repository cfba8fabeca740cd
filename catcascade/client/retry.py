"""When and how long to wait before trying a call again, within the caller's deadline.

Backoff follows gRPC's own retry design (gRFC A6): the n-th retry waits a random time in
[0, min(initial * multiplier**(n-1), max)] (full jitter, so clients that failed together do not
come back together). Only UNAVAILABLE (server down, restarting, unreachable) and
RESOURCE_EXHAUSTED (overloaded) are retried: Classify has no side effects, so a retry is safe,
and every other code would come back the same. A request refused for its size is not retried.
The deadline covers all attempts: each attempt gets what is left of it, and no retry starts
once the wait would run past it.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from catcascade.errors import CatcascadeError

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int | None = 4
    """Calls in all, the first included; None = as many as the deadline allows."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s or self.multiplier < 1:
            raise ValueError(f"need 0 < initial_backoff_s <= max_backoff_s and multiplier >= 1, got {self}")

    @classmethod
    def never(cls) -> "RetryPolicy":
        """One attempt only."""
        return cls(max_attempts=1)

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``retry`` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return (rng or random).uniform(0.0, cap)


def is_retryable(error: grpc.RpcError) -> bool:
    code = error.code()
    if code not in RETRYABLE:
        return False
    # gRPC's own size limit also says RESOURCE_EXHAUSTED; the same bytes would fail again.
    return not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or ""))


class CatcascadeRpcError(CatcascadeError, grpc.RpcError):
    """A call that failed for good: the last attempt's status, with how many attempts were made.
    A ``grpc.RpcError``, so ``code()`` and ``details()`` work as on grpc's own errors."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int, elapsed_s: float):
        super().__init__(f"{code.name}: {details} ({attempts} attempt(s) in {elapsed_s:.2f} s)")
        self._code, self._details = code, details
        self.attempts = attempts
        self.elapsed_s = elapsed_s

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Attempts:
    """The retry loop's bookkeeping, shared by the blocking and the asyncio client:

        attempts = Attempts(policy, timeout_s)
        while True:
            try: return call(timeout=attempts.remaining())
            except grpc.RpcError as e: wait = attempts.after_failure(e)   # raises when done
            sleep(wait)
    """

    def __init__(self, policy: RetryPolicy, timeout_s: float | None, clock=time.monotonic,
                 rng: random.Random | None = None):
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self.started = clock()
        self.deadline = None if timeout_s is None else self.started + timeout_s
        self.made = 0

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (None = no deadline); counts the attempt."""
        self.made += 1
        return None if self.deadline is None else max(0.0, self.deadline - self.clock())

    def after_failure(self, error: grpc.RpcError) -> float:
        """The wait before the next attempt; raises `CatcascadeRpcError` when there is none."""
        now = self.clock()
        give_up = not is_retryable(error) or (self.policy.max_attempts is not None
                                              and self.made >= self.policy.max_attempts)
        wait = 0.0 if give_up else self.policy.backoff_s(self.made, self.rng)
        if not give_up and self.deadline is not None and now + wait >= self.deadline:
            give_up = True
        if give_up:
            details = error.details() or ""
            if self.made > 1:
                details += f" (gave up after {self.made} attempts)"
            raise CatcascadeRpcError(error.code(), details, self.made, now - self.started) from error
        return wait
