"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits by NLL.

Follows scikit-learn's calibrator shape: ``fit(logits, y) -> self``, learned state in
``temperature_``, a pure ``predict_proba``; the state round-trips through JSON.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from catcascade.cnn_stage.topk import softmax


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


class TemperatureScaler:
    def __init__(self, temperature: float = 1.0):
        self.temperature_ = float(temperature)

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "TemperatureScaler":
        logits = np.asarray(logits, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if logits.ndim != 2 or len(logits) != len(y) or len(y) == 0:
            raise ValueError(f"need (N, C) logits and N labels, got {logits.shape} and {y.shape}")
        # Optimise log T so T stays positive; T in [0.05, 20] covers any sane network.
        res = minimize_scalar(lambda lt: _nll(logits, y, float(np.exp(lt))), bounds=(np.log(0.05), np.log(20.0)),
                              method="bounded")
        self.temperature_ = float(np.exp(res.x))
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature_)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature_}

    @classmethod
    def from_dict(cls, d: dict) -> "TemperatureScaler":
        return cls(float(d["temperature"]))
