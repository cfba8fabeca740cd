"""Learned deferral, conformal candidate sets and the bootstrap, on synthetic score sets built to
match each regime (ensemble/synthetic_scores.py): a uniformly better VLM, a specialist VLM that
knows a third of the breeds, and noisy labels on a third of the breeds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.blending import blend_first
from catcascade.ensemble.bootstrap import Resampler, _PerImage, interval, metric_samples, paired_difference
from catcascade.ensemble.candidate_sets import coverage, fit_candidate_sets, set_size, sizes_for, true_ranks
from catcascade.ensemble.config import CascadeConfig, EscalationConfig
from catcascade.ensemble.escalation_policy import EscalationMode, EscalationPolicy, EscalationReason
from catcascade.ensemble.learned_deferral import LearnedDeferral, escalation_gain, feature_names
from catcascade.ensemble.metrics import minority_classes, summarize
from catcascade.ensemble.offline_eval import OfflineEvalConfig, evaluate_offline, fit_cascade
from catcascade.ensemble.policy_fitting import fit_escalation
from catcascade.ensemble.stacking import StackingBlender
from catcascade.ensemble.synthetic_scores import SyntheticScoreConfig, synthetic_score_set
from catcascade.vlm_stage.prompts import NONE_OPTION, build_multiple_choice

# Look-alike families (the CNN hesitates between breeds of one family); the specialist knows
# whole families. Balanced classes: balanced accuracy is accuracy, where confidence deferral
# is the best rule for a uniformly better second model.
FAMILIES = dict(families=3, confusers=2, hard_boost=3.0, easy_fraction=0.5, imbalance=1.0)
CONFIDENCE = ("top1", "margin", "entropy")
GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def _compare(scores, bootstrap=0):
    cfg = OfflineEvalConfig(budgets=(0.2,), curve_budgets=GRID, conformal_alpha=None, bootstrap=bootstrap)
    return evaluate_offline(scores, cfg).deferral


def _at(d, rule, budget):
    return d["rules"][rule]["balanced_accuracy"][d["budgets"].index(budget)]


# --- the regimes: the acceptance criteria ------------------------------------------

def test_learned_deferral_matches_confidence_deferral_for_a_uniformly_better_vlm():
    for d in (_compare(synthetic_score_set(SyntheticScoreConfig(n=4000, seed=1))),  # the plain uniform set
              _compare(synthetic_score_set(SyntheticScoreConfig(n=4000, seed=1, regime="uniform", **FAMILIES)))):
        assert d["vlm_always_gain"] > 0.05
        for b in (0.1, 0.2, 0.3):
            best = max(_at(d, r, b) for r in CONFIDENCE)
            assert abs(_at(d, "learned", b) - best) <= 0.01, (b, _at(d, "learned", b), best)
        best_auc = max(d["rules"][r]["auc"] for r in CONFIDENCE)
        assert abs(d["rules"]["learned"]["auc"] - best_auc) <= 0.01


def test_learned_deferral_beats_confidence_deferral_for_a_specialist_vlm():
    s = synthetic_score_set(SyntheticScoreConfig(n=4000, seed=1, regime="specialist", **FAMILIES))
    assert len(s.meta["special_classes"]) == 4  # a third of the 12 breeds
    d = _compare(s, bootstrap=200)
    for rule in CONFIDENCE:
        assert _at(d, "learned", 0.2) - _at(d, rule, 0.2) >= 0.03, rule
        paired = d["learned_vs"][rule]["20%"]
        assert paired["significant"] and paired["low"] > 0  # not the luck of the draw
        assert d["rules"]["learned"]["auc"] > d["rules"][rule]["auc"]
        # and it needs far less of the budget to get 90% of what escalating everything gets
        assert d["rules"]["learned"]["rate_for_90pct_gain"] < 0.6 * d["rules"][rule]["rate_for_90pct_gain"]


def test_learned_deferral_is_not_worse_under_label_noise():
    s = synthetic_score_set(SyntheticScoreConfig(n=4000, seed=1, regime="noisy_labels", **FAMILIES))
    flipped = (s.labels != synthetic_score_set(SyntheticScoreConfig(n=4000, seed=1, **FAMILIES)).labels)
    assert 0.05 < flipped.mean() < 0.2  # half the labels of a third of the breeds, minus lucky draws
    d = _compare(s)
    for b in (0.1, 0.2, 0.3):
        assert _at(d, "learned", b) >= max(_at(d, r, b) for r in CONFIDENCE) - 0.01


def test_regimes_are_what_they_say():
    spec = synthetic_score_set(SyntheticScoreConfig(n=3000, seed=2, regime="specialist", **FAMILIES))
    known = np.isin(spec.labels, spec.meta["special_classes"])
    truth_first = spec.vlm_candidates == spec.labels[:, None]
    vlm_pick = np.where(truth_first.any(1), spec.vlm_scores.argmax(1) == truth_first.argmax(1), False)
    in_top = truth_first.any(1)
    assert vlm_pick[known & in_top].mean() > 0.9 and vlm_pick[~known & in_top].mean() < 0.5
    with pytest.raises(ValueError, match="regime"):
        SyntheticScoreConfig(regime="adversarial")
    with pytest.raises(ValueError, match="families"):
        SyntheticScoreConfig(families=5)


# --- the learned rule itself ---------------------------------------------------------------

def test_learned_rule_round_trips_through_json_and_serving_agrees():
    s = synthetic_score_set(SyntheticScoreConfig(n=2000, seed=3, regime="specialist", **FAMILIES))
    p = s.cnn_probs()
    blended = LogLinearBlender().fit(p, s.vlm_candidates, s.vlm_scores, s.labels).blend_batch(
        p, s.vlm_candidates, s.vlm_scores)
    rule = LearnedDeferral().fit(p, blended, s.labels)
    gains = escalation_gain(p, blended, s.labels)
    assert set(np.unique(gains)) <= {-1, 0, 1}
    pred = rule.predict_gain(p)
    assert pred.min() >= -1 and pred.max() <= 1
    assert pred[gains == 1].mean() > pred[gains == 0].mean()  # it ranks the images that gain first
    assert rule.params_.features == feature_names(12, 3) and len(rule.params_.coef) == 3
    cfg = fit_escalation(p, 0.2, "learned", learned=rule.params_)
    assert cfg.metric == "learned" and abs(cfg.fit_summary["validation_rate"] - 0.2) < 0.005
    loaded = CascadeConfig.model_validate_json(CascadeConfig(escalation=cfg).model_dump_json())
    policy = EscalationPolicy(loaded.escalation)
    mask = policy.escalate_mask(p)
    decisions = [policy.decide(row) for row in p[:200]]
    assert [d.escalate for d in decisions] == mask[:200].tolist()
    detail = next(d.detail for d in decisions if d.escalate)
    assert detail.startswith("learned deferral: predicted gain")
    assert "pickle" not in loaded.model_dump_json()  # plain numbers
    with pytest.raises(ValueError, match="fitted for 12 classes"):
        policy.decide(np.full(5, 0.2))
    with pytest.raises(ValueError, match="learned"):
        EscalationConfig(metric="learned")
    with pytest.raises(ValueError, match="learned deferral rule"):
        fit_escalation(p, 0.2, "learned")


def test_learned_rule_without_any_answer_change_predicts_no_gain():
    s = synthetic_score_set(SyntheticScoreConfig(n=300, seed=4))
    p = s.cnn_probs()
    rule = LearnedDeferral().fit(p, p, s.labels)  # escalating never changes an answer
    assert np.allclose(rule.predict_gain(p), 0.0)
    with pytest.raises(ValueError, match="held-out"):
        LearnedDeferral().fit(p[:5], p[:5], s.labels[:5])


# --- conformal candidate sets --------------------------------------------------------------

@pytest.mark.parametrize("method", ["aps", "raps"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_conformal_sets_reach_their_coverage_on_held_out_data(method, alpha):
    cal = synthetic_score_set(SyntheticScoreConfig(n=3000, seed=20, **FAMILIES))
    test = synthetic_score_set(SyntheticScoreConfig(n=3000, seed=21, **FAMILIES))
    cfg = fit_candidate_sets(cal.cnn_probs(), cal.labels, alpha, method, max_size=8)
    assert cfg.fit_summary["reachable"]
    sizes = sizes_for(cfg, test.cnn_probs())
    assert abs(coverage(test.cnn_probs(), test.labels, sizes) - (1 - alpha)) <= 0.02
    assert sizes.min() >= 1 and sizes.max() <= 8
    if alpha == 0.1:  # smaller than a fixed top-3 on average, at about the same coverage level
        assert sizes.mean() < 2.5


def test_candidate_sets_cap_and_edge_cases():
    s = synthetic_score_set(SyntheticScoreConfig(n=1000, seed=22, **FAMILIES))
    p, y = s.cnn_probs(), s.labels
    capped = fit_candidate_sets(p, y, alpha=0.01, method="aps", max_size=1)  # 99% with one breed: impossible
    assert not capped.fit_summary["reachable"] and (sizes_for(capped, p) == 1).all()
    cfg = fit_candidate_sets(p, y, alpha=0.1, method="raps", max_size=4)
    assert cfg.k_reg >= 1 and cfg.lam >= 0 and set_size(cfg, p[0]) == sizes_for(cfg, p[:1])[0]
    back = CascadeConfig.model_validate_json(CascadeConfig(candidate_sets=cfg).model_dump_json())
    assert (sizes_for(back.candidate_sets, p) == sizes_for(cfg, p)).all()
    assert (true_ranks(p, y) >= 1).all()
    with pytest.raises(ValueError, match="alpha"):
        fit_candidate_sets(p, y, alpha=1.5)
    with pytest.raises(ValueError, match="stacking"):
        CascadeConfig.model_validate({"candidate_sets": {**cfg.model_dump(), "max_size": 5}, "blend": {
            "method": "stacking", "stacking": {"features": ["a"], "mean": [0], "scale": [1], "coef": [1], "top_k": 3}}})


def test_offline_conformal_coverage_and_rows():
    s = synthetic_score_set(SyntheticScoreConfig(n=3000, seed=23, **FAMILIES))
    r = evaluate_offline(s, OfflineEvalConfig(budgets=(0.2, 1.0), rules=(), conformal_alpha=0.1, bootstrap=100))
    sets = r.conformal["sets"]
    assert abs(sets["conformal (max 5)"]["coverage"] - 0.9) <= 0.02
    assert sets["top-3"]["mean_size"] == 3.0 and sets["top-3"]["coverage"] > sets["conformal capped at 3"]["coverage"]
    lo, hi = sets["conformal (max 5)"]["coverage_ci"]
    assert lo <= sets["conformal (max 5)"]["coverage"] <= hi
    singletons = sets["conformal capped at 3"]["size_counts"].get(1, 0) / len(s)
    everything = r.system("conformal@100%")
    assert everything.escalation_rate == pytest.approx(1 - singletons)  # sets of one never go to the VLM
    assert any("capped at the 3 candidates" in n for n in r.notes)


def test_fit_cascade_with_learned_rule_and_candidate_sets():
    s = synthetic_score_set(SyntheticScoreConfig(n=2000, seed=24, regime="specialist", **FAMILIES))
    cfg = fit_cascade(s, 0.2, metric="learned", conformal_alpha=0.1)
    assert cfg.escalation.metric == "learned" and cfg.escalation.learned.num_classes == 12
    assert cfg.candidate_sets is not None and cfg.max_candidates == cfg.candidate_sets.max_size
    policy = EscalationPolicy(cfg.escalation)
    p = s.cnn_probs()
    sizes = np.minimum(sizes_for(cfg.candidate_sets, p), s.top_k)
    assert abs(policy.escalate_mask(p, sizes).mean() - 0.2) <= 0.01  # the budget counts real VLM calls only
    stacked = fit_cascade(s, 0.2, blender="stacking", conformal_alpha=0.1, conformal_max_size=6)
    assert stacked.candidate_sets.max_size == 3  # the stacker scores at most the candidates it was fitted on


# --- variable candidate counts through prompts, policy and blenders -------------------------

def test_prompt_blenders_and_policy_take_any_candidate_count():
    for n in (1, 2, 4, 7, 19):
        prompt = build_multiple_choice([f"Breed_{i}" for i in range(n)])
        assert len(prompt.choices) == n + 1 and prompt.after_image.count("\n") == n + 2
        assert prompt.after_image.splitlines()[-2].endswith(NONE_OPTION)
    with pytest.raises(ValueError, match="between 1 and 20"):
        build_multiple_choice([f"Breed_{i}" for i in range(20)])
    s = synthetic_score_set(SyntheticScoreConfig(n=600, seed=25))
    p, idx, vlm = s.cnn_probs(), s.vlm_candidates, s.vlm_scores
    blender = LogLinearBlender().fit(p, idx, vlm, s.labels)
    one = blender.blend(p[0], idx[0, :1], vlm[0, :1])
    assert np.allclose(one, p[0])  # blending over one candidate changes nothing
    two = blender.blend(p[0], idx[0, :2], vlm[0, :2])
    assert np.allclose(two.sum(), 1) and np.isclose(two[idx[0, :2]].sum(), p[0, idx[0, :2]].sum())
    sizes = np.random.default_rng(0).integers(1, 4, len(p))
    batch = blend_first(blender, p, idx, vlm, sizes)
    assert all(np.allclose(batch[i], blender.blend(p[i], idx[i, :sizes[i]], vlm[i, :sizes[i]])) for i in range(30))
    stacker = StackingBlender().fit(p, idx, vlm, s.labels)
    assert np.allclose(stacker.blend(p[1], idx[1, :2], vlm[1, :2]).sum(), 1)
    with pytest.raises(ValueError, match="top-3"):
        stacker.blend(p[1], (0, 1, 2, 3), np.full(4, 0.25))
    policy = EscalationPolicy(EscalationConfig(threshold=0.99))
    unsure = np.full(12, 1 / 12)
    skipped = policy.decide(unsure, EscalationMode.AUTO, set_size=1)
    assert not skipped.escalate and skipped.reason == EscalationReason.CONFIDENT and "one breed" in skipped.detail
    assert policy.decide(unsure, EscalationMode.AUTO, set_size=1, skip_singletons=False).escalate
    assert policy.decide(unsure, EscalationMode.ALWAYS, set_size=1).escalate
    assert policy.escalate_mask(np.stack([unsure] * 3), np.array([1, 2, 3])).tolist() == [False, True, True]


# --- bootstrap -----------------------------------------------------------------------------

def test_bootstrap_metrics_match_the_plain_metrics_and_pairing_works():
    s = synthetic_score_set(SyntheticScoreConfig(n=500, seed=26))
    p, y = s.cnn_probs(), s.labels
    m = minority_classes(y, 12)
    plain = summarize(p, y, m).to_dict()
    weighted = _PerImage(p, y, m).metrics(np.ones((1, len(y))))
    for k, v in weighted.items():
        assert v[0] == pytest.approx(plain[k], abs=1e-9), k
    idx = np.random.default_rng(1).integers(0, len(y), len(y))  # one explicit resample, as counts
    counts = np.bincount(idx, minlength=len(y))[None].astype(float)
    again = summarize(p[idx], y[idx], m).to_dict()
    for k, v in _PerImage(p, y, m).metrics(counts).items():
        assert v[0] == pytest.approx(again[k], abs=1e-9), k
    r = Resampler(len(y), 300, seed=7)
    a, b = metric_samples(p, y, m, r), metric_samples(p, y, m, r)
    assert np.array_equal(a["balanced_accuracy"], b["balanced_accuracy"])  # seeded: the same resamples
    lo, hi = interval(a["balanced_accuracy"])
    assert lo < plain["balanced_accuracy"] < hi and hi - lo < 0.15
    same = paired_difference(0.0, a["top1"], b["top1"])
    assert same.low == same.high == 0.0 and not same.significant
    worse = p.copy()
    worse[np.arange(0, len(y), 4)] = np.roll(worse[np.arange(0, len(y), 4)], 1, axis=1)
    d = paired_difference(0.0, metric_samples(worse, y, m, r)["top1"], a["top1"])
    assert d.significant and d.high < 0 and d.p_value < 0.01


def test_report_shows_intervals_and_rule_comparison(tmp_path):
    from benchmarks.accuracy import PLOTS, render_report

    s = synthetic_score_set(SyntheticScoreConfig(n=1200, seed=27, regime="specialist", **FAMILIES))
    r = evaluate_offline(s, OfflineEvalConfig(budgets=(0.0, 0.2, 1.0), curve_budgets=GRID, bootstrap=100))
    text = render_report(r, tmp_path).read_text()
    assert "## Deferral rules compared" in text and "## Conformal candidate sets" in text
    assert "| learned |" in text and "| conformal@20% |" in text
    row = next(line for line in text.splitlines() if line.startswith("| cascade@20% |"))
    assert row.count("[") >= 9  # an interval on every metric, and on the difference from CNN-only
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["bootstrap_resamples"] == 100 and set(data["deferral"]["rules"]) == {*CONFIDENCE, "learned"}
    for png in PLOTS:
        assert (tmp_path / png).stat().st_size > 10_000
