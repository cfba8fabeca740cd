"""Live against candidate, in numbers: what a user reads before promoting.

A window opens when a live/candidate pair is set and collects, per side, request counts,
errors, escalations and latencies; in shadow mode each shadowed request is answered by both,
so the top-1 labels can be compared pairwise.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrafficStats:
    version: str = ""
    requests: int = 0
    errors: int = 0
    escalated: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def record(self, latency_ms: float, escalated: bool) -> None:
        self.requests += 1
        self.escalated += int(escalated)
        self.latencies_ms.append(latency_ms)

    def record_error(self) -> None:
        self.requests += 1
        self.errors += 1

    def summary(self) -> dict:
        answered = self.requests - self.errors
        lat = np.asarray(self.latencies_ms, dtype=float)
        return {"version": self.version, "requests": self.requests, "errors": self.errors,
                "escalation_rate": self.escalated / answered if answered else 0.0,
                "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else 0.0,
                "latency_p95_ms": float(np.percentile(lat, 95)) if lat.size else 0.0}


class AgreementWindow:
    """Counts for one live/candidate pair since it was set."""

    def __init__(self, live: str, candidate: str | None, clock=time.monotonic):
        self.clock = clock
        self.opened = clock()
        self.live = TrafficStats(live)
        self.candidate = TrafficStats(candidate or "")
        self.compared = 0
        self.agreed = 0
        self.shadow_dropped = 0

    def compare(self, live_top1: str, candidate_top1: str) -> bool:
        agree = live_top1 == candidate_top1
        self.compared += 1
        self.agreed += int(agree)
        return agree

    @property
    def top1_agreement(self) -> float:
        return self.agreed / self.compared if self.compared else 0.0

    def report(self) -> dict:
        return {"live": self.live.summary(), "candidate": self.candidate.summary(), "compared": self.compared,
                "top1_agreement": self.top1_agreement, "shadow_dropped": self.shadow_dropped,
                "window_s": self.clock() - self.opened}
