"""Combines the calibrated CNN distribution with the VLM's verdict on its top-k."""
from __future__ import annotations

import numpy as np

from ensemble.config import BlendConfig

_EPS = 1e-6


class LogLinearBlender:
    """Weighted log-linear pool inside the CNN's top-k; mass outside the top-k stays the CNN's.

    Within the candidates: q_c ∝ p_cnn(c)^(1-w) * p_vlm(c)^w, rescaled to the CNN's total mass
    on the candidates, so the result is still a distribution over all classes. The VLM's
    "none of these" probability is dropped and its candidate scores renormalised.
    """

    def __init__(self, config: BlendConfig = BlendConfig()):
        self.config = config

    def blend(self, cnn_probs: np.ndarray, candidates: tuple[int, ...] | list[int], vlm_probs: np.ndarray) -> np.ndarray:
        cnn_probs = np.asarray(cnn_probs, dtype=np.float64)
        idx = np.asarray(candidates, dtype=np.int64)
        vlm = np.clip(np.asarray(vlm_probs, dtype=np.float64), _EPS, None)
        if vlm.shape != idx.shape:
            raise ValueError(f"{len(idx)} candidates but {vlm.shape[0]} VLM scores")
        vlm = vlm / vlm.sum()
        w = self.config.weight
        p_c = np.clip(cnn_probs[idx], _EPS, None)
        log_q = (1.0 - w) * np.log(p_c) + w * np.log(vlm)
        q = np.exp(log_q - log_q.max())
        q = q / q.sum()
        out = cnn_probs.copy()
        out[idx] = q * cnn_probs[idx].sum()
        return out
