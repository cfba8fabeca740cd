"""The log-linear blender, the arithmetic every blender shares (ensemble/blending.py) and the
confidence scores of the escalation policy, against values worked out by hand."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.blending import check_batch, normalised_vlm, true_class_nll
from catcascade.ensemble.config import BlendConfig, EscalationConfig
from catcascade.ensemble.escalation_policy import EscalationPolicy, confidence_scores

EPS = 1e-6


def pool_by_hand(p, cand, vlm, w, t=1.0):
    """q_c ∝ (p_c^(1-w) v_c^w)^(1/T) over the candidates (both clipped at 1e-6, the VLM's
    scores renormalised), rescaled to the CNN's mass there; other classes keep p."""
    p = np.asarray(p, dtype=np.float64)
    v = np.clip(np.asarray(vlm, dtype=np.float64), EPS, None)
    v = v / v.sum()
    pc = p[list(cand)]
    q = (np.clip(pc, EPS, None) ** (1 - w) * v ** w) ** (1 / t)
    out = p.copy()
    out[list(cand)] = q / q.sum() * pc.sum()
    return out


P = np.array([0.45, 0.3, 0.15, 0.1])


@pytest.mark.parametrize("w,t", [(0.5, 1.0), (0.3, 2.0), (0.8, 0.5)])
def test_log_linear_pool_by_hand(w, t):
    vlm = [0.1, 0.7, 0.2]
    out = LogLinearBlender(BlendConfig(weight=w, temperature=t)).blend(P, (0, 1, 2), vlm)
    assert out == pytest.approx(pool_by_hand(P, (0, 1, 2), vlm, w, t), abs=1e-12)


def test_zero_probabilities_are_clipped_not_fatal():
    p = np.array([0.7, 0.3, 0.0, 0.0])
    out = LogLinearBlender(BlendConfig(weight=0.5)).blend(p, (0, 1, 2), [0.0, 0.3, 0.7])
    assert np.isfinite(out).all() and out[2] > 0
    assert out == pytest.approx(pool_by_hand(p, (0, 1, 2), [0.0, 0.3, 0.7], 0.5), abs=1e-12)


def test_batch_rows_are_independent_and_missing_vlm_rows_stay_cnn_only():
    p = np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    idx = np.array([[0, 1], [1, 2], [-1, -1], [2, 0]], dtype=np.float64)  # float indices are accepted
    vlm = np.array([[0.2, 0.6], [0.9, 0.3], [0.5, 0.5], [np.nan, np.nan]], dtype=np.float32)
    out = LogLinearBlender(BlendConfig(weight=0.5)).blend_batch(p, idx, vlm)
    assert out.dtype == np.float64
    p64 = p.astype(np.float64)
    assert out[0] == pytest.approx(pool_by_hand(p64[0], (0, 1), vlm[0].astype(np.float64), 0.5), abs=1e-12)
    assert out[1] == pytest.approx(pool_by_hand(p64[1], (1, 2), vlm[1].astype(np.float64), 0.5), abs=1e-12)
    assert out[2] == pytest.approx(p64[2], abs=0) and out[3] == pytest.approx(p64[3], abs=0)
    _, _, _, has = check_batch(p, idx, vlm)
    assert has.tolist() == [True, True, False, False]
    # VLM scores normalised per row, not over the batch
    assert normalised_vlm(np.array([[1.0, 3.0], [2.0, 2.0]])).tolist() == [[0.25, 0.75], [0.5, 0.5]]


def test_check_batch_errors_name_the_shapes():
    p = np.full((2, 4), 0.25)
    with pytest.raises(ValueError, match=re.escape(
            "need (N, C) CNN probabilities and (N, k) candidates and VLM scores, got (2, 4), (2, 3) and (2, 2)")):
        check_batch(p, np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=re.escape("got (2, 4), (3, 2) and (3, 2)")):
        check_batch(p, np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"^candidate index 4 out of range for 4 classes$"):
        check_batch(p, np.array([[0, 4], [0, 1]]), np.ones((2, 2)))
    check_batch(p, np.array([[0, 3], [2, 1]]), np.ones((2, 2)))  # the last class is in range
    empty = LogLinearBlender().blend_batch(np.zeros((0, 4)), np.zeros((0, 3)), np.zeros((0, 3)))
    assert empty.shape == (0, 4)
    assert LogLinearBlender().blend(np.array([1.0]), (0,), np.array([0.3])).tolist() == [1.0]  # one class


def test_true_class_nll_is_clipped():
    assert true_class_nll(np.array([[0.25, 0.75], [0.5, 0.5]]), np.array([1, 0])) == pytest.approx(
        -(math.log(0.75) + math.log(0.5)) / 2, abs=1e-12)
    assert true_class_nll(np.array([[0.0, 1.0]]), np.array([0])) == pytest.approx(-math.log(1e-12), abs=1e-9)


