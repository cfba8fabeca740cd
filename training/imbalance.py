"""Class-imbalance handling: class weights, focal loss and a class-balanced sampler.

Minority breeds are where an imbalanced classifier fails (high top-1, low balanced accuracy),
so the trainer offers one of four strategies (`IMBALANCE_STRATEGIES`):

* ``none``: plain (label-smoothed) cross-entropy;
* ``class_weights``: cross-entropy weighted by inverse class frequency (normalised to mean 1);
* ``focal``: focal loss (Lin et al., 2017), down-weighting easy examples by (1 - p)^gamma;
* ``balanced_sampler``: plain loss, but batches drawn with per-class-equal probability.

All losses go through `SoftTargetFocalLoss`, which takes integer labels or the soft targets
that mixup/cutmix produce; with gamma 0 and no weights it is cross-entropy.
"""
from __future__ import annotations

import functools

import numpy as np

IMBALANCE_STRATEGIES = ("none", "class_weights", "focal", "balanced_sampler")


def class_counts(labels: list[int] | np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)


def inverse_frequency_weights(labels: list[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """w_c proportional to 1 / n_c, scaled so the mean weight over samples is 1 (absent classes get 0)."""
    counts = class_counts(labels, num_classes)
    present = max(int((counts > 0).sum()), 1)
    # sklearn's "balanced" weights n / (classes * n_c), counting only classes that occur.
    return np.where(counts > 0, len(labels) / (present * np.maximum(counts, 1)), 0.0)


def balanced_sampler(labels: list[int], num_classes: int, seed: int = 0, num_samples: int | None = None):
    """A `WeightedRandomSampler` that draws every class equally often (with replacement)."""
    import torch

    counts = class_counts(labels, num_classes)
    weights = torch.as_tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=num_samples or len(labels),
                                                  replacement=True, generator=g)


def _soft_targets(target, num_classes: int, smoothing: float):
    import torch

    if target.ndim == 2:
        return target.float()
    off = smoothing / num_classes
    t = torch.full((len(target), num_classes), off, device=target.device)
    t.scatter_(1, target.unsqueeze(1), 1.0 - smoothing + off)
    return t


def make_loss(strategy: str, train_labels: list[int], num_classes: int, label_smoothing: float = 0.0,
              focal_gamma: float = 2.0):
    """The training loss for an imbalance ``strategy`` (see the module docstring)."""
    if strategy not in IMBALANCE_STRATEGIES:
        raise ValueError(f"imbalance must be one of {IMBALANCE_STRATEGIES}, got {strategy!r}")
    weight = inverse_frequency_weights(train_labels, num_classes) if strategy == "class_weights" else None
    gamma = focal_gamma if strategy == "focal" else 0.0
    return _loss_class()(num_classes, gamma=gamma, weight=weight, label_smoothing=label_smoothing)


def __getattr__(name: str):
    # The nn.Module is built on first use so importing this module does not import torch.
    if name == "SoftTargetFocalLoss":
        return _loss_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _loss_class():
    import torch

    class SoftTargetFocalLoss(torch.nn.Module):
        """mean_i sum_c w_c * t_ic * (1 - p_ic)^gamma * (-log p_ic).

        ``target``: class indices (smoothed with ``label_smoothing``) or (N, C) soft targets
        (already smoothed by timm's Mixup). ``weight``: optional per-class weights.
        """

        def __init__(self, num_classes: int, gamma: float = 0.0, weight=None, label_smoothing: float = 0.0):
            super().__init__()
            if gamma < 0:
                raise ValueError(f"focal gamma must be >= 0, got {gamma}")
            if not 0.0 <= label_smoothing < 1.0:
                raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
            self.num_classes = num_classes
            self.gamma = float(gamma)
            self.label_smoothing = float(label_smoothing)
            w = torch.ones(num_classes) if weight is None else torch.as_tensor(np.asarray(weight), dtype=torch.float32)
            if w.shape != (num_classes,):
                raise ValueError(f"weight must have {num_classes} entries, got shape {tuple(w.shape)}")
            self.register_buffer("weight", w)

        def forward(self, logits, target):
            logp = torch.log_softmax(logits.float(), dim=-1)
            t = _soft_targets(target, self.num_classes, self.label_smoothing)
            per_class = -logp * t * self.weight
            if self.gamma > 0:
                per_class = per_class * (1.0 - logp.exp()).pow(self.gamma)
            return per_class.sum(dim=-1).mean()

    return SoftTargetFocalLoss
