"""Synthetic score sets with known structure, for tests and for trying the offline tools.

Images are "easy" (the CNN is confident and nearly always right) or "hard" (the CNN's true-class
logit is only slightly raised, so it is unsure and often wrong). Classes are imbalanced
(supports decay geometrically), so some fall below the median support. The VLM is asked about
the CNN's top-k on every image; ``vlm_signal`` is how far it raises the true candidate's logit
(0 = an uninformative VLM whose scores are independent of the truth).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnn_stage.topk import softmax
from ensemble.score_files import ScoreSet


@dataclass(frozen=True)
class SyntheticScoreConfig:
    n: int = 4000
    num_classes: int = 12
    top_k: int = 3
    easy_fraction: float = 0.75
    easy_boost: float = 7.0
    hard_boost: float = 1.0
    vlm_signal: float = 4.0
    imbalance: float = 0.85
    """Class c has support proportional to imbalance**c."""
    seed: int = 0


def synthetic_score_set(cfg: SyntheticScoreConfig = SyntheticScoreConfig()) -> ScoreSet:
    rng = np.random.default_rng(cfg.seed)
    prior = cfg.imbalance ** np.arange(cfg.num_classes)
    y = rng.choice(cfg.num_classes, size=cfg.n, p=prior / prior.sum())
    easy = rng.random(cfg.n) < cfg.easy_fraction
    logits = rng.normal(0.0, 1.0, (cfg.n, cfg.num_classes))
    logits[np.arange(cfg.n), y] += np.where(easy, cfg.easy_boost, cfg.hard_boost)
    cand = np.argsort(-logits, axis=1, kind="stable")[:, : cfg.top_k]
    vlm_logits = rng.normal(0.0, 1.0, (cfg.n, cfg.top_k + 1)) + cfg.vlm_signal * np.concatenate(
        [cand == y[:, None], (cand != y[:, None]).all(axis=1, keepdims=True)], axis=1)
    vlm = softmax(vlm_logits)
    return ScoreSet(ids=[f"synthetic/{i:06d}" for i in range(cfg.n)], labels=y,
                    label_names=[f"class_{c:02d}" for c in range(cfg.num_classes)], cnn_logits=logits,
                    temperature=1.0, vlm_candidates=cand, vlm_scores=vlm[:, : cfg.top_k], vlm_none=vlm[:, cfg.top_k],
                    meta={"source": "synthetic", "config": cfg.__dict__, "vlm_requests_per_image": 1})
