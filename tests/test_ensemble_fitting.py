"""Metrics, threshold fitting, fitted blenders, score files and the offline cascade simulation,
on synthetic score sets with known structure (ensemble/synthetic_scores.py)."""
from __future__ import annotations

import numpy as np
import pytest

from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.blender_registry import make_blender
from catcascade.ensemble.config import BlendConfig, CascadeConfig, EscalationConfig
from catcascade.ensemble.escalation_policy import EscalationPolicy, EscalationReason, confidence_score, confidence_scores
from catcascade.ensemble.metrics import (aurc, balanced_accuracy, brier_score, confusion, expected_calibration_error, macro_f1,
                              minority_classes, per_class_recall, risk_coverage_curve, summarize, top_k_accuracy)
from catcascade.ensemble.offline_eval import OfflineEvalConfig, evaluate_offline, fit_cascade
from catcascade.ensemble.policy_fitting import fit_escalation, threshold_for_rate
from catcascade.ensemble.score_files import ScoreFileError, ScoreSet
from catcascade.ensemble.stacking import StackingBlender
from catcascade.ensemble.synthetic_scores import SyntheticScoreConfig, synthetic_score_set

NOISE = 0.01  # balanced-accuracy tolerance for "not worse" on 4,000 paired images
LEAN = dict(rules=(), conformal_alpha=None, bootstrap=0)  # the rows these tests look at, nothing else


@pytest.fixture(scope="module")
def strong():
    return synthetic_score_set(SyntheticScoreConfig(n=4000, vlm_signal=4.0, seed=1))


@pytest.fixture(scope="module")
def useless():
    return synthetic_score_set(SyntheticScoreConfig(n=4000, vlm_signal=0.0, seed=2))


# --- metrics -------------------------------------------------------------------------------

def test_metrics_on_a_hand_checked_example():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    y = np.array([0, 1, 1, 1])  # third and fourth wrong
    assert top_k_accuracy(probs, y, 1) == 0.5 and top_k_accuracy(probs, y, 2) == 1.0
    assert balanced_accuracy(probs, y) == pytest.approx((1.0 + 1 / 3) / 2)
    rec = per_class_recall(probs, y)
    assert rec[0] == 1.0 and rec[1] == pytest.approx(1 / 3) and np.isnan(rec[2])  # class 2 absent
    assert confusion(probs, y).tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    expected_brier = np.mean(((probs - np.eye(3)[y]) ** 2).sum(axis=1))
    assert brier_score(probs, y) == pytest.approx(expected_brier)
    assert 0 < macro_f1(probs, y) < 1
    cov, risk = risk_coverage_curve(probs, y)
    assert cov[-1] == 1.0 and risk[-1] == 0.5 and risk[0] == 0.0  # most confident answer (0.8) is right
    with pytest.raises(ValueError, match="labels"):
        balanced_accuracy(probs, np.array([0, 1, 5, 1]))


def test_aurc_rewards_confidence_that_ranks_errors_last():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    probs = rng.dirichlet(np.ones(4), 500)
    correct = probs.argmax(1) == y
    assert aurc(probs, y, confidence=correct.astype(float)) < aurc(probs, y, confidence=(~correct).astype(float))


def test_minority_classes_are_below_median_support():
    y = np.array([0] * 10 + [1] * 10 + [2] * 3 + [3] * 1)
    assert minority_classes(y, 5).tolist() == [2, 3]
    assert minority_classes(np.repeat(np.arange(4), 5), 4).tolist() == []
    s = summarize(np.eye(4)[np.repeat(np.arange(4), 5)], np.repeat(np.arange(4), 5))
    assert s.minority_recall is None and s.balanced_accuracy == 1.0 and s.ece == 0.0


def test_vectorised_confidence_matches_single():
    p = np.random.default_rng(1).dirichlet(np.ones(6), 20)
    for metric in ("top1", "margin", "entropy"):
        assert np.allclose(confidence_scores(p, metric), [confidence_score(r, metric) for r in p])


# --- escalation policy fitting -------------------------------------------------------------

@pytest.mark.parametrize("metric", ["top1", "margin", "entropy"])
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.3, 0.5])
def test_fitted_threshold_meets_budget_on_held_out_data(metric, budget):
    val = synthetic_score_set(SyntheticScoreConfig(n=3000, seed=10))
    test = synthetic_score_set(SyntheticScoreConfig(n=3000, seed=11))
    cfg = fit_escalation(val.cnn_probs(), budget, metric)
    held_out_rate = EscalationPolicy(cfg).escalate_mask(test.cnn_probs()).mean()
    assert abs(held_out_rate - budget) <= 0.02
    assert abs(cfg.fit_summary["validation_rate"] - budget) <= 0.005


