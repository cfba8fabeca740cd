"""Simulates the cascade from a score file: CNN only, every escalation budget, VLM always.

Policies and blenders are fitted and judged on different images by cross-fitting: the set is
split into stratified folds; for each fold the temperature (optionally), the blender, the
learned deferral rule, the conformal candidate sets and the thresholds are fitted on the other
folds, then applied to it. Every image thus gets an out-of-fold answer, and the metrics use all
of them. Every deferral rule is judged on the same folds with the same blender
(ensemble/deferral_comparison.py), and every row carries bootstrap intervals and a paired
difference from CNN-only (ensemble/bootstrap.py).

Conformal candidate sets offline: a score file holds the VLM's scores for the k candidates it
was asked about only, so a set is capped at that k here (the VLM's scores on the set's prefix
are renormalised, which approximates asking it about the prefix alone); coverage and set size
are reported both uncapped (the CNN alone decides them) and capped at k.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.blender_registry import BlenderName, make_fitted_blender
from catcascade.ensemble.blending import blend_first
from catcascade.ensemble.bootstrap import METRICS, Resampler, interval, metric_samples, paired_difference
from catcascade.ensemble.candidate_sets import coverage, fit_candidate_sets, sizes_for, true_ranks
from catcascade.ensemble.config import BlendConfig, CascadeConfig, LearnedDeferralParams
from catcascade.ensemble.deferral_comparison import CURVE_BUDGETS, RULES, RuleCurve, compare_rules
from catcascade.ensemble.escalation_policy import EscalationPolicy
from catcascade.ensemble.learned_deferral import LearnedDeferral
from catcascade.ensemble.metrics import ClassificationSummary, minority_classes, summarize
from catcascade.ensemble.policy_fitting import Objective, fit_escalation
from catcascade.ensemble.score_files import ScoreSet
from catcascade.ensemble.temperature import TemperatureScaler

DEFAULT_BUDGETS = (0.0, 0.05, 0.10, 0.20, 0.30, 0.50, 1.0)
Deferral = Literal["top1", "margin", "entropy", "learned"]


@dataclass(frozen=True)
class OfflineEvalConfig:
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    metric: Deferral = "top1"
    """The deferral rule of the main table's cascade rows."""
    blender: BlenderName = "log_linear"
    objective: Objective = "rate"
    minority_boost: float = 1.0
    folds: int = 2
    refit_temperature: bool = False
    """Refit the CNN temperature on each fitting part instead of using the bundle's."""
    seed: int = 0
    rules: tuple[str, ...] = RULES
    """Deferral rules compared on the curve (rate objective, the budgets of ``curve_budgets``)."""
    curve_budgets: tuple[float, ...] = CURVE_BUDGETS
    learned_C: float = 1.0
    """Inverse regularisation of the learned deferral rule's logistic regression."""
    conformal_alpha: float | None = 0.1
    """Conformal candidate sets with this miscoverage (None: no conformal rows)."""
    conformal_method: Literal["aps", "raps"] = "raps"
    conformal_max_size: int = 5
    bootstrap: int = 1000
    """Bootstrap resamples for the intervals (0: none)."""

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0.0 <= b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets are fractions in [0, 1], got {self.budgets}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2 (fit and evaluate on different images), got {self.folds}")
        unknown = [r for r in (*self.rules, self.metric) if r not in RULES]
        if unknown:
            raise ValueError(f"unknown deferral rule(s) {unknown} (expected {', '.join(RULES)})")
        if self.conformal_alpha is not None and not 0.0 < self.conformal_alpha < 1.0:
            raise ValueError(f"conformal_alpha is a miscoverage rate in (0, 1), got {self.conformal_alpha}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")


