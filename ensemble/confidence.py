"""Confidence scores of the CNN's calibrated distribution: top-1, margin and entropy.

Higher means more confident, in [0, 1] for every score; the escalation policy compares them to
a threshold and the learned deferral rule uses them as features.
"""
from __future__ import annotations

import numpy as np

CONFIDENCE_METRICS = ("top1", "margin", "entropy")


def sorted_probs(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities sorted per row, largest first."""
    return np.sort(np.atleast_2d(np.asarray(probs, dtype=np.float64)), axis=-1)[:, ::-1]


def confidence_from_sorted(p: np.ndarray, metric: str) -> np.ndarray:
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


def confidence_scores(probs: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise confidence of (N, C) probabilities; higher means more confident, in [0, 1]."""
    return confidence_from_sorted(sorted_probs(probs), metric)
