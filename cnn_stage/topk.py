"""Softmax and top-k over class scores, as small typed results."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TopK:
    """The k best classes of one image, best first."""

    indices: tuple[int, ...]
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, labels: list[str] | tuple[str, ...], k: int) -> TopK:
    """Top-k of a 1-D probability vector (stable order on ties)."""
    k = max(1, min(k, probs.shape[-1]))
    idx = np.argsort(-probs, kind="stable")[:k]
    return TopK(tuple(int(i) for i in idx), tuple(labels[i] for i in idx), tuple(float(probs[i]) for i in idx))
