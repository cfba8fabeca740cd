"""Decides, per image, whether the VLM is asked about the CNN's top candidates."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from catcascade.ensemble.config import EscalationConfig, LearnedDeferralParams
from catcascade.ensemble.confidence import confidence_scores as _confidence_scores
from catcascade.ensemble.learned_deferral import predicted_gain


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


def confidence_scores(probs: np.ndarray, metric: str, learned: LearnedDeferralParams | None = None) -> np.ndarray:
    """Row-wise confidence of (N, C) probabilities; higher means more confident, in [0, 1].

    ``learned`` (the fitted rule) is needed for metric ``learned``: (1 - predicted gain) / 2."""
    if metric == "learned":
        if learned is None:
            raise ValueError("metric 'learned' needs the fitted learned deferral rule")
        return (1.0 - predicted_gain(learned, probs)) / 2.0
    return _confidence_scores(probs, metric)


def confidence_score(probs: np.ndarray, metric: str, learned: LearnedDeferralParams | None = None) -> float:
    """Higher means more confident, in [0, 1] for every metric."""
    return float(confidence_scores(np.asarray(probs)[None, :], metric, learned)[0])


class EscalationPolicy:
    """Escalates when the confidence score is below the threshold of the CNN's top-1 class.

    With conformal candidate sets, ``decide`` also takes the image's set size: a set of one
    breed (when the settings say so) is answered by the CNN, whatever the score.
    """

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

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """The policy's confidence score of each row of (N, C) probabilities."""
        return confidence_scores(probs, self.config.metric, self.config.learned)

    def escalate_mask(self, probs: np.ndarray, set_sizes: np.ndarray | None = None,
                      skip_singletons: bool = True) -> np.ndarray:
        """AUTO-mode decisions for (N, C) probabilities at once (offline evaluation); with
        ``set_sizes`` (conformal candidate sets), sets of one are not escalated."""
        esc = self.scores(probs) < self.thresholds(probs)
        if set_sizes is not None and skip_singletons:
            esc &= np.asarray(set_sizes) > 1
        return esc

    def _explain(self, conf: float, thr: float, below: bool) -> str:
        if self.config.metric == "learned":  # say it in the rule's own terms: the predicted gain
            gain, bar = 1.0 - 2.0 * conf, 1.0 - 2.0 * thr
            return f"learned deferral: predicted gain of asking the VLM {gain:+.3f} {'>' if below else '<='} {bar:+.3f}"
        return f"{self.config.metric} confidence {conf:.3f} {'<' if below else '>='} {thr:.3f}"

    def decide(self, probs: np.ndarray, mode: EscalationMode = EscalationMode.AUTO,
               set_size: int | None = None, skip_singletons: bool = True) -> EscalationDecision:
        conf = confidence_score(probs, self.config.metric, self.config.learned)
        if mode == EscalationMode.NEVER:
            return EscalationDecision(False, EscalationReason.REQUESTED_NEVER, conf, "client asked for CNN only")
        if mode == EscalationMode.ALWAYS:
            return EscalationDecision(True, EscalationReason.REQUESTED_ALWAYS, conf, "client asked for the VLM")
        thr = self.threshold_for(int(np.argmax(probs)))
        if conf < thr and set_size == 1 and skip_singletons:
            return EscalationDecision(False, EscalationReason.CONFIDENT, conf,
                                      "the conformal candidate set holds one breed; " + self._explain(conf, thr, True))
        if conf < thr:
            return EscalationDecision(True, EscalationReason.LOW_CONFIDENCE, conf, self._explain(conf, thr, True))
        return EscalationDecision(False, EscalationReason.CONFIDENT, conf, self._explain(conf, thr, False))