def test_minority_boost_escalates_minority_classes_more_within_budget():
    val = synthetic_score_set(SyntheticScoreConfig(n=4000, seed=12, easy_fraction=0.5))
    test = synthetic_score_set(SyntheticScoreConfig(n=4000, seed=13, easy_fraction=0.5))
    cfg = fit_escalation(val.cnn_probs(), 0.2, "top1", y=val.labels, minority_boost=2.0)
    minority = cfg.fit_summary["minority_classes"]
    assert minority and set(cfg.class_thresholds) <= set(minority) and cfg.class_thresholds
    p = test.cnn_probs()
    esc = EscalationPolicy(cfg).escalate_mask(p)
    is_min = np.isin(p.argmax(1), minority)
    assert abs(esc.mean() - 0.2) <= 0.02
    assert esc[is_min].mean() > 1.5 * esc[~is_min].mean()
    # JSON round trip, and serving's per-image decide() agrees with the batch mask
    loaded = EscalationConfig.model_validate_json(cfg.model_dump_json())
    policy = EscalationPolicy(loaded)
    assert loaded.class_thresholds == cfg.class_thresholds
    assert [policy.decide(r).escalate for r in p[:300]] == esc[:300].tolist()


def test_balanced_accuracy_objective_never_exceeds_budget_and_beats_no_escalation(strong):
    p = strong.cnn_probs()
    blended = LogLinearBlender().fit(p, strong.vlm_candidates, strong.vlm_scores, strong.labels).blend_batch(
        p, strong.vlm_candidates, strong.vlm_scores)
    cfg = fit_escalation(p, 0.3, objective="balanced_accuracy", y=strong.labels, escalated_probs=blended)
    assert cfg.fit_summary["validation_rate"] <= 0.3 + 1e-9
    assert cfg.fit_summary["validation_balanced_accuracy"] > balanced_accuracy(p, strong.labels) + 0.03
    with pytest.raises(ValueError, match="escalated_probs"):
        fit_escalation(p, 0.3, objective="balanced_accuracy", y=strong.labels)
    with pytest.raises(ValueError, match="budget"):
        fit_escalation(p, 1.5)


def test_threshold_for_rate_edges():
    conf = np.array([0.1, 0.2, 0.3, 0.4])
    assert threshold_for_rate(conf, 0.0) == 0.0 and threshold_for_rate(conf, 1.0) == 1.0
    assert threshold_for_rate(conf, 0.5) == pytest.approx(0.25)


def test_old_escalation_settings_still_load_and_new_ones_validate():
    old = CascadeConfig.model_validate({"top_k": 3, "escalation": {"metric": "margin", "threshold": 0.2},
                                        "blend": {"weight": 0.7}})
    assert old.escalation.class_thresholds == {} and old.blend.method == "log_linear" and old.blend.temperature == 1.0
    cfg = EscalationConfig.model_validate_json('{"threshold": 0.5, "class_thresholds": {"2": 0.9}}')
    policy = EscalationPolicy(cfg)
    p = np.array([0.1, 0.1, 0.8])  # top-1 is class 2: its own threshold 0.9 applies
    assert policy.decide(p).escalate and policy.decide(p).reason == EscalationReason.LOW_CONFIDENCE
    assert not policy.decide(np.array([0.8, 0.1, 0.1])).escalate
    with pytest.raises(ValueError, match="class_thresholds"):
        EscalationConfig(class_thresholds={1: 1.5})
    with pytest.raises(ValueError, match="stacking"):
        BlendConfig(method="stacking")


# --- blenders ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["log_linear", "stacking"])
def test_fitted_blender_round_trips_through_json_and_keeps_outside_mass(kind, strong):
    p = strong.cnn_probs()
    blender = (LogLinearBlender() if kind == "log_linear" else StackingBlender()).fit(
        p, strong.vlm_candidates, strong.vlm_scores, strong.labels)
    cascade = CascadeConfig(blend=blender.config if kind == "log_linear" else blender.to_config())
    reloaded = make_blender(CascadeConfig.model_validate_json(cascade.model_dump_json()).blend)
    assert type(reloaded) is type(blender)
    out = blender.blend_batch(p[:50], strong.vlm_candidates[:50], strong.vlm_scores[:50])
    assert np.allclose(out, reloaded.blend_batch(p[:50], strong.vlm_candidates[:50], strong.vlm_scores[:50]))
    assert np.allclose(out.sum(axis=1), 1.0)
    outside = np.ones_like(p[:50], dtype=bool)
    outside[np.arange(50)[:, None], strong.vlm_candidates[:50]] = False
    assert np.allclose(out[outside], p[:50][outside])
    one = reloaded.blend(p[0], tuple(strong.vlm_candidates[0]), strong.vlm_scores[0])  # serving's call
    assert np.allclose(one, out[0])


def test_log_linear_weight_follows_vlm_quality(strong, useless):
    w_strong = LogLinearBlender().fit(strong.cnn_probs(), strong.vlm_candidates, strong.vlm_scores, strong.labels).weight_
    w_useless = LogLinearBlender().fit(useless.cnn_probs(), useless.vlm_candidates, useless.vlm_scores,
                                       useless.labels).weight_
    assert w_strong > 0.4 and w_useless < 0.15


