from __future__ import annotations

import numpy as np
import pytest

from ensemble.blender import LogLinearBlender
from ensemble.config import BlendConfig, CascadeConfig, EscalationConfig
from ensemble.escalation_policy import EscalationMode, EscalationPolicy, EscalationReason, confidence_score
from ensemble.metrics import expected_calibration_error
from ensemble.temperature import TemperatureScaler


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
