from __future__ import annotations

import re

import numpy as np
import pytest

from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.config import BlendConfig, CascadeConfig, EscalationConfig
from catcascade.ensemble.escalation_policy import EscalationMode, EscalationPolicy, EscalationReason, confidence_score
from catcascade.ensemble.metrics import expected_calibration_error
from catcascade.ensemble.temperature import TemperatureScaler
from catcascade.cnn_stage.topk import softmax


def _overconfident(n=3000, c=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), y] += 1.5
    return logits * 4.0, y  # sharpened: confident but often wrong


def test_temperature_scaling_lowers_ece_and_keeps_argmax():
    logits, y = _overconfident()
    scaler = TemperatureScaler().fit(logits, y)
    assert scaler.temperature_ > 1.5
    before = expected_calibration_error(TemperatureScaler(1.0).predict_proba(logits), y)
    after = expected_calibration_error(scaler.predict_proba(logits), y)
    assert after < before / 2
    assert (scaler.predict_proba(logits).argmax(1) == logits.argmax(1)).all()
    assert TemperatureScaler.from_dict(scaler.to_dict()).temperature_ == scaler.temperature_


def test_temperature_rejects_bad_shapes():
    with pytest.raises(ValueError):
        TemperatureScaler().fit(np.zeros((3, 2)), np.zeros(4, dtype=int))


@pytest.mark.parametrize("metric", ["top1", "margin", "entropy"])
def test_confidence_scores_order_sharp_above_flat(metric):
    sharp, flat = np.array([0.9, 0.05, 0.05]), np.array([0.34, 0.33, 0.33])
    assert 0 <= confidence_score(flat, metric) < confidence_score(sharp, metric) <= 1


def test_policy_modes():
    policy = EscalationPolicy(EscalationConfig(threshold=0.6))
    sure, unsure = np.array([0.8, 0.1, 0.1]), np.array([0.5, 0.3, 0.2])
    assert policy.decide(sure).reason == EscalationReason.CONFIDENT and not policy.decide(sure).escalate
    assert policy.decide(unsure).reason == EscalationReason.LOW_CONFIDENCE and policy.decide(unsure).escalate
    assert policy.decide(sure, EscalationMode.ALWAYS).escalate
    assert not policy.decide(unsure, EscalationMode.NEVER).escalate


def test_blender_keeps_outside_mass_and_follows_weight():
    p = np.array([0.5, 0.3, 0.1, 0.1])
    vlm = np.array([0.05, 0.9, 0.05])
    cands = (0, 1, 2)
    assert np.allclose(LogLinearBlender(BlendConfig(weight=0.0)).blend(p, cands, vlm), p)
    out = LogLinearBlender(BlendConfig(weight=1.0)).blend(p, cands, vlm)
    assert out.argmax() == 1 and np.isclose(out.sum(), 1.0) and np.isclose(out[3], 0.1)
    mid = LogLinearBlender(BlendConfig(weight=0.5)).blend(p, cands, vlm)
    assert out[1] > mid[1] > p[1]
    with pytest.raises(ValueError):
        LogLinearBlender().blend(p, cands, np.array([0.5, 0.5]))


def test_cascade_config_from_yaml(tmp_path):
    path = tmp_path / "cascade.yaml"
    path.write_text("top_k: 3\nescalation: {metric: margin, threshold: 0.2}\nblend: {weight: 0.7}\n")
    cfg = CascadeConfig.from_file(path)
    assert cfg.escalation.metric == "margin" and cfg.blend.weight == 0.7
    path.write_text("escalation: {threshold: 1.5}\n")
    with pytest.raises(ValueError, match="threshold"):
        CascadeConfig.from_file(path)


def _nll(logits, y, t):
    """Mean negative log-likelihood at temperature t, computed here independently."""
    from scipy.special import log_softmax

    return float(-log_softmax(np.asarray(logits, dtype=np.float64) / t, axis=1)[np.arange(len(y)), y].mean())


