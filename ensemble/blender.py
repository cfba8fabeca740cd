"""Combines the calibrated CNN distribution with the VLM's verdict on its top-k.

Every blender has ``blend(cnn_probs, candidates, vlm_probs)`` for one image (what serving
calls) and ``blend_batch`` for (N, ...) arrays (offline evaluation); both keep the CNN's
probability mass outside the candidates, so the result is a distribution over all classes.
Rows of a batch whose VLM scores are missing (candidate index -1 or NaN score) stay CNN-only.
"""
from __future__ import annotations

import numpy as np

from cnn_stage.topk import softmax
from ensemble.config import BlendConfig

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


class BatchBlender:
    """Shared by the blenders: one image's ``blend`` is a batch of one through ``blend_batch``."""

    def blend_batch(self, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def blend(self, cnn_probs: np.ndarray, candidates: tuple[int, ...] | list[int], vlm_probs: np.ndarray) -> np.ndarray:
        cnn_probs = np.asarray(cnn_probs, dtype=np.float64)
        vlm = np.asarray(vlm_probs, dtype=np.float64)
        if vlm.shape != np.asarray(candidates).shape:
            raise ValueError(f"{len(candidates)} candidates but {vlm.shape[0]} VLM scores")
        return self.blend_batch(cnn_probs[None, :], np.asarray(candidates)[None, :], vlm[None, :])[0]


class LogLinearBlender(BatchBlender):
    """Weighted log-linear pool inside the CNN's top-k; mass outside the top-k stays the CNN's.

    Within the candidates: q_c ∝ (p_cnn(c)^(1-w) * p_vlm(c)^w)^(1/T), rescaled to the CNN's total
    mass on the candidates, so the result is still a distribution over all classes. The VLM's
    "none of these" probability is dropped and its candidate scores renormalised. ``fit``
    picks w (and T, which re-calibrates: a geometric mean of two agreeing distributions is
    under-confident) by log-loss on held-out images where both stages ran.
    """

    def __init__(self, config: BlendConfig = BlendConfig()):
        self.config = config

    @property
    def weight_(self) -> float:
        return self.config.weight

    def _pool(self, p: np.ndarray, idx: np.ndarray, vlm: np.ndarray, w: float, t: float = 1.0) -> np.ndarray:
        rows = np.arange(len(idx))[:, None]
        log_q = (1.0 - w) * np.log(np.clip(p[rows, idx], _EPS, None)) + w * np.log(normalised_vlm(vlm))
        return place_in_candidates(p, idx, log_q / t)

    def blend_batch(self, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray) -> np.ndarray:
        p, idx, vlm, has = check_batch(cnn_probs, candidates, vlm_scores)
        out = p.copy()
        if has.any():
            out[has] = self._pool(p[has], idx[has], vlm[has], self.config.weight, self.config.temperature)
        return out

    def fit(self, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray, y: np.ndarray,
            fit_temperature: bool = True) -> "LogLinearBlender":
        """Chooses the weight in [0, 1] (and T in [0.01, 20]) minimising the blend's log-loss on rows
        with VLM scores."""
        p, idx, vlm, has = check_batch(cnn_probs, candidates, vlm_scores)
        y = np.asarray(y, dtype=np.int64)
        if len(y) != len(p):
            raise ValueError(f"{len(p)} rows but {len(y)} labels")
        if not has.any():
            raise ValueError("no row has VLM scores: the blender needs held-out images where both stages ran")
        from scipy.optimize import minimize, minimize_scalar

        p, idx, vlm, y = p[has], idx[has], vlm[has], y[has]
        res = minimize_scalar(lambda w: true_class_nll(self._pool(p, idx, vlm, w), y), bounds=(0.0, 1.0),
                              method="bounded", options={"xatol": 1e-4})
        w, t = float(np.clip(res.x, 0.0, 1.0)), 1.0
        if fit_temperature:
            res2 = minimize(lambda v: true_class_nll(self._pool(p, idx, vlm, v[0], float(np.exp(v[1]))), y),
                            x0=[w, 0.0], method="L-BFGS-B", bounds=[(0.0, 1.0), (np.log(0.01), np.log(20.0))])
            w, t = float(np.clip(res2.x[0], 0.0, 1.0)), float(np.exp(res2.x[1]))
        self.config = BlendConfig(weight=w, temperature=t, method="log_linear")
        return self

    def to_dict(self) -> dict:
        return self.config.model_dump(mode="json")


def make_blender(config: BlendConfig):
    """The blender a BlendConfig describes (what serving should build from the manifest)."""
    if config.method == "stacking":
        from ensemble.stacking import StackingBlender

        return StackingBlender.from_config(config)
    return LogLinearBlender(config)
