"""Decides, per image, whether the VLM is asked about the CNN's top candidates."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from ensemble.config import EscalationConfig


class EscalationMode(enum.IntEnum):
    """Mirrors catcascade.v1.EscalationMode."""

    AUTO = 0
    NEVER = 1
    ALWAYS = 2


class EscalationReason(enum.IntEnum):
    """Mirrors catcascade.v1.EscalationReason."""

    UNSPECIFIED = 0
    CONFIDENT = 1
    LOW_CONFIDENCE = 2
    REQUESTED_ALWAYS = 3
    REQUESTED_NEVER = 4
    VLM_UNAVAILABLE = 5
    DEADLINE = 6
    SHED = 7
    VLM_DISABLED = 8


@dataclass(frozen=True)
class EscalationDecision:
    escalate: bool
    reason: EscalationReason
    confidence: float
    detail: str


def confidence_score(probs: np.ndarray, metric: str) -> float:
    """Higher means more confident, in [0, 1] for every metric."""
    p = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if metric == "top1":
        return float(p[0])
    if metric == "margin":
        return float(p[0] - (p[1] if len(p) > 1 else 0.0))
    if metric == "entropy":
        q = p[p > 0]
        return float(1.0 + (q * np.log(q)).sum() / np.log(len(p))) if len(p) > 1 else 1.0
    raise ValueError(f"unknown confidence metric {metric!r}")


class EscalationPolicy:
    def __init__(self, config: EscalationConfig = EscalationConfig()):
        self.config = config

    def decide(self, probs: np.ndarray, mode: EscalationMode = EscalationMode.AUTO) -> EscalationDecision:
        conf = confidence_score(probs, self.config.metric)
        if mode == EscalationMode.NEVER:
            return EscalationDecision(False, EscalationReason.REQUESTED_NEVER, conf, "client asked for CNN only")
        if mode == EscalationMode.ALWAYS:
            return EscalationDecision(True, EscalationReason.REQUESTED_ALWAYS, conf, "client asked for the VLM")
        name, thr = self.config.metric, self.config.threshold
        if conf < thr:
            return EscalationDecision(True, EscalationReason.LOW_CONFIDENCE, conf, f"{name} confidence {conf:.3f} < {thr:.3f}")
        return EscalationDecision(False, EscalationReason.CONFIDENT, conf, f"{name} confidence {conf:.3f} >= {thr:.3f}")