@dataclass
class SystemResult:
    """One row of the comparison: a system's out-of-fold answers and their metrics."""

    name: str
    budget: float | None
    escalation_rate: float
    vlm_calls_per_1000: float
    summary: ClassificationSummary
    probs: np.ndarray = field(repr=False)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap 95% interval of each metric."""
    vs_cnn: dict[str, dict] = field(default_factory=dict)
    """Paired bootstrap difference from CNN-only, per metric (PairedDifference.to_dict())."""

    def to_dict(self) -> dict:
        return {"name": self.name, "budget": self.budget, "escalation_rate": self.escalation_rate,
                "vlm_calls_per_1000": self.vlm_calls_per_1000, **self.summary.to_dict(), "ci": self.ci,
                "vs_cnn": self.vs_cnn}


@dataclass
class OfflineEvalResult:
    systems: list[SystemResult]
    labels: np.ndarray
    label_names: list[str]
    minority: list[int]
    fitted: list[dict]
    """Per fold: the fitted temperature, blender, thresholds, learned rule and candidate sets."""
    notes: list[str] = field(default_factory=list)
    deferral: dict = field(default_factory=dict)
    """The rules compared (deferral_comparison.compare_rules); empty without VLM scores."""
    conformal: dict | None = None
    """Out-of-fold coverage and size of the conformal candidate sets, beside top-k."""
    bootstrap: int = 0

    def system(self, name: str) -> SystemResult:
        for s in self.systems:
            if s.name == name:
                return s
        raise KeyError(f"no system named {name!r}; have {[s.name for s in self.systems]}")

    def to_dict(self) -> dict:
        return {"systems": [s.to_dict() for s in self.systems], "n": int(len(self.labels)),
                "label_names": self.label_names, "minority_classes": self.minority, "fitted": self.fitted,
                "notes": self.notes, "deferral": self.deferral, "conformal": self.conformal,
                "bootstrap_resamples": self.bootstrap}


def cascade_name(budget: float, prefix: str = "cascade") -> str:
    return f"{prefix}@{budget * 100:g}%"


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


def fit_learned_rule(cnn_probs: np.ndarray, escalated_probs: np.ndarray, y: np.ndarray, has: np.ndarray,
                     C: float = 1.0, top_k: int = 3) -> LearnedDeferralParams:
    """The learned deferral rule, fitted on the rows where the VLM answered."""
    return LearnedDeferral(C=C, top_k=top_k).fit(cnn_probs[has], escalated_probs[has], y[has]).params_


class _Fold:
    """What one fold's fitting part yields, applied to its evaluation part."""

    def __init__(self, cfg: OfflineEvalConfig, scores: ScoreSet, p_all: np.ndarray, train: np.ndarray,
                 test: np.ndarray, info: dict):
        self.cfg, self.scores, self.p, self.train, self.test, self.info = cfg, scores, p_all, train, test, info
        self.y = scores.labels
        self.has = scores.has_vlm

    def escalations(self, metric: str, budget: float, escalated: np.ndarray, learned, objective: str,
                    boost: float, eligible: np.ndarray | None = None, record: str | None = None) -> np.ndarray:
        """The test part's AUTO decisions of ``metric`` fitted to ``budget`` on the train part."""
        tr, te = self.train, self.test
        if budget >= 1.0:
            esc = np.ones(len(te), dtype=bool)
        else:
            pc = fit_escalation(self.p[tr], budget, metric, objective, self.y[tr], escalated[tr], boost,
                                learned=learned, eligible=None if eligible is None else eligible[tr])
            esc = EscalationPolicy(pc).escalate_mask(self.p[te])
            if record:
                self.info["thresholds"][record] = pc.model_dump(mode="json", exclude={"learned"})
        if eligible is not None:
            esc &= eligible[te]
        return esc & self.has[te]  # an image whose VLM call failed is answered by the CNN alone


