"""Conformal candidate sets: how many of the CNN's top breeds the VLM is asked about.

A fixed top-3 misses the true breed whenever the CNN ranks it fourth, and then the VLM cannot
rescue it; a confident image does not need three. Split conformal prediction picks, per image,
the shortest prefix of the CNN's ranking that covers the true breed with probability 1 - alpha
on exchangeable data.

Score of class y at rank r (1-based) of the calibrated distribution p (sorted, p_(1) >= ...):

    s(x, y) = p_(1) + ... + p_(r-1)  +  lam * max(0, r - k_reg)

that is APS (Romano, Sesia & Candes, NeurIPS 2020) with the mass strictly above y (the U = 0 end
of their randomised score), plus the RAPS rank penalty (Angelopoulos, Bates, Malik & Jordan,
ICLR 2021, "Uncertainty Sets for Image Classifiers using Conformal Prediction", eq. 4 and
Algorithm 2; lam = 0 is APS). ``qhat`` is the ceil((n + 1)(1 - alpha))-th smallest true-class
score on held-out calibration images, and the set is every class with s <= qhat, which is a
prefix of the ranking since s grows with r. Sets are capped at ``max_size``: on calibration,
a true class ranked beyond the cap scores +inf, so the cap is accounted for (when more than
alpha of the images rank the truth beyond it, the guarantee cannot be met and the set is always
``max_size`` long: ``fit_summary["reachable"]`` is False).

Deterministic on purpose (the same image always gets the same set, as serving must): the top-1
scores 0 and always belongs to the set, so sets are never empty, and when the CNN's top-1
accuracy already exceeds 1 - alpha, qhat is 0 and coverage is that accuracy (conservative).
Randomised APS (MAPIE's default) is exact in expectation but gives one image different sets
on different calls. RAPS's lam and k_reg are tuned on a split of the calibration images
(k_reg: the (1 - alpha) quantile of the true class's rank; lam: the grid value giving the
smallest mean set), and qhat is calibrated on the rest, as the paper does.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from catcascade.ensemble.config import CandidateSetConfig

LAMBDA_GRID = (0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
_NEVER = 1e9  # qhat when the guarantee cannot be met within the cap (JSON has no infinity)


def _ranked(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, exclusive cumulative mass in that order) of (N, C) probabilities; the order is the
    CNN's ranking with ties broken as serving's top_k does (stable)."""
    p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    return order, np.cumsum(sorted_p, axis=1) - sorted_p


def true_ranks(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1-based rank of the true class in the CNN's ranking."""
    order, _ = _ranked(probs)
    return np.argmax(order == np.asarray(y)[:, None], axis=1) + 1


def conformity_scores(probs: np.ndarray, y: np.ndarray, lam: float = 0.0, k_reg: int = 1,
                      max_size: int | None = None) -> np.ndarray:
    """s(x, y) of each image's true class; +inf where it ranks beyond ``max_size``."""
    order, excl = _ranked(probs)
    rank = np.argmax(order == np.asarray(y)[:, None], axis=1)  # 0-based
    s = excl[np.arange(len(rank)), rank] + lam * np.maximum(0, rank + 1 - k_reg)
    if max_size is not None:
        s = np.where(rank + 1 > max_size, np.inf, s)
    return s


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest score (+inf when that rank exceeds n)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(np.ceil((len(s) + 1) * (1.0 - alpha)))
    return float(s[k - 1]) if 1 <= k <= len(s) else float("inf")


def set_sizes(probs: np.ndarray, qhat: float, lam: float = 0.0, k_reg: int = 1, max_size: int = 5) -> np.ndarray:
    """(N,) how many of each image's top classes form its candidate set (1..max_size)."""
    _, excl = _ranked(probs)
    ranks = np.arange(1, excl.shape[1] + 1)
    s = excl + lam * np.maximum(0, ranks - k_reg)
    return np.clip((s <= qhat + 1e-12).sum(axis=1), 1, max_size)


def sizes_for(config: CandidateSetConfig, probs: np.ndarray) -> np.ndarray:
    """Set sizes a cascade config's candidate sets give (N, C) probabilities."""
    return set_sizes(probs, config.qhat, config.lam, config.k_reg, config.max_size)


def set_size(config: CandidateSetConfig, probs: np.ndarray) -> int:
    """One image's set size (what serving asks per request)."""
    return int(sizes_for(config, np.asarray(probs)[None, :])[0])


def coverage(probs: np.ndarray, y: np.ndarray, sizes: np.ndarray) -> float:
    """Share of images whose true class is within their set."""
    return float((true_ranks(probs, y) <= np.asarray(sizes)).mean())


def fit_candidate_sets(probs: np.ndarray, y: np.ndarray, alpha: float = 0.1,
                       method: Literal["aps", "raps"] = "raps", max_size: int = 5, lam: float | None = None,
                       k_reg: int | None = None, tune_fraction: float = 0.3, seed: int = 0,
                       skip_singletons: bool = True) -> CandidateSetConfig:
    """Calibrates candidate sets on held-out calibrated CNN probabilities (N, C) and labels."""
    p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    y = np.asarray(y, dtype=np.int64)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha is a miscoverage rate in (0, 1), got {alpha}")
    if method not in ("aps", "raps"):
        raise ValueError(f"method must be 'aps' or 'raps', got {method!r}")
    if len(y) != len(p) or len(y) < 10:
        raise ValueError(f"candidate sets need at least 10 held-out labelled images, got {len(y)}")
    max_size = int(min(max_size, p.shape[1]))
    calib = np.arange(len(y))
    if method == "aps":
        lam, k_reg = 0.0, 1
    elif lam is None or k_reg is None:  # tune on one split, calibrate on the other
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(y))
        n_tune = max(5, int(round(tune_fraction * len(y))))
        tune, calib = perm[:n_tune], perm[n_tune:]
        if k_reg is None:
            k_reg = int(max(1, min(max_size, np.ceil(np.quantile(true_ranks(p[tune], y[tune]), 1.0 - alpha)))))
        if lam is None:
            best = None
            for cand in LAMBDA_GRID:
                q = conformal_quantile(conformity_scores(p[calib], y[calib], cand, k_reg, max_size), alpha)
                mean_size = set_sizes(p[tune], min(q, _NEVER), cand, k_reg, max_size).mean()
                if best is None or mean_size < best[0] - 1e-9:
                    best = (mean_size, cand)
            lam = best[1]
    qhat = conformal_quantile(conformity_scores(p[calib], y[calib], lam, k_reg, max_size), alpha)
    reachable = bool(np.isfinite(qhat))
    qhat = float(min(qhat, _NEVER))
    sizes = set_sizes(p[calib], qhat, lam, k_reg, max_size)
    summary = {"n_calibration": int(len(calib)), "n_tuning": int(len(y) - len(calib)), "reachable": reachable,
               "calibration_coverage": coverage(p[calib], y[calib], sizes),
               "calibration_mean_size": float(sizes.mean()),
               "truth_beyond_cap": float((true_ranks(p[calib], y[calib]) > max_size).mean())}
    return CandidateSetConfig(method=method, alpha=alpha, qhat=qhat, lam=float(lam), k_reg=int(k_reg),
                              max_size=max_size, skip_singletons=skip_singletons, fit_summary=summary)
