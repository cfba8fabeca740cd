"""Fits the escalation thresholds on validation scores, to a budget of VLM calls.

Two objectives:

* ``rate``: the threshold whose validation escalation rate equals the budget (e.g. 0.2 = the
  VLM sees 20% of requests). The threshold is a quantile of the confidence scores, so the
  rate carries over to new data from the same distribution.
* ``balanced_accuracy``: among rates from 0 to the budget, the one whose cascade has the best
  validation balanced accuracy (needs labels and the escalated predictions, i.e. a validation
  set where the VLM ran on every image).

With ``minority_boost`` > 1, images whose CNN top-1 is a minority class (support below the
median in the validation labels) escalate at ``boost`` times the rate of the others, through
per-class thresholds; the overall rate still meets the budget.

With ``metric="learned"`` the score is the fitted learned deferral rule's (1 - predicted gain) / 2
(``learned`` holds the rule, ensemble/learned_deferral.py). With ``eligible`` (conformal
candidate sets: images whose set holds more than one breed), only eligible images can escalate
and the budget counts only them.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from catcascade.ensemble.config import EscalationConfig, LearnedDeferralParams
from catcascade.ensemble.escalation_policy import confidence_scores
from catcascade.ensemble.metrics import balanced_accuracy, minority_classes

Objective = Literal["rate", "balanced_accuracy"]


def threshold_for_rate(conf: np.ndarray, rate: float) -> float:
    """A threshold t with mean(conf < t) as close to ``rate`` as the data allows (midpoint between
    neighbouring scores, so the rate transfers to held-out data without bias)."""
    v = np.sort(np.asarray(conf, dtype=np.float64))
    m = int(round(rate * len(v)))
    if m <= 0 or len(v) == 0:
        return 0.0
    if m >= len(v):
        return 1.0
    return float(np.clip((v[m - 1] + v[m]) / 2.0, 0.0, 1.0))


def _thresholds(conf: np.ndarray, pred: np.ndarray, rate: float, minority: np.ndarray, boost: float
                ) -> tuple[float, dict[int, float]]:
    """Global threshold + per-minority-class thresholds reaching ``rate`` overall."""
    is_min = np.isin(pred, minority)
    if len(minority) == 0 or boost == 1.0 or not is_min.any():
        return threshold_for_rate(conf, rate), {}

    def assign(base: float) -> tuple[float, dict[int, float]]:
        per_class = {int(c): threshold_for_rate(conf[pred == c], min(1.0, boost * base))
                     for c in minority if (pred == c).any()}
        return threshold_for_rate(conf[~is_min], base) if (~is_min).any() else 0.0, per_class

    def overall(base: float) -> float:
        glob, per_class = assign(base)
        thr = np.full(len(conf), glob)
        for c, t in per_class.items():
            thr[pred == c] = t
        return float((conf < thr).mean())

    lo, hi = 0.0, rate
    for _ in range(40):  # the overall rate grows with the base rate: bisect
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if overall(mid) < rate else (lo, mid)
    return assign(lo if abs(overall(lo) - rate) <= abs(overall(hi) - rate) else hi)


def _mask(conf: np.ndarray, pred: np.ndarray, glob: float, per_class: dict[int, float]) -> np.ndarray:
    thr = np.full(len(conf), glob)
    for c, t in per_class.items():
        thr[pred == c] = t
    return conf < thr


def fit_escalation(cnn_probs: np.ndarray, budget: float, metric: str = "top1", objective: Objective = "rate",
                   y: np.ndarray | None = None, escalated_probs: np.ndarray | None = None,
                   minority_boost: float = 1.0, grid: int = 41, learned: LearnedDeferralParams | None = None,
                   eligible: np.ndarray | None = None) -> EscalationConfig:
    """Fits thresholds on validation CNN probabilities (N, C); returns a ready EscalationConfig.

    ``escalated_probs`` (N, C) is what the cascade answers for each image if it escalates (the
    blended distribution); needed, with ``y``, for the balanced-accuracy objective.
    """
    p = np.atleast_2d(np.asarray(cnn_probs, dtype=np.float64))
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget is a fraction of requests in [0, 1], got {budget}")
    if minority_boost < 1.0:
        raise ValueError(f"minority_boost must be >= 1, got {minority_boost}")
    if objective not in ("rate", "balanced_accuracy"):
        raise ValueError(f"objective must be 'rate' or 'balanced_accuracy', got {objective!r}")
    if (objective == "balanced_accuracy" or minority_boost > 1.0) and y is None:
        raise ValueError(f"objective={objective!r} with minority_boost={minority_boost} needs validation labels y")
    if objective == "balanced_accuracy" and (escalated_probs is None or np.shape(escalated_probs) != p.shape):
        raise ValueError(f"the balanced_accuracy objective needs escalated_probs of shape {p.shape} "
                         "(the blended answers on a validation set where the VLM ran on every image)")
    if metric == "learned" and learned is None:
        raise ValueError("metric 'learned' needs a fitted learned deferral rule (learned=...)")
    conf, pred = confidence_scores(p, metric, learned), p.argmax(axis=1)
    if eligible is not None:  # never escalated: sorted past every threshold, out of the budget's way
        conf = np.where(np.asarray(eligible, dtype=bool), conf, 2.0)
    minority = minority_classes(y, p.shape[1]) if (y is not None and minority_boost > 1.0) else np.zeros(0, int)

    summary: dict = {"objective": objective, "budget": budget, "n": len(p), "minority_boost": minority_boost,
                     "minority_classes": [int(c) for c in minority]}
    if objective == "rate":
        glob, per_class = _thresholds(conf, pred, budget, minority, minority_boost)
    else:
        best = None
        for rate in np.linspace(0.0, budget, grid):
            glob_r, per_r = _thresholds(conf, pred, float(rate), minority, minority_boost)
            esc = _mask(conf, pred, glob_r, per_r)
            ba = balanced_accuracy(np.where(esc[:, None], escalated_probs, p), y)
            if best is None or ba > best[0] + 1e-12:  # ties keep the cheaper rate
                best = (ba, glob_r, per_r)
        _, glob, per_class = best
    esc = _mask(conf, pred, glob, per_class)
    summary["validation_rate"] = float(esc.mean())
    if y is not None:
        summary["validation_balanced_accuracy"] = balanced_accuracy(
            np.where(esc[:, None], escalated_probs, p) if escalated_probs is not None else p, y)
    return EscalationConfig(metric=metric, threshold=glob, class_thresholds=per_class, fit_summary=summary,
                            learned=learned if metric == "learned" else None)