def evaluate_offline(scores: ScoreSet, cfg: OfflineEvalConfig = OfflineEvalConfig()) -> OfflineEvalResult:
    y, n, c = scores.labels, len(scores), scores.num_classes
    if n < 2 * cfg.folds:
        raise ValueError(f"{n} scored images are too few for {cfg.folds}-fold cross-fitting")
    minority = minority_classes(y, c)
    has = scores.has_vlm
    k = scores.top_k
    reqs = float(scores.meta.get("vlm_requests_per_image", 1))
    probs_cnn = np.zeros((n, c))
    rows = {name: (np.zeros((n, c)), np.zeros(n, dtype=bool)) for name in
            [cascade_name(b) for b in cfg.budgets] + [cascade_name(b, "conformal") for b in cfg.budgets]}
    curve_esc = {r: np.zeros((len(cfg.curve_budgets), n), dtype=bool) for r in cfg.rules}
    blended_oof = np.zeros((n, c))
    sizes_oof = np.zeros(n, dtype=np.int64)
    fitted, notes = [], []
    use_vlm = has.sum() >= 2 * cfg.folds
    if not use_vlm:
        notes.append(f"only {int(has.sum())} images have VLM scores: the cascade and VLM-always rows are left out "
                     "(score with --vlm-url to include them)")
    need_learned = "learned" in cfg.rules or cfg.metric == "learned"
    for fold, test in enumerate(_folds(y, cfg.folds, cfg.seed)):
        train = np.setdiff1d(np.arange(n), test)
        temperature = scores.temperature
        if cfg.refit_temperature:
            temperature = TemperatureScaler().fit(scores.cnn_logits[train], y[train]).temperature_
        p_all = scores.cnn_probs(temperature)
        probs_cnn[test] = p_all[test]
        info: dict = {"fold": fold, "n_fit": int(len(train)), "n_eval": int(len(test)), "temperature": temperature}
        sets = None
        if cfg.conformal_alpha is not None:
            sets = fit_candidate_sets(p_all[train], y[train], cfg.conformal_alpha, cfg.conformal_method,
                                      cfg.conformal_max_size, seed=cfg.seed)
            sizes_oof[test] = sizes_for(sets, p_all[test])
            info["candidate_sets"] = sets.model_dump(mode="json")
        if use_vlm:
            blender = make_fitted_blender(cfg.blender, p_all[train], scores.vlm_candidates[train],
                                          scores.vlm_scores[train], y[train])
            blended = blender.blend_batch(p_all, scores.vlm_candidates, scores.vlm_scores)
            blended_oof[test] = blended[test]
            info["blender"] = blender.to_dict()
            info["thresholds"] = {}
            learned = None
            if need_learned:
                learned = fit_learned_rule(p_all[train], blended[train], y[train], has[train], cfg.learned_C, k)
                info["learned"] = learned.model_dump(mode="json")
            f = _Fold(cfg, scores, p_all, train, test, info)
            rule_learned = learned if cfg.metric == "learned" else None
            for b in cfg.budgets:
                esc = f.escalations(cfg.metric, b, blended, rule_learned, cfg.objective, cfg.minority_boost,
                                    record=cascade_name(b))
                probs, mask = rows[cascade_name(b)]
                mask[test], probs[test] = esc, np.where(esc[:, None], blended[test], p_all[test])
            if sets is not None:
                sizes_k = np.minimum(sizes_for(sets, p_all), k)
                blended_sets = blend_first(blender, p_all, scores.vlm_candidates, scores.vlm_scores, sizes_k)
                eligible = sizes_k > 1
                for b in cfg.budgets:
                    esc = f.escalations(cfg.metric, b, blended_sets, rule_learned, cfg.objective, cfg.minority_boost,
                                        eligible=eligible, record=cascade_name(b, "conformal"))
                    probs, mask = rows[cascade_name(b, "conformal")]
                    mask[test], probs[test] = esc, np.where(esc[:, None], blended_sets[test], p_all[test])
            for r in cfg.rules:
                for j, b in enumerate(cfg.curve_budgets):
                    curve_esc[r][j, test] = f.escalations(r, b, blended, learned if r == "learned" else None,
                                                          "rate", cfg.minority_boost)
        fitted.append(info)

    resampler = Resampler(n, cfg.bootstrap, cfg.seed) if cfg.bootstrap else None
    cnn = SystemResult("cnn-only", 0.0, 0.0, 0.0, summarize(probs_cnn, y, minority), probs_cnn)
    systems = [cnn]
    deferral: dict = {}
    if use_vlm:
        for prefix in ("cascade", "conformal") if cfg.conformal_alpha is not None else ("cascade",):
            for b in cfg.budgets:
                probs, mask = rows[cascade_name(b, prefix)]
                rate = float(mask.mean())
                systems.append(SystemResult(cascade_name(b, prefix), b, rate, rate * 1000.0 * reqs,
                                            summarize(probs, y, minority), probs))
        vlm = vlm_only_probs(scores, probs_cnn)
        rate = float(has.mean())
        systems.append(SystemResult("vlm-always", 1.0, rate, rate * 1000.0 * reqs, summarize(vlm, y, minority), vlm))
        if cfg.rules:
            cnn_ok = probs_cnn.argmax(axis=1) == y
            curves = [RuleCurve(r, tuple(cfg.curve_budgets), curve_esc[r],
                                np.where(curve_esc[r], blended_oof.argmax(axis=1) == y, cnn_ok)) for r in cfg.rules]
            deferral = compare_rules(curves, y, c, cnn_ok, resampler, tuple(cfg.budgets))
            deferral["metric_in_table"] = cfg.metric
    if resampler is not None:
        _add_intervals(systems, y, minority, resampler)
    conformal = None
    if cfg.conformal_alpha is not None:
        conformal = _conformal_summary(probs_cnn, y, sizes_oof, k, cfg, resampler)
        notes.append(f"conformal rows: candidate sets capped at the {k} candidates the score file holds VLM scores "
                     f"for (sets of one are answered by the CNN); coverage and size are reported uncapped too")
        unreachable = [f["fold"] for f in fitted if not f["candidate_sets"]["fit_summary"]["reachable"]]
        if unreachable:
            beyond = max(f["candidate_sets"]["fit_summary"]["truth_beyond_cap"] for f in fitted)
            notes.append(f"conformal sets cannot reach {100 * (1 - cfg.conformal_alpha):g}% coverage within "
                         f"{cfg.conformal_max_size} breeds when calibrated on the fitting part of fold(s) "
                         f"{', '.join(map(str, unreachable))} (the CNN ranks the truth lower for up to "
                         f"{100 * beyond:.0f}% of those images): there every set is {cfg.conformal_max_size} "
                         "breeds long")
    if not len(minority):
        notes.append("every class has the same support: no minority classes, minority recall is n/a")
    return OfflineEvalResult(systems, y, scores.label_names, [int(m) for m in minority], fitted, notes, deferral,
                             conformal, cfg.bootstrap)


