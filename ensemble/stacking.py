"""Logistic-regression stacking over per-candidate features, re-calibrated afterwards.

For each of an image's top-k candidates the stacker sees: the CNN's calibrated probability,
the VLM's score, the candidate's CNN rank, and the image's margin and entropy confidence.
Margin and entropy are the same for every candidate of one image, so on their own they would
cancel in the softmax over candidates; they enter through their products with the two
log-probabilities, which lets the stacker trust the VLM more when the CNN is unsure.

A binary logistic regression (scikit-learn) learns "is this candidate the true class"; its
decision values are turned into a distribution over the candidates by a softmax with a
temperature fitted by log-loss (the re-calibration). The CNN's mass outside the top-k is kept.
Fitted state is plain numbers (``StackingParams``), saved as JSON.
"""
from __future__ import annotations

import numpy as np

from catcascade.ensemble.blending import _EPS, Blender, check_batch, normalised_vlm, place_in_candidates, true_class_nll
from catcascade.ensemble.config import BlendConfig, StackingParams
from catcascade.ensemble.confidence import confidence_scores


def feature_names(top_k: int) -> list[str]:
    base = ["log_p_cnn", "log_p_vlm", "margin", "entropy_conf", "margin_x_log_p_cnn", "margin_x_log_p_vlm",
            "entropy_x_log_p_cnn", "entropy_x_log_p_vlm"]
    return base + [f"rank_{r}" for r in range(top_k - 1)]


def candidate_features(cnn_probs: np.ndarray, idx: np.ndarray, vlm: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """(n, C), (n, k), (n, k) -> (n, k, F) features in ``feature_names(top_k)`` order.

    ``top_k`` (default k) is the candidate count the stacker was fitted on; fewer candidates
    (a conformal set smaller than it) use the same rank columns for their first ranks."""
    n, k = idx.shape
    top_k = k if top_k is None else top_k
    rows = np.arange(n)[:, None]
    lp_cnn = np.log(np.clip(cnn_probs[rows, idx], _EPS, None))
    lp_vlm = np.log(normalised_vlm(vlm))
    margin = np.repeat(confidence_scores(cnn_probs, "margin")[:, None], k, axis=1)
    ent = np.repeat(confidence_scores(cnn_probs, "entropy")[:, None], k, axis=1)
    ranks = [np.broadcast_to((np.arange(k) == r).astype(np.float64), (n, k)) for r in range(top_k - 1)]
    cols = [lp_cnn, lp_vlm, margin, ent, margin * lp_cnn, margin * lp_vlm, ent * lp_cnn, ent * lp_vlm, *ranks]
    return np.stack(cols, axis=-1)


class StackingBlender(Blender):
    """Same ``blend``/``blend_batch`` interface as LogLinearBlender; ``fit`` first."""

    def __init__(self, C: float = 1.0, params: StackingParams | None = None):
        self.C = C
        self.params_ = params

    @classmethod
    def from_config(cls, config: BlendConfig) -> "StackingBlender":
        if config.stacking is None:
            raise ValueError("BlendConfig has no stacking parameters")
        return cls(params=config.stacking)

    def _check_fitted(self) -> StackingParams:
        if self.params_ is None:
            raise RuntimeError("StackingBlender is not fitted: call fit() or load fitted parameters")
        return self.params_

    def _scores(self, p: np.ndarray, idx: np.ndarray, vlm: np.ndarray, params: StackingParams) -> np.ndarray:
        if idx.shape[1] > params.top_k:
            raise ValueError(f"the stacker was fitted on top-{params.top_k} candidates, got {idx.shape[1]}")
        x = (candidate_features(p, idx, vlm, params.top_k) - np.asarray(params.mean)) / np.asarray(params.scale)
        return x @ np.asarray(params.coef) + params.intercept

    def blend_batch(self, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray) -> np.ndarray:
        params = self._check_fitted()
        p, idx, vlm, has = check_batch(cnn_probs, candidates, vlm_scores)
        out = p.copy()
        if has.any():
            z = self._scores(p[has], idx[has], vlm[has], params)
            out[has] = place_in_candidates(p[has], idx[has], z / params.temperature)
        return out

    def fit(self, cnn_probs: np.ndarray, candidates: np.ndarray, vlm_scores: np.ndarray, y: np.ndarray) -> "StackingBlender":
        from scipy.optimize import minimize_scalar
        from sklearn.linear_model import LogisticRegression

        p, idx, vlm, has = check_batch(cnn_probs, candidates, vlm_scores)
        y = np.asarray(y, dtype=np.int64)
        if len(y) != len(p):
            raise ValueError(f"{len(p)} rows but {len(y)} labels")
        p, idx, vlm, y = p[has], idx[has], vlm[has], y[has]
        target = idx == y[:, None]
        if target.sum() < 2 or (~target).sum() < 2:
            raise ValueError(f"stacking needs held-out images where both stages ran and the true class is among "
                             f"the candidates for some but not all candidates; got {len(y)} usable rows")
        k = idx.shape[1]
        feats = candidate_features(p, idx, vlm).reshape(-1, len(feature_names(k)))
        mean, scale = feats.mean(axis=0), feats.std(axis=0)
        scale[scale < 1e-9] = 1.0
        lr = LogisticRegression(C=self.C, max_iter=1000).fit((feats - mean) / scale, target.reshape(-1))
        params = StackingParams(features=feature_names(k), mean=mean.tolist(), scale=scale.tolist(),
                                coef=lr.coef_[0].tolist(), intercept=float(lr.intercept_[0]), temperature=1.0, top_k=k)
        z = self._scores(p, idx, vlm, params)
        res = minimize_scalar(lambda lt: true_class_nll(place_in_candidates(p, idx, z / np.exp(lt)), y),
                              bounds=(np.log(0.05), np.log(20.0)), method="bounded")
        self.params_ = params.model_copy(update={"temperature": float(np.exp(res.x))})
        return self

    def to_config(self) -> BlendConfig:
        return BlendConfig(method="stacking", stacking=self._check_fitted())

    def to_dict(self) -> dict:
        return self.to_config().model_dump(mode="json")
