"""Bootstrap confidence intervals for the benchmark's metrics, and paired differences.

A benchmark row is one number from a few hundred images; resampling the images (with
replacement, seeded) shows how much it would move on another draw of the same size. Each
resample is a vector of counts (how often each image was drawn), so every metric is a weighted
sum over images and a whole chunk of resamples is a few matrix products: a thousand resamples
of every metric of a 4,000-image row take well under a second.

Paired: every system is resampled with the *same* draws, so the difference between a cascade
row and CNN-only is computed per resample; its 95% interval excluding 0 says the difference is
not the luck of which images were drawn (Efron & Tibshirani 1993, ch. 13 and 16; percentile
intervals). What it does not cover: the variability of the fitted thresholds and blender
themselves, which are held fixed (each image keeps its cross-fitted answer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

METRICS = ("balanced_accuracy", "top1", "top3", "macro_f1", "ece", "brier", "aurc", "minority_recall")
_ECE_BINS = 15


class Resampler:
    """``n_boot`` seeded iid resamples of ``n`` images, produced in chunks of count vectors; the
    same seed gives the same resamples on every call (what makes comparisons paired). Counts are
    float32 (exact for any realistic n); up to ``cache_limit`` of them are kept for reuse."""

    def __init__(self, n: int, n_boot: int = 1000, seed: int = 0, chunk: int = 100, cache_limit: int = 10_000_000):
        if n < 1 or n_boot < 1:
            raise ValueError(f"need at least one image and one resample, got n={n}, n_boot={n_boot}")
        self.n, self.n_boot, self.seed, self.chunk = n, n_boot, seed, chunk
        self._cache: list[np.ndarray] | None = [] if n * n_boot <= cache_limit else None
        self._cached = False

    def _generate(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        done = 0
        while done < self.n_boot:
            b = min(self.chunk, self.n_boot - done)
            idx = rng.integers(0, self.n, size=(b, self.n)) + self.n * np.arange(b)[:, None]
            done += b
            yield np.bincount(idx.ravel(), minlength=b * self.n).reshape(b, self.n).astype(np.float32)

    def chunks(self) -> Iterator[np.ndarray]:
        if self._cached:
            yield from self._cache
            return
        for counts in self._generate():
            if self._cache is not None:
                self._cache.append(counts)
            yield counts
        self._cached = self._cache is not None

    def samples(self, statistic: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``statistic(counts (b, n)) -> (b, ...)`` over every resample, stacked."""
        return np.concatenate([statistic(w) for w in self.chunks()], axis=0)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite samples (NaN, NaN when there are none)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _onehot(v: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(v), c))
    out[np.arange(len(v)), v] = 1.0
    return out


