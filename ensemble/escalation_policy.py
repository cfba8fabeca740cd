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
    TENANT_BUDGET = 9


@dataclass(frozen=True)
class EscalationDecision:
    escalate: bool
    reason: EscalationReason
    confidence: float
    detail: str


def confidence_scores(probs: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise confidence of (N, C) probabilities; higher means more confident, in [0, 1]."""
    p = np.sort(np.atleast_2d(np.asarray(probs, dtype=np.float64)), axis=-1)[:, ::-1]
    if metric == "top1":
        return p[:, 0].copy()
    if metric == "margin":
        return p[:, 0] - (p[:, 1] if p.shape[1] > 1 else 0.0)
    if metric == "entropy":
        if p.shape[1] < 2:
            return np.ones(len(p))
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        return 1.0 + plogp.sum(axis=1) / np.log(p.shape[1])
    raise ValueError(f"unknown confidence metric {metric!r} (expected top1, margin or entropy)")


def confidence_score(probs: np.ndarray, metric: str) -> float:
    """Higher means more confident, in [0, 1] for every metric."""
    return float(confidence_scores(np.asarray(probs)[None, :], metric)[0])


class EscalationPolicy:
    """Escalates when the confidence score is below the threshold of the CNN's top-1 class."""

    def __init__(self, config: EscalationConfig = EscalationConfig()):
        self.config = config

    def threshold_for(self, predicted_class: int) -> float:
        return self.config.class_thresholds.get(int(predicted_class), self.config.threshold)

    def thresholds(self, probs: np.ndarray) -> np.ndarray:
        """Per row of (N, C) probabilities: the threshold that applies to it."""
        pred = np.atleast_2d(probs).argmax(axis=1)
        thr = np.full(len(pred), self.config.threshold, dtype=np.float64)
        for c, t in self.config.class_thresholds.items():
            thr[pred == c] = t
        return thr

    def escalate_mask(self, probs: np.ndarray) -> np.ndarray:
        """AUTO-mode decisions for (N, C) probabilities at once (offline evaluation)."""
        return confidence_scores(probs, self.config.metric) < self.thresholds(probs)

    def decide(self, probs: np.ndarray, mode: EscalationMode = EscalationMode.AUTO) -> EscalationDecision:
        conf = confidence_score(probs, self.config.metric)
        if mode == EscalationMode.NEVER:
            return EscalationDecision(False, EscalationReason.REQUESTED_NEVER, conf, "client asked for CNN only")
        if mode == EscalationMode.ALWAYS:
            return EscalationDecision(True, EscalationReason.REQUESTED_ALWAYS, conf, "client asked for the VLM")
        name, thr = self.config.metric, self.threshold_for(int(np.argmax(probs)))
        if conf < thr:
            return EscalationDecision(True, EscalationReason.LOW_CONFIDENCE, conf, f"{name} confidence {conf:.3f} < {thr:.3f}")
        return EscalationDecision(False, EscalationReason.CONFIDENT, conf, f"{name} confidence {conf:.3f} >= {thr:.3f}")
