"""The blender interface and the arithmetic the blenders share.

Every blender has ``blend(cnn_probs, candidates, vlm_probs)`` for one image (what serving
calls) and ``blend_batch`` for (N, ...) arrays (offline evaluation); both keep the CNN's
probability mass outside the candidates, so the result is a distribution over all classes.
Rows of a batch whose VLM scores are missing (candidate index -1 or NaN score) stay CNN-only.
"""
from __future__ import annotations

import abc

import numpy as np

from catcascade.cnn_stage.topk import softmax

_EPS = 1e-6


def check_batch(cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validates (N, C), (N, k), (N, k) inputs; returns them plus the rows that have VLM scores."""
    p = np.atleast_2d(np.asarray(cnn_probs, dtype=np.float64))
    idx = np.atleast_2d(np.asarray(candidates, dtype=np.int64))
    vlm = np.atleast_2d(np.asarray(vlm_scores, dtype=np.float64))
    if idx.shape != vlm.shape or len(idx) != len(p):
        raise ValueError(f"need (N, C) CNN probabilities and (N, k) candidates and VLM scores, got "
                         f"{p.shape}, {idx.shape} and {vlm.shape}")
    if idx.max(initial=-1) >= p.shape[1]:
        raise ValueError(f"candidate index {idx.max()} out of range for {p.shape[1]} classes")
    has = (idx >= 0).all(axis=1) & np.isfinite(vlm).all(axis=1)
    return p, idx, vlm, has


def normalised_vlm(vlm: np.ndarray) -> np.ndarray:
    """Drops "none of these" and renormalises the candidates' scores (rows of (n, k))."""
    v = np.clip(vlm, _EPS, None)
    return v / v.sum(axis=1, keepdims=True)


def place_in_candidates(cnn_probs: np.ndarray, idx: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Candidate log-scores -> full distributions: softmax within the candidates, scaled to the
    CNN's mass on them; every other class keeps its CNN probability."""
    q = softmax(log_q)
    rows = np.arange(len(idx))[:, None]
    out = cnn_probs.copy()
    out[rows, idx] = q * cnn_probs[rows, idx].sum(axis=1, keepdims=True)
    return out


def true_class_nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


class Blender(abc.ABC):
    """The interface every blender implements (serving calls ``blend``, offline evaluation
    ``blend_batch``); one image's ``blend`` is a batch of one through ``blend_batch``."""

    @abc.abstractmethod
    def blend_batch(self, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray) -> np.ndarray:
        """(N, C), (N, k), (N, k) -> (N, C) distributions; rows without VLM scores stay CNN-only."""

    @abc.abstractmethod
    def fit(self, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray, y: np.ndarray) -> "Blender":
        """Learns the blender's parameters on held-out rows where both stages ran; returns self."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """The fitted state as JSON-able numbers (stored in the bundle's cascade config)."""

    def blend(self, cnn_probs: np.ndarray, candidates: tuple[int, ...] | list[int], vlm_probs: np.ndarray) -> np.ndarray:
        cnn_probs = np.asarray(cnn_probs, dtype=np.float64)
        vlm = np.asarray(vlm_probs, dtype=np.float64)
        if vlm.shape != np.asarray(candidates).shape:
            raise ValueError(f"{len(candidates)} candidates but {vlm.shape[0]} VLM scores")
        return self.blend_batch(cnn_probs[None, :], np.asarray(candidates)[None, :], vlm[None, :])[0]


def blend_first(blender: Blender, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray,
                sizes: np.ndarray) -> np.ndarray:
    """Blends each row over its first ``sizes[i]`` candidates only (conformal candidate sets of
    varying size, offline): the VLM's scores on that prefix are renormalised, as the blenders do
    with any candidate list. Rows are grouped by size, one ``blend_batch`` per size."""
    p = np.atleast_2d(np.asarray(cnn_probs, dtype=np.float64))
    sizes = np.asarray(sizes, dtype=np.int64)
    k = np.shape(candidates)[1]
    if len(sizes) != len(p) or sizes.min(initial=1) < 1 or sizes.max(initial=1) > k:
        raise ValueError(f"sizes must be N numbers in 1..{k}")
    out = p.copy()
    for s in np.unique(sizes):
        rows = sizes == s
        out[rows] = blender.blend_batch(p[rows], np.asarray(candidates)[rows, :s], np.asarray(vlm_scores)[rows, :s])
    return out