def _mean_over_present(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Row-wise mean of num/den over the columns where den > 0 (NaN where none)."""
    present = den > 0
    ratio = np.divide(num, den, out=np.zeros_like(num), where=present)
    k = present.sum(axis=1)
    return np.divide(ratio.sum(axis=1), k, out=np.full(len(k), np.nan), where=k > 0)


class _PerImage:
    """What each metric needs per image, computed once per system."""

    def __init__(self, probs: np.ndarray, y: np.ndarray, minority: np.ndarray | None):
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        n, c = p.shape
        pred = p.argmax(axis=1)
        self.correct = (pred == y).astype(np.float64)
        p_true = p[np.arange(n), y]
        self.in_top3 = ((p > p_true[:, None]).sum(axis=1) < 3).astype(np.float64)
        conf = p.max(axis=1)
        self.brier = ((p - _onehot(y, c)) ** 2).sum(axis=1)
        bins = np.clip(np.digitize(conf, np.linspace(0.0, 1.0, _ECE_BINS + 1)[1:-1], right=True), 0, _ECE_BINS - 1)
        bin_1h = _onehot(bins, _ECE_BINS)
        self.ece_mats = tuple(m.astype(np.float32) for m in (bin_1h * self.correct[:, None], bin_1h * conf[:, None]))
        y1h, p1h = _onehot(y, c), _onehot(pred, c)
        self.class_mats = tuple(m.astype(np.float32) for m in (y1h * self.correct[:, None], y1h, p1h))
        self.minority = np.asarray(minority if minority is not None else [], dtype=np.int64)
        order = np.argsort(-conf, kind="stable")
        self.aurc_order = order
        self.aurc_error_pos = np.flatnonzero(self.correct[order] == 0.0)
        h = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])  # H_0..H_n
        self._harmonic = h
        self._harmonic_sums = np.concatenate([[0.0], np.cumsum(h)])  # G(m) = H_0 + ... + H_{m-1}

    def metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for each row of count weights ``w`` (b, n)."""
        total = w.sum(axis=1, dtype=np.float64)
        tp, support, predicted = ((w @ m).astype(np.float64) for m in self.class_mats)
        out = {
            "balanced_accuracy": _mean_over_present(tp, support),
            "top1": (w @ self.correct) / total,
            "top3": (w @ self.in_top3) / total,
            "macro_f1": _mean_over_present(2.0 * tp, support + predicted),
            "ece": np.abs((w @ self.ece_mats[0]).astype(np.float64) - w @ self.ece_mats[1]).sum(axis=1) / total,
            "brier": (w @ self.brier) / total,
            "aurc": self._aurc(w),
        }
        if len(self.minority):
            out["minority_recall"] = _mean_over_present(tp[:, self.minority], support[:, self.minority])
        else:
            out["minority_recall"] = np.full(len(w), np.nan)
        return out

    def _aurc(self, w: np.ndarray) -> np.ndarray:
        """Mean selective risk over coverages 1..N of each resample. Sum_k E_k / k over coverages k
        (E_k: errors among the k most confident) = sum over error positions p of H_N - H_{p-1}; an
        image drawn w_j times fills positions W_{j-1}+1..W_j, so an erring image adds
        w_j H_N - (G(W_j) - G(W_{j-1})), G the cumulative sums of harmonic numbers. Ties in
        confidence keep the original order; copies of one image are consecutive."""
        ws = w[:, self.aurc_order]
        cum_w = np.cumsum(ws, axis=1, dtype=np.float64)
        pos = self.aurc_error_pos
        if not len(pos):
            return np.zeros(len(w))
        upto = cum_w[:, pos].astype(np.int64)
        before = upto - ws[:, pos].astype(np.int64)
        total = cum_w[:, -1].astype(np.int64)
        g = self._harmonic_sums
        h_total = self._harmonic[np.minimum(total, len(self._harmonic) - 1)]
        contrib = ws[:, pos] * h_total[:, None] - (g[upto] - g[before])
        return contrib.sum(axis=1) / total


def metric_samples(probs: np.ndarray, y: np.ndarray, minority: np.ndarray | None, resampler: Resampler
                   ) -> dict[str, np.ndarray]:
    """(n_boot,) samples of every metric in ``METRICS`` for one system."""
    per = _PerImage(probs, y, minority)
    parts = [per.metrics(w) for w in resampler.chunks()]
    return {m: np.concatenate([p[m] for p in parts]) for m in METRICS}


def balanced_accuracy_samples(correct: np.ndarray, y: np.ndarray, num_classes: int, resampler: Resampler) -> np.ndarray:
    """(n_boot, R) balanced accuracy of R answer sets at once; ``correct`` is (R, n) booleans."""
    correct = np.atleast_2d(np.asarray(correct, dtype=np.float64))
    y1h = _onehot(np.asarray(y, dtype=np.int64), num_classes)
    r = len(correct)
    hits = (correct[:, :, None] * y1h[None]).transpose(1, 0, 2).reshape(len(y1h), r * num_classes)

    def stat(w):
        tp = (w @ hits).reshape(len(w), r, num_classes)
        support = np.broadcast_to((w @ y1h)[:, None, :], tp.shape)
        return _mean_over_present(tp.reshape(-1, num_classes), support.reshape(-1, num_classes)).reshape(len(w), r)

    return resampler.samples(stat)


@dataclass(frozen=True)
class PairedDifference:
    """metric(system) - metric(reference) on the same resamples."""

    observed: float
    low: float
    high: float
    p_value: float
    """Two-sided bootstrap p-value: 2 x the share of resamples on the far side of 0 (capped at 1)."""

    @property
    def significant(self) -> bool:
        return not (self.low <= 0.0 <= self.high)

    def to_dict(self) -> dict:
        return {"observed": self.observed, "low": self.low, "high": self.high, "p_value": self.p_value,
                "significant": self.significant}


def paired_difference(observed: float, system: np.ndarray, reference: np.ndarray, level: float = 0.95
                      ) -> PairedDifference:
    d = np.asarray(system) - np.asarray(reference)
    d = d[np.isfinite(d)]
    lo, hi = interval(d, level)
    if not len(d):
        return PairedDifference(observed, lo, hi, float("nan"))
    p = min(1.0, 2.0 * min((d <= 0).mean(), (d >= 0).mean()))
    return PairedDifference(observed, lo, hi, float(p))
