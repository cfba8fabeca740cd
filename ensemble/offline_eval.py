"""Simulates the cascade from a score file: CNN only, every escalation budget, VLM always.

Policies and blenders are fitted and judged on different images by cross-fitting: the set is
split into stratified folds; for each fold the temperature (optionally), the blender and the
thresholds are fitted on the other folds, then applied to it. Every image thus gets an
out-of-fold answer, and the metrics use all of them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ensemble.blender import LogLinearBlender
from ensemble.blender_registry import BlenderName, make_fitted_blender
from ensemble.config import BlendConfig, CascadeConfig
from ensemble.escalation_policy import EscalationPolicy
from ensemble.metrics import ClassificationSummary, minority_classes, summarize
from ensemble.policy_fitting import Objective, fit_escalation
from ensemble.score_files import ScoreSet
from ensemble.temperature import TemperatureScaler

DEFAULT_BUDGETS = (0.0, 0.05, 0.10, 0.20, 0.30, 0.50, 1.0)


@dataclass(frozen=True)
class OfflineEvalConfig:
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    metric: Literal["top1", "margin", "entropy"] = "top1"
    blender: BlenderName = "log_linear"
    objective: Objective = "rate"
    minority_boost: float = 1.0
    folds: int = 2
    refit_temperature: bool = False
    """Refit the CNN temperature on each fitting part instead of using the bundle's."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0.0 <= b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets are fractions in [0, 1], got {self.budgets}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2 (fit and evaluate on different images), got {self.folds}")


@dataclass
class SystemResult:
    """One row of the comparison: a system's out-of-fold answers and their metrics."""

    name: str
    budget: float | None
    escalation_rate: float
    vlm_calls_per_1000: float
    summary: ClassificationSummary
    probs: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "budget": self.budget, "escalation_rate": self.escalation_rate,
                "vlm_calls_per_1000": self.vlm_calls_per_1000, **self.summary.to_dict()}


@dataclass
class OfflineEvalResult:
    systems: list[SystemResult]
    labels: np.ndarray
    label_names: list[str]
    minority: list[int]
    fitted: list[dict]
    """Per fold: the fitted temperature, blender and thresholds."""
    notes: list[str] = field(default_factory=list)

    def system(self, name: str) -> SystemResult:
        for s in self.systems:
            if s.name == name:
                return s
        raise KeyError(f"no system named {name!r}; have {[s.name for s in self.systems]}")

    def to_dict(self) -> dict:
        return {"systems": [s.to_dict() for s in self.systems], "n": int(len(self.labels)),
                "label_names": self.label_names, "minority_classes": self.minority, "fitted": self.fitted,
                "notes": self.notes}


def cascade_name(budget: float) -> str:
    return f"cascade@{budget * 100:g}%"


def _folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y)
    if counts[counts > 0].min() >= k:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [test for _, test in splitter.split(np.zeros(len(y)), y)]


def vlm_only_probs(scores: ScoreSet, cnn_probs: np.ndarray) -> np.ndarray:
    """The VLM's own verdict over the CNN's top-k (weight 1); CNN mass outside it is kept."""
    return LogLinearBlender(BlendConfig(weight=1.0)).blend_batch(cnn_probs, scores.vlm_candidates, scores.vlm_scores)


def evaluate_offline(scores: ScoreSet, cfg: OfflineEvalConfig = OfflineEvalConfig()) -> OfflineEvalResult:
    y, n, c = scores.labels, len(scores), scores.num_classes
    if n < 2 * cfg.folds:
        raise ValueError(f"{n} scored images are too few for {cfg.folds}-fold cross-fitting")
    minority = minority_classes(y, c)
    has = scores.has_vlm
    reqs = float(scores.meta.get("vlm_requests_per_image", 1))
    probs_cnn = np.zeros((n, c))
    probs_budget = {b: np.zeros((n, c)) for b in cfg.budgets}
    escalated = {b: np.zeros(n, dtype=bool) for b in cfg.budgets}
    fitted, notes = [], []
    use_vlm = has.sum() >= 2 * cfg.folds
    if not use_vlm:
        notes.append(f"only {int(has.sum())} images have VLM scores: the cascade and VLM-always rows are left out "
                     "(score with --vlm-url to include them)")
    for fold, test in enumerate(_folds(y, cfg.folds, cfg.seed)):
        train = np.setdiff1d(np.arange(n), test)
        temperature = scores.temperature
        if cfg.refit_temperature:
            temperature = TemperatureScaler().fit(scores.cnn_logits[train], y[train]).temperature_
        p_all = scores.cnn_probs(temperature)
        probs_cnn[test] = p_all[test]
        info: dict = {"fold": fold, "n_fit": int(len(train)), "n_eval": int(len(test)), "temperature": temperature}
        if use_vlm:
            blender = make_fitted_blender(cfg.blender, p_all[train], scores.vlm_candidates[train],
                                          scores.vlm_scores[train], y[train])
            blended = blender.blend_batch(p_all, scores.vlm_candidates, scores.vlm_scores)
            info["blender"] = blender.to_dict()
            info["thresholds"] = {}
            for b in cfg.budgets:
                if b >= 1.0:
                    esc = np.ones(len(test), dtype=bool)
                else:
                    policy_cfg = fit_escalation(p_all[train], b, cfg.metric, cfg.objective, y[train],
                                                blended[train], cfg.minority_boost)
                    esc = EscalationPolicy(policy_cfg).escalate_mask(p_all[test])
                    info["thresholds"][cascade_name(b)] = policy_cfg.model_dump(mode="json")
                esc &= has[test]  # an image whose VLM call failed is answered by the CNN alone
                escalated[b][test] = esc
                probs_budget[b][test] = np.where(esc[:, None], blended[test], p_all[test])
        fitted.append(info)

    systems = [SystemResult("cnn-only", 0.0, 0.0, 0.0, summarize(probs_cnn, y, minority), probs_cnn)]
    if use_vlm:
        for b in cfg.budgets:
            rate = float(escalated[b].mean())
            systems.append(SystemResult(cascade_name(b), b, rate, rate * 1000.0 * reqs,
                                        summarize(probs_budget[b], y, minority), probs_budget[b]))
        vlm = vlm_only_probs(scores, probs_cnn)
        rate = float(has.mean())
        systems.append(SystemResult("vlm-always", 1.0, rate, rate * 1000.0 * reqs, summarize(vlm, y, minority), vlm))
    if not len(minority):
        notes.append("every class has the same support: no minority classes, minority recall is n/a")
    return OfflineEvalResult(systems, y, scores.label_names, [int(m) for m in minority], fitted, notes)


def fit_cascade(scores: ScoreSet, budget: float, blender: BlenderName = "log_linear",
                metric: Literal["top1", "margin", "entropy"] = "top1", objective: Objective = "rate",
                minority_boost: float = 1.0, base: CascadeConfig | None = None) -> CascadeConfig:
    """Fits blender and thresholds on a whole score file: the cascade settings for a bundle."""
    has = scores.has_vlm
    if not has.any():
        raise ValueError("the score file has no VLM scores: run `catcascade score` with --vlm-url")
    p = scores.cnn_probs()
    fitted = make_fitted_blender(blender, p, scores.vlm_candidates, scores.vlm_scores, scores.labels)
    blended = fitted.blend_batch(p, scores.vlm_candidates, scores.vlm_scores)
    esc = fit_escalation(p, budget, metric, objective, scores.labels, blended, minority_boost)
    base = base or CascadeConfig()
    blend = fitted.config if blender == "log_linear" else fitted.to_config()
    return base.model_copy(update={"top_k": scores.top_k, "escalation": esc, "blend": blend})