def test_blenders_need_rows_where_both_stages_ran(strong):
    p = strong.cnn_probs()[:10]
    missing = np.full((10, 3), -1)
    for blender in (LogLinearBlender(), StackingBlender()):
        with pytest.raises(ValueError, match="both stages ran"):
            blender.fit(p, missing, np.full((10, 3), np.nan), strong.labels[:10])
    with pytest.raises(RuntimeError, match="not fitted"):
        StackingBlender().blend(p[0], (0, 1, 2), np.array([0.2, 0.3, 0.5]))


# --- the offline cascade: the acceptance criteria ---------------------------------

@pytest.mark.parametrize("blender", ["log_linear", "stacking"])
def test_uninformative_vlm_does_not_lower_balanced_accuracy(blender, useless):
    result = evaluate_offline(useless, OfflineEvalConfig(blender=blender, **LEAN))
    cnn = result.system("cnn-only").summary.balanced_accuracy
    assert result.system("vlm-always").summary.balanced_accuracy < cnn - 0.2  # the VLM alone is bad...
    for s in result.systems:
        if s.name.startswith("cascade@"):
            assert s.summary.balanced_accuracy >= cnn - NOISE, s.name  # ...and the blend ignores it


@pytest.mark.parametrize("blender", ["log_linear", "stacking"])
def test_strong_vlm_gain_is_mostly_recovered_at_30_percent(blender, strong):
    result = evaluate_offline(strong, OfflineEvalConfig(blender=blender, **LEAN))
    cnn = result.system("cnn-only").summary.balanced_accuracy
    at30 = result.system("cascade@30%")
    always = max(result.system("vlm-always").summary.balanced_accuracy,
                 result.system("cascade@100%").summary.balanced_accuracy)
    assert always - cnn > 0.03  # the VLM really helps on this set
    assert at30.summary.balanced_accuracy - cnn >= 0.9 * (always - cnn)
    assert abs(at30.escalation_rate - 0.3) <= 0.02 and at30.vlm_calls_per_1000 == pytest.approx(1000 * at30.escalation_rate)
    assert at30.summary.ece < 0.06  # re-calibrated: honest confidence after blending


def test_fit_cascade_gives_serving_settings(strong):
    cfg = fit_cascade(strong, 0.2, blender="stacking", minority_boost=1.5)
    assert cfg.blend.method == "stacking" and cfg.escalation.fit_summary["budget"] == 0.2
    rate = EscalationPolicy(cfg.escalation).escalate_mask(strong.cnn_probs()).mean()
    assert abs(rate - 0.2) <= 0.01


# --- score files ---------------------------------------------------------------------------

def test_score_file_round_trip(tmp_path, strong):
    part = strong.subset(np.arange(100))
    part.vlm_candidates[5] = -1
    part.vlm_scores[5] = np.nan
    path = part.save(tmp_path / "s.npz")
    back = ScoreSet.load(path)
    assert back.ids.tolist() == part.ids.tolist() and back.label_names == part.label_names
    assert np.array_equal(back.cnn_logits, part.cnn_logits) and back.temperature == part.temperature
    assert np.array_equal(back.vlm_candidates, part.vlm_candidates)
    assert back.has_vlm.sum() == 99 and not back.has_vlm[5]
    assert back.meta["format"] == "catcascade-scores" and back.meta["vlm_requests_per_image"] == 1
    assert len(ScoreSet.concat([back, back])) == 200


def test_score_file_errors(tmp_path, strong):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ScoreFileError, match="cannot read"):
        ScoreSet.load(tmp_path / "bad.npz")
    with pytest.raises(ScoreFileError, match="not found"):
        ScoreSet.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ScoreFileError, match="missing"):
        ScoreSet.load(tmp_path / "other.npz")
    with pytest.raises(ScoreFileError, match="cnn_logits"):
        ScoreSet(ids=["a", "b"], labels=[0, 1], label_names=["x", "y"], cnn_logits=np.zeros((2, 3)))
    other = strong.subset(np.arange(10))
    other.label_names = [n + "!" for n in other.label_names]
    with pytest.raises(ScoreFileError, match="disagree"):
        ScoreSet.concat([strong.subset(np.arange(10)), other])


def test_temperature_refit_per_fold_improves_ece_of_overconfident_scores():
    s = synthetic_score_set(SyntheticScoreConfig(n=2000, seed=3))
    s.cnn_logits *= 3.0  # over-confident CNN
    plain = evaluate_offline(s, OfflineEvalConfig(budgets=(0.0,), **LEAN)).system("cnn-only").summary.ece
    refit_cfg = OfflineEvalConfig(budgets=(0.0,), refit_temperature=True, **LEAN)
    refit = evaluate_offline(s, refit_cfg).system("cnn-only").summary.ece
    assert refit < plain / 2
    assert expected_calibration_error(s.cnn_probs(), s.labels) == pytest.approx(plain, abs=1e-12)
