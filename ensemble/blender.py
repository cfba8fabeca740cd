"""The log-linear pool: the default blender of the CNN's distribution and the VLM's verdict."""
from __future__ import annotations

import numpy as np

from catcascade.ensemble.blending import _EPS, Blender, check_batch, normalised_vlm, place_in_candidates, true_class_nll
from catcascade.ensemble.config import BlendConfig


class LogLinearBlender(Blender):
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
