"""Classification and calibration metrics (scikit-learn where it has them).

Every function takes class probabilities ``probs`` of shape (N, C) and integer labels ``y``
of shape (N,), with classes numbered 0..C-1 even when some are absent from ``y``.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np


def _check(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if probs.ndim != 2 or y.ndim != 1 or len(probs) != len(y) or len(y) == 0:
        raise ValueError(f"need (N, C) probabilities and N labels, got {probs.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}, got {y.min()}..{y.max()}")
    return probs, y


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE over equal-width confidence bins of the top-1 probability (Guo et al., 15 bins)."""
    probs, y = _check(probs, y)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (for the diagram)."""
    probs, y = _check(probs, y)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.digitize(conf, np.linspace(0.0, 1.0, n_bins + 1)[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "confidence": mean_conf, "accuracy": acc, "count": count}


def balanced_accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (sklearn's balanced_accuracy_score)."""
    from sklearn.metrics import balanced_accuracy_score

    probs, y = _check(probs, y)
    with warnings.catch_warnings():  # predicting a class absent from y is expected here, not news
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, probs.argmax(axis=1)))


def top_k_accuracy(probs: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    from sklearn.metrics import top_k_accuracy_score

    probs, y = _check(probs, y)
    return float(top_k_accuracy_score(y, probs, k=min(k, probs.shape[1]), labels=np.arange(probs.shape[1])))


def macro_f1(probs: np.ndarray, y: np.ndarray) -> float:
    """F1 averaged over the classes present in ``y`` or predicted."""
    from sklearn.metrics import f1_score

    probs, y = _check(probs, y)
    return float(f1_score(y, probs.argmax(axis=1), average="macro", zero_division=0))


def per_class_recall(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Recall of every class 0..C-1; NaN for classes absent from ``y``."""
    from sklearn.metrics import recall_score

    probs, y = _check(probs, y)
    c = probs.shape[1]
    rec = recall_score(y, probs.argmax(axis=1), labels=np.arange(c), average=None, zero_division=0).astype(np.float64)
    rec[np.bincount(y, minlength=c) == 0] = np.nan
    return rec


def confusion(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """C x C counts, rows true class, columns predicted class."""
    from sklearn.metrics import confusion_matrix

    probs, y = _check(probs, y)
    return confusion_matrix(y, probs.argmax(axis=1), labels=np.arange(probs.shape[1]))


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Multiclass Brier score: mean over images of sum_c (p_c - 1[y=c])^2, in [0, 2]."""
    from sklearn.metrics import brier_score_loss

    probs, y = _check(probs, y)
    return float(brier_score_loss(y, probs, labels=np.arange(probs.shape[1]), scale_by_half=False))


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import log_loss as _log_loss

    probs, y = _check(probs, y)
    return float(_log_loss(y, np.clip(probs, 1e-12, 1.0), labels=np.arange(probs.shape[1])))


def risk_coverage_curve(probs: np.ndarray, y: np.ndarray, confidence: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Selective classification: answer the most confident fraction, measure its error.

    Returns ``coverage`` (k/N for k = 1..N) and ``risk`` (error rate of the k most confident
    answers). ``confidence`` defaults to the top-1 probability. scikit-learn has no such curve.
    """
    probs, y = _check(probs, y)
    conf = probs.max(axis=1) if confidence is None else np.asarray(confidence, dtype=np.float64)
    if conf.shape != y.shape:
        raise ValueError(f"confidence has shape {conf.shape}, expected {y.shape}")
    order = np.argsort(-conf, kind="stable")
    errors = (probs.argmax(axis=1) != y)[order].astype(np.float64)
    k = np.arange(1, len(y) + 1)
    return k / len(y), np.cumsum(errors) / k


def aurc(probs: np.ndarray, y: np.ndarray, confidence: np.ndarray | None = None) -> float:
    """Area under the risk-coverage curve (mean selective risk over coverages); lower is better."""
    _, risk = risk_coverage_curve(probs, y, confidence)
    return float(risk.mean())


def minority_classes(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Classes whose support is below the median support (over classes present in ``y``)."""
    support = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)
    present = support > 0
    if not present.any():
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(present & (support < np.median(support[present])))


@dataclass(frozen=True)
class ClassificationSummary:
    """The headline numbers of one system on one labelled set."""

    n: int
    balanced_accuracy: float
    top1: float
    top3: float
    macro_f1: float
    ece: float
    brier: float
    aurc: float
    minority_recall: float | None
    """Mean recall over classes below median support; None when every class has the same support."""

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(probs: np.ndarray, y: np.ndarray, minority: np.ndarray | None = None) -> ClassificationSummary:
    probs, y = _check(probs, y)
    minority = minority_classes(y, probs.shape[1]) if minority is None else np.asarray(minority, dtype=np.int64)
    recall = per_class_recall(probs, y)
    return ClassificationSummary(
        n=len(y), balanced_accuracy=balanced_accuracy(probs, y), top1=top_k_accuracy(probs, y, 1),
        top3=top_k_accuracy(probs, y, 3), macro_f1=macro_f1(probs, y), ece=expected_calibration_error(probs, y),
        brier=brier_score(probs, y), aurc=aurc(probs, y),
        minority_recall=float(np.nanmean(recall[minority])) if len(minority) else None)
