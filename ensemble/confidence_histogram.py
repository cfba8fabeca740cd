"""The calibrated top-1 confidence distribution, and how far a live one has drifted from it.

A bundle stores the histogram of its validation set's calibrated top-1 probability
(``BundleManifest.cnn.confidence_histogram``); the server bins live answers the same way and
exports the population-stability index (PSI) between the two. PSI is the usual credit-risk
drift statistic: sum over bins of (live - reference) * ln(live / reference) over the bin
fractions; below 0.1 is read as stable, 0.1-0.25 as a moderate shift, above 0.25 as a large one.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_BINS = 10
PSI_EPSILON = 1e-4
"""Floor on a bin's fraction, so an empty bin gives a large but finite term."""


class ConfidenceHistogram(BaseModel):
    """Counts of calibrated top-1 probabilities in bins with the given edges (len(edges) = bins + 1)."""

    model_config = ConfigDict(extra="forbid")

    edges: list[float] = Field(min_length=2)
    counts: list[int]

    @model_validator(mode="after")
    def _shape(self) -> "ConfidenceHistogram":
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) - 1} counts, got {len(self.counts)}")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("histogram edges must increase")
        if any(c < 0 for c in self.counts) or sum(self.counts) == 0:
            raise ValueError("histogram counts must be non-negative and not all zero")
        return self

    def fractions(self) -> np.ndarray:
        c = np.asarray(self.counts, dtype=np.float64)
        return c / c.sum()


def equal_width_edges(bins: int = DEFAULT_BINS) -> list[float]:
    return [round(float(e), 6) for e in np.linspace(0.0, 1.0, bins + 1)]


def bin_counts(confidences, edges: list[float]) -> np.ndarray:
    """Counts per bin; values outside the edges land in the first or last bin."""
    x = np.asarray(confidences, dtype=np.float64).ravel()
    idx = np.clip(np.searchsorted(np.asarray(edges[1:-1]), x, side="right"), 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1)


def top1_confidence_histogram(probs: np.ndarray, bins: int = DEFAULT_BINS) -> ConfidenceHistogram:
    """The histogram of each row's largest probability ((N, C) calibrated probabilities)."""
    p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    edges = equal_width_edges(bins)
    return ConfidenceHistogram(edges=edges, counts=[int(c) for c in bin_counts(p.max(axis=1), edges)])


def population_stability_index(reference_fractions, live_counts) -> float:
    """PSI of live counts against reference bin fractions (both over the same bins)."""
    ref = np.maximum(np.asarray(reference_fractions, dtype=np.float64), PSI_EPSILON)
    live = np.asarray(live_counts, dtype=np.float64)
    if live.sum() == 0:
        return 0.0
    live = np.maximum(live / live.sum(), PSI_EPSILON)
    return float(np.sum((live - ref) * np.log(live / ref)))
