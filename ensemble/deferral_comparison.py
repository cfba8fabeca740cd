"""Deferral rules compared on the same cross-fitted folds: balanced accuracy against the
escalation rate, the area under that curve, and the budget each rule needs to reach 90% of the
gain of escalating every image.

Every rule (top1, margin, entropy confidence; the learned rule) is fitted on the same fitting
folds, to the same grid of budgets, with the same blender; each image is answered out of fold.
The "VLM-always gain" is balanced accuracy with every image escalated through that blender
minus CNN-only: the most any rule can reach at a 100% budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from catcascade.ensemble.bootstrap import Resampler, balanced_accuracy_samples, interval, paired_difference

RULES = ("top1", "margin", "entropy", "learned")
CURVE_BUDGETS = tuple(round(b, 4) for b in np.linspace(0.0, 1.0, 21))
GAIN_SHARE = 0.9


def area_under(rates: np.ndarray, values: np.ndarray) -> float:
    """Mean of the curve over the rates it spans (trapezoids over rate-sorted points): the
    balanced accuracy one gets on average over escalation rates, comparable across rules."""
    r, v = np.asarray(rates, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(r, kind="stable")
    r, v = r[order], v[order]
    span = r[-1] - r[0]
    if span <= 0:
        return float(v.mean())
    return float(np.sum((r[1:] - r[:-1]) * (v[1:] + v[:-1]) / 2.0) / span)


def rate_to_reach(rates: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The smallest escalation rate at which the curve reaches ``target`` (linear between grid
    points); None when it never does."""
    r, v = np.asarray(rates, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(r, kind="stable")
    r, v = r[order], v[order]
    hit = np.flatnonzero(v >= target - 1e-12)
    if not len(hit):
        return None
    i = int(hit[0])
    if i == 0 or v[i] == v[i - 1]:
        return float(r[i])
    return float(r[i - 1] + (target - v[i - 1]) / (v[i] - v[i - 1]) * (r[i] - r[i - 1]))


@dataclass
class RuleCurve:
    """One rule's out-of-fold answers at every budget of the grid."""

    rule: str
    budgets: tuple[float, ...]
    escalated: np.ndarray = field(repr=False)
    """(n_budgets, N) booleans: which images the rule sent to the VLM at each budget."""
    correct: np.ndarray = field(repr=False)
    """(n_budgets, N) booleans: whether the cascade's answer was right."""

    @property
    def rates(self) -> np.ndarray:
        return self.escalated.mean(axis=1)


def compare_rules(curves: list[RuleCurve], y: np.ndarray, num_classes: int, cnn_correct: np.ndarray,
                  resampler: Resampler | None = None, report_budgets: tuple[float, ...] = ()) -> dict:
    """Per rule: rates, balanced accuracy, area under the curve and the budget needed for 90% of
    the VLM-always gain, with bootstrap intervals (and bands) when a resampler is given; and the
    learned rule's paired differences from each confidence rule."""
    def ba(correct: np.ndarray) -> float:
        return balanced_accuracy_of(correct, y, num_classes)

    cnn_ba = ba(cnn_correct)
    out: dict = {"budgets": list(curves[0].budgets) if curves else [], "cnn_balanced_accuracy": cnn_ba, "rules": {}}
    if not curves:
        return out
    full = curves[0].correct[int(np.argmax(curves[0].budgets))]
    gain = ba(full) - cnn_ba
    out["vlm_always_balanced_accuracy"] = ba(full)
    out["vlm_always_gain"] = gain
    target = cnn_ba + GAIN_SHARE * gain
    samples: dict[str, np.ndarray] = {}
    cnn_samples = balanced_accuracy_samples(cnn_correct[None], y, num_classes, resampler)[:, 0] if resampler else None
    for c in curves:
        bas = np.array([ba(row) for row in c.correct])
        rates = c.rates
        entry = {"rates": rates.tolist(), "balanced_accuracy": bas.tolist(), "auc": area_under(rates, bas),
                 "rate_for_90pct_gain": rate_to_reach(rates, bas, target) if gain > 0 else None}
        if resampler is not None:
            s = balanced_accuracy_samples(c.correct, y, num_classes, resampler)  # (B, n_budgets)
            samples[c.rule] = s
            entry["balanced_accuracy_ci"] = [interval(s[:, j]) for j in range(s.shape[1])]
            aucs = np.array([area_under(rates, row) for row in s])
            samples[c.rule + ":auc"] = aucs
            entry["auc_ci"] = interval(aucs)
            if gain > 0:
                need = []
                for row, base in zip(s, cnn_samples):
                    g = row[int(np.argmax(c.budgets))] - base
                    r = rate_to_reach(rates, row, base + GAIN_SHARE * g) if g > 0 else None
                    need.append(np.nan if r is None else r)
                entry["rate_for_90pct_gain_ci"] = interval(np.array(need))
        out["rules"][c.rule] = entry
    if resampler is not None and "learned" in samples:
        budgets = list(curves[0].budgets)
        paired = {}
        for c in curves:
            if c.rule == "learned":
                continue
            rows = {"auc": paired_difference(out["rules"]["learned"]["auc"] - out["rules"][c.rule]["auc"],
                                             samples["learned:auc"], samples[c.rule + ":auc"]).to_dict()}
            for b in report_budgets:
                if any(abs(b - g) < 1e-9 for g in budgets):
                    j = min(range(len(budgets)), key=lambda i: abs(budgets[i] - b))
                    obs = out["rules"]["learned"]["balanced_accuracy"][j] - out["rules"][c.rule]["balanced_accuracy"][j]
                    rows[f"{b * 100:g}%"] = paired_difference(obs, samples["learned"][:, j],
                                                              samples[c.rule][:, j]).to_dict()
            paired[c.rule] = rows
        out["learned_vs"] = paired
    return out


def balanced_accuracy_of(correct: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``y``, from per-image correctness."""
    support = np.bincount(y, minlength=num_classes)
    hits = np.bincount(y, weights=np.asarray(correct, dtype=np.float64), minlength=num_classes)
    present = support > 0
    return float((hits[present] / support[present]).mean())