def _calibrated_at(temperature, n=4000, c=4, seed=1):
    """Labels drawn from softmax(logits / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3.0, (n, c))
    p = softmax(logits, temperature)
    y = (rng.random((n, 1)) > p.cumsum(axis=1)).sum(axis=1)  # one draw per row
    return logits, y


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_recovers_a_known_temperature_and_minimises_nll(true_t):
    logits, y = _calibrated_at(true_t)
    t = TemperatureScaler().fit(logits, y).temperature_
    assert t == pytest.approx(true_t, rel=0.1)
    assert _nll(logits, y, t) <= min(_nll(logits, y, t * 1.01), _nll(logits, y, t / 1.01)) + 1e-12
    # labels as floats and logits as ints are accepted (converted, not used as given)
    assert TemperatureScaler().fit(np.round(logits).astype(int), y.astype(float)).temperature_ == pytest.approx(
        TemperatureScaler().fit(np.round(logits), y).temperature_, rel=1e-6)


def test_temperature_is_row_wise_and_stable_for_huge_logits():
    """Shifting each row by its own constant changes nothing (softmax is per image), even by
    +-800 where a naive exp overflows or underflows."""
    logits, y = _calibrated_at(1.5, n=600)
    shift = np.where(np.arange(len(y)) % 2 == 0, 800.0, -800.0)[:, None]
    plain, shifted = TemperatureScaler().fit(logits, y), TemperatureScaler().fit(logits + shift, y)
    assert np.isfinite(shifted.temperature_) and shifted.temperature_ == pytest.approx(plain.temperature_, rel=1e-4)


def test_temperature_stays_within_its_bounds():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 500)
    noise = rng.normal(0, 1, (500, 3)) * 1000.0  # wildly overconfident and uninformative: T at its top bound
    assert TemperatureScaler().fit(noise, y).temperature_ == pytest.approx(20.0, rel=1e-3)
    exact = np.eye(3)[y] * 0.05  # always right but timid: T at its bottom bound
    assert TemperatureScaler().fit(exact, y).temperature_ == pytest.approx(0.05, rel=1e-3)


def test_temperature_defaults_and_single_sample():
    logits = np.array([[2.0, 0.0, -1.0]])
    assert TemperatureScaler().temperature_ == 1.0
    assert TemperatureScaler().predict_proba(logits) == pytest.approx(softmax(logits))
    assert TemperatureScaler(2.0).predict_proba(logits) == pytest.approx(softmax(logits / 2.0))
    assert 0.05 <= TemperatureScaler().fit(logits, np.array([0])).temperature_ <= 20.0  # one image is enough
    with pytest.raises(ValueError, match=re.escape("need (N, C) logits and N labels, got (0, 3) and (0,)")):
        TemperatureScaler().fit(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match=re.escape("got (3,) and (3,)")):
        TemperatureScaler().fit(np.zeros(3), np.zeros(3, dtype=int))
    assert TemperatureScaler.from_dict({"temperature": "1.5"}).to_dict() == {"temperature": 1.5}


def test_policy_decisions_in_full():
    from catcascade.ensemble.escalation_policy import EscalationDecision

    policy = EscalationPolicy(EscalationConfig(threshold=0.6, class_thresholds={2: 0.3}))
    p = np.array([0.5, 0.3, 0.2])
    assert policy.decide(p, EscalationMode.NEVER) == EscalationDecision(
        False, EscalationReason.REQUESTED_NEVER, 0.5, "client asked for CNN only")
    assert policy.decide(p, EscalationMode.ALWAYS) == EscalationDecision(
        True, EscalationReason.REQUESTED_ALWAYS, 0.5, "client asked for the VLM")
    assert policy.decide(p) == EscalationDecision(True, EscalationReason.LOW_CONFIDENCE, 0.5,
                                                  "top1 confidence 0.500 < 0.600")
    assert policy.decide(np.array([0.2, 0.35, 0.45])) == EscalationDecision(  # class 2's own threshold
        False, EscalationReason.CONFIDENT, 0.45, "top1 confidence 0.450 >= 0.300")
    at = EscalationPolicy(EscalationConfig(threshold=0.5)).decide(p)  # exactly at the threshold: confident
    assert not at.escalate and at.reason == EscalationReason.CONFIDENT and at.detail == "top1 confidence 0.500 >= 0.500"


def test_blend_refuses_mismatched_scores_with_a_message():
    with pytest.raises(ValueError, match=r"^3 candidates but 2 VLM scores$"):
        LogLinearBlender().blend(np.array([0.5, 0.3, 0.1, 0.1]), (0, 1, 2), np.array([0.5, 0.5]))


def test_log_linear_fit_accepts_float_labels():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), 200)
    idx = np.argsort(-p, axis=1)[:, :3]
    y = idx[:, 0].copy()
    vlm = np.where(np.arange(3) == 0, 0.8, 0.1)[None, :].repeat(200, axis=0)
    a = LogLinearBlender().fit(p, idx, vlm, y)
    b = LogLinearBlender().fit(p, idx, vlm, y.astype(float))
    assert a.config == b.config and a.weight_ > 0.5  # the VLM is always right here: trust it