def _add_intervals(systems: list[SystemResult], y: np.ndarray, minority: np.ndarray, resampler: Resampler) -> None:
    """Bootstrap intervals on every metric of every row, and each row's paired difference from
    CNN-only (the same resamples for all rows)."""
    ref = metric_samples(systems[0].probs, y, minority, resampler)
    for s in systems:
        samples = ref if s is systems[0] else metric_samples(s.probs, y, minority, resampler)
        observed = s.summary.to_dict()
        base = systems[0].summary.to_dict()
        for m in METRICS:
            if observed.get(m) is None:
                continue
            s.ci[m] = interval(samples[m])
            if s is not systems[0]:
                s.vs_cnn[m] = paired_difference(observed[m] - base[m], samples[m], ref[m]).to_dict()


def _conformal_summary(probs: np.ndarray, y: np.ndarray, sizes: np.ndarray, k: int, cfg: OfflineEvalConfig,
                       resampler: Resampler | None) -> dict:
    ranks = true_ranks(probs, y)
    capped = np.minimum(sizes, k)
    rows = {f"conformal (max {cfg.conformal_max_size})": sizes, f"conformal capped at {k}": capped,
            f"top-{k}": np.full(len(y), k)}
    out = {"alpha": cfg.conformal_alpha, "target_coverage": 1.0 - cfg.conformal_alpha, "method": cfg.conformal_method,
           "max_size": cfg.conformal_max_size, "scored_k": k, "sets": {}}
    for name, s in rows.items():
        covered = (ranks <= s).astype(np.float64)
        entry = {"coverage": coverage(probs, y, s), "mean_size": float(np.mean(s)),
                 "size_counts": {int(v): int((s == v).sum()) for v in np.unique(s)}}
        if resampler is not None:
            both = resampler.samples(lambda w: np.stack([w @ covered, w @ s.astype(np.float64)], axis=1)
                                     / w.sum(axis=1, keepdims=True))
            entry["coverage_ci"], entry["mean_size_ci"] = interval(both[:, 0]), interval(both[:, 1])
        out["sets"][name] = entry
    return out


def fit_cascade(scores: ScoreSet, budget: float, blender: BlenderName = "log_linear",
                metric: Deferral = "top1", objective: Objective = "rate",
                minority_boost: float = 1.0, base: CascadeConfig | None = None, learned_C: float = 1.0,
                conformal_alpha: float | None = None, conformal_method: Literal["aps", "raps"] = "raps",
                conformal_max_size: int = 5) -> CascadeConfig:
    """Fits blender, deferral rule, thresholds (and optionally conformal candidate sets) on a
    whole score file: the cascade settings for a bundle."""
    has = scores.has_vlm
    if not has.any():
        raise ValueError("the score file has no VLM scores: run `catcascade score` with --vlm-url")
    p = scores.cnn_probs()
    fitted = make_fitted_blender(blender, p, scores.vlm_candidates, scores.vlm_scores, scores.labels)
    blended = fitted.blend_batch(p, scores.vlm_candidates, scores.vlm_scores)
    learned = None
    if metric == "learned":
        learned = fit_learned_rule(p, blended, scores.labels, has, learned_C, scores.top_k)
    sets, eligible, escalated = None, None, blended
    if conformal_alpha is not None:
        if blender == "stacking":  # the stacker scores at most the candidates it was fitted on
            conformal_max_size = min(conformal_max_size, scores.top_k)
        sets = fit_candidate_sets(p, scores.labels, conformal_alpha, conformal_method, conformal_max_size)
        sizes_k = np.minimum(sizes_for(sets, p), scores.top_k)
        escalated = blend_first(fitted, p, scores.vlm_candidates, scores.vlm_scores, sizes_k)
        eligible = sizes_k > 1
    esc = fit_escalation(p, budget, metric, objective, scores.labels, escalated, minority_boost, learned=learned,
                         eligible=eligible)
    base = base or CascadeConfig()
    blend = fitted.config if blender == "log_linear" else fitted.to_config()
    return base.model_copy(update={"top_k": scores.top_k, "escalation": esc, "blend": blend, "candidate_sets": sets})