def _fit_data(n=400, seed=0, vlm_right=0.3):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(5) * 0.7, n)
    idx = np.argsort(-p, axis=1)[:, :3]
    top = np.take_along_axis(p, idx, axis=1)
    pick_y = (rng.random((n, 1)) > (top / top.sum(axis=1, keepdims=True)).cumsum(axis=1)).sum(axis=1)
    y = idx[np.arange(n), pick_y]  # a calibrated CNN: the true class drawn from its own top 3
    right = rng.random(n) < vlm_right
    pick = np.where(right, (idx == y[:, None]).argmax(axis=1), rng.integers(0, 3, n))
    vlm = np.full((n, 3), 0.15)
    vlm[np.arange(n), pick] = 0.7
    return p, idx, vlm, y


def _nll(p, idx, vlm, y, w, t=1.0):
    out = np.stack([pool_by_hand(p[i], idx[i], vlm[i], w, t) for i in range(len(y))])
    return -np.log(out[np.arange(len(y)), y]).mean()


def test_fitted_weight_minimises_the_log_loss():
    p, idx, vlm, y = _fit_data()
    b = LogLinearBlender().fit(p, idx, vlm, y.astype(float), fit_temperature=False)
    assert (b.config.temperature, b.config.method) == (1.0, "log_linear")
    grid = np.linspace(0, 1, 201)
    best = grid[np.argmin([_nll(p, idx, vlm, y, w) for w in grid])]
    assert 0.05 < b.weight_ < 0.95 and b.weight_ == pytest.approx(best, abs=0.01)
    joint = LogLinearBlender().fit(p, idx, vlm, y)
    w, t = joint.weight_, joint.config.temperature
    nll = _nll(p, idx, vlm, y, w, t)
    assert nll <= _nll(p, idx, vlm, y, w, t * 1.05) + 1e-9 and nll <= _nll(p, idx, vlm, y, w, t / 1.05) + 1e-9
    assert joint.to_dict() == {"weight": w, "temperature": t, "method": "log_linear", "stacking": None}


def test_fitted_temperature_stays_within_its_bounds():
    """A CNN and a VLM that are confident and always wrong: the pool flattens as far as allowed."""
    n = 200
    p = np.tile([0.98, 0.01, 0.01], (n, 1))
    idx = np.tile([0, 1, 2], (n, 1))
    vlm = np.tile([0.98, 0.01, 0.01], (n, 1))
    y = np.array([1, 2] * (n // 2))
    b = LogLinearBlender().fit(p, idx, vlm, y)
    assert b.config.temperature == pytest.approx(20.0, rel=1e-3) and 0.0 <= b.weight_ <= 1.0


def test_fit_refuses_without_usable_rows():
    p, idx, vlm, y = _fit_data(n=10)
    with pytest.raises(ValueError, match=r"^10 rows but 9 labels$"):
        LogLinearBlender().fit(p, idx, vlm, y[:9])
    with pytest.raises(ValueError, match=r"^no row has VLM scores: the blender needs held-out images where both "
                                         r"stages ran$"):
        LogLinearBlender().fit(p, idx, np.full_like(vlm, np.nan), y)


@pytest.mark.parametrize("metric,probs,want", [
    ("top1", [0.2, 0.7, 0.1], 0.7),
    ("margin", [0.2, 0.7, 0.1], 0.5),
    ("margin", [0.3, 0.7], 0.4),
    ("margin", [1.0], 1.0),
    ("entropy", [0.5, 0.5], 0.0),
    ("entropy", [1.0, 0.0, 0.0], 1.0),
    ("entropy", [0.5, 0.25, 0.25, 0.0], 1 - 1.5 * math.log(2) / math.log(4)),
    ("entropy", [1.0], 1.0),
])
def test_confidence_scores_by_hand(metric, probs, want):
    got = confidence_scores(np.array([probs]), metric)
    assert got.shape == (1,) and got[0] == pytest.approx(want, abs=1e-12)
    # float32 input is scored in float64
    assert confidence_scores(np.array([probs], dtype=np.float32), metric)[0] == pytest.approx(
        confidence_scores(np.array([probs], dtype=np.float32).astype(np.float64), metric)[0], abs=1e-15)


def test_confidence_scores_unknown_metric():
    with pytest.raises(ValueError, match=r"^unknown confidence metric 'ent' \(expected top1, margin or entropy\)$"):
        confidence_scores(np.array([[0.5, 0.5]]), "ent")


def test_escalate_mask_is_strictly_below_the_threshold():
    policy = EscalationPolicy(EscalationConfig(threshold=0.5, class_thresholds={1: 0.8}))
    probs = np.array([[0.5, 0.3, 0.2], [0.49, 0.3, 0.21], [0.1, 0.79, 0.11], [0.1, 0.8, 0.1]])
    assert policy.thresholds(probs).tolist() == [0.5, 0.5, 0.8, 0.8]
    assert policy.escalate_mask(probs).tolist() == [False, True, True, False]
