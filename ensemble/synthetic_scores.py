"""Synthetic score sets with known structure, for tests and for trying the offline tools.

Images are "easy" (the CNN is confident and nearly always right) or "hard" (the CNN's true-class
logit is only slightly raised, so it is unsure and often wrong). Classes are imbalanced
(supports decay geometrically), so some fall below the median support. The VLM is asked about
the CNN's top-k on every image; ``vlm_signal`` is how far it raises the true candidate's logit
(0 = an uninformative VLM whose scores are independent of the truth).

Three regimes, after Jitkrittum et al. (NeurIPS 2023), who show where confidence deferral is
enough and where it is not:

* ``uniform``: the VLM is equally good on every breed (confidence deferral is near optimal);
* ``specialist``: the VLM knows only ``special_fraction`` of the breeds (``vlm_signal`` on
  those, no signal on the rest): deferring an unsure image of a breed it does not know wastes
  the call or hurts;
* ``noisy_labels``: the VLM is uniformly good, but on ``special_fraction`` of the breeds a
  share ``label_noise`` of the labels is replaced by a random breed: unsure images there are
  unsure because of the label, and no second opinion fixes that.

Which breeds are special is drawn from the seed and recorded in ``meta["special_classes"]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from catcascade.cnn_stage.topk import softmax
from catcascade.ensemble.score_files import ScoreSet

Regime = Literal["uniform", "specialist", "noisy_labels"]


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
    confusers: int = 0
    """Hard images: this many other breeds get the true breed's boost too (look-alikes: the CNN
    hesitates between a few breeds, the truth usually among them)."""
    families: int = 0
    """> 0: breeds form this many families of look-alikes (breed c in family c % families);
    confusers come from the image's own family, and the special breeds are whole families."""
    regime: Regime = "uniform"
    special_fraction: float = 1 / 3
    """specialist: the breeds the VLM knows; noisy_labels: the breeds with noisy labels."""
    label_noise: float = 0.5
    """noisy_labels: share of the labels of the noisy breeds replaced by a random breed."""
    unknown_noise: float = 1.0
    """specialist: spread of the VLM's logits on breeds it does not know (small = it hedges)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.regime not in ("uniform", "specialist", "noisy_labels"):
            raise ValueError(f"regime must be uniform, specialist or noisy_labels, got {self.regime!r}")
        if not 0.0 < self.special_fraction <= 1.0 or not 0.0 <= self.label_noise <= 1.0:
            raise ValueError("special_fraction must be in (0, 1] and label_noise in [0, 1]")
        if self.families and (self.num_classes % self.families or self.confusers >= self.num_classes // self.families):
            raise ValueError(f"{self.num_classes} breeds do not split into {self.families} families with "
                             f"{self.confusers} look-alikes each")


def synthetic_score_set(cfg: SyntheticScoreConfig = SyntheticScoreConfig()) -> ScoreSet:
    rng = np.random.default_rng(cfg.seed)
    prior = cfg.imbalance ** np.arange(cfg.num_classes)
    y = rng.choice(cfg.num_classes, size=cfg.n, p=prior / prior.sum())
    easy = rng.random(cfg.n) < cfg.easy_fraction
    logits = rng.normal(0.0, 1.0, (cfg.n, cfg.num_classes))
    logits[np.arange(cfg.n), y] += np.where(easy, cfg.easy_boost, cfg.hard_boost)
    if cfg.confusers:
        hard = np.flatnonzero(~easy)
        # candidates for confusion: every other breed, or the other breeds of the image's family
        step = cfg.families if cfg.families else 1
        pool = cfg.num_classes // step - 1 if cfg.families else cfg.num_classes - 1
        offsets = 1 + np.argsort(rng.random((len(hard), pool)), axis=1)[:, : cfg.confusers]
        logits[hard[:, None], (y[hard, None] + step * offsets) % (step * (cfg.num_classes // step))] += cfg.hard_boost
    cand = np.argsort(-logits, axis=1, kind="stable")[:, : cfg.top_k]
    special = np.zeros(0, dtype=np.int64)
    signal = np.full(cfg.n, cfg.vlm_signal)
    if cfg.regime != "uniform":
        pick = np.random.default_rng(cfg.seed + 7919)
        if cfg.families:
            n_fam = max(1, int(round(cfg.special_fraction * cfg.families)))
            special = np.flatnonzero(np.isin(np.arange(cfg.num_classes) % cfg.families,
                                             pick.permutation(cfg.families)[:n_fam]))
        else:
            n_special = max(1, int(round(cfg.special_fraction * cfg.num_classes)))
            special = np.sort(pick.permutation(cfg.num_classes)[:n_special])
    noise = np.ones(cfg.n)
    if cfg.regime == "specialist":
        known = np.isin(y, special)
        signal, noise = np.where(known, cfg.vlm_signal, 0.0), np.where(known, 1.0, cfg.unknown_noise)
    vlm_logits = noise[:, None] * rng.normal(0.0, 1.0, (cfg.n, cfg.top_k + 1)) + signal[:, None] * np.concatenate(
        [cand == y[:, None], (cand != y[:, None]).all(axis=1, keepdims=True)], axis=1)
    vlm = softmax(vlm_logits)
    labels = y.copy()
    if cfg.regime == "noisy_labels":  # what the images show (y) stays; what the labels say changes
        flip = np.isin(y, special) & (rng.random(cfg.n) < cfg.label_noise)
        labels[flip] = rng.integers(0, cfg.num_classes, int(flip.sum()))
    return ScoreSet(ids=[f"synthetic/{i:06d}" for i in range(cfg.n)], labels=labels,
                    label_names=[f"class_{c:02d}" for c in range(cfg.num_classes)], cnn_logits=logits,
                    temperature=1.0, vlm_candidates=cand, vlm_scores=vlm[:, : cfg.top_k], vlm_none=vlm[:, cfg.top_k],
                    meta={"source": "synthetic", "config": asdict(cfg), "special_classes": special.tolist(),
                          "vlm_requests_per_image": 1})
