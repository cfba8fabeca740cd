"""The stacking blender's arithmetic on hand-checked inputs: its features, its scores from
given parameters, and what fit() learns and refuses."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from catcascade.cnn_stage.topk import softmax
from catcascade.ensemble.config import BlendConfig, StackingParams
from catcascade.ensemble.stacking import StackingBlender, candidate_features, feature_names

P = np.array([[0.5, 0.3, 0.2, 0.0]])
IDX = np.array([[0, 1, 3]])  # the last candidate has CNN probability 0: clipped, not -inf
VLM = np.array([[0.2, 0.6, 0.1]])


def test_feature_names():
    assert feature_names(3) == ["log_p_cnn", "log_p_vlm", "margin", "entropy_conf", "margin_x_log_p_cnn",
                                "margin_x_log_p_vlm", "entropy_x_log_p_cnn", "entropy_x_log_p_vlm", "rank_0", "rank_1"]
    assert feature_names(2)[-1] == "rank_0" and len(feature_names(5)) == 12


def test_candidate_features_by_hand():
    f = candidate_features(P, IDX, VLM)
    assert f.shape == (1, 3, 10)
    lp_cnn = np.log([0.5, 0.3, 1e-6])
    lp_vlm = np.log(np.array([0.2, 0.6, 0.1]) / 0.9)
    margin = 0.5 - 0.3
    entropy_conf = 1 + (0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(4)
    want = np.stack([lp_cnn, lp_vlm, np.full(3, margin), np.full(3, entropy_conf), margin * lp_cnn, margin * lp_vlm,
                     entropy_conf * lp_cnn, entropy_conf * lp_vlm, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], axis=-1)
    assert f[0] == pytest.approx(want, abs=1e-12)
    assert f.dtype == np.float64


def _params(**kw) -> StackingParams:
    base = dict(features=feature_names(3), mean=[0.5] * 10, scale=[2.0] * 10, coef=[0.3, 0.8] + [0.1] * 8,
                intercept=0.7, temperature=1.5, top_k=3)
    return StackingParams(**{**base, **kw})


def test_blend_from_given_parameters_by_hand():
    """z = ((features - mean) / scale) @ coef + intercept; softmax(z / T) over the candidates,
    scaled to the CNN's mass on them; the rest of the distribution is the CNN's."""
    params = _params()
    out = StackingBlender(params=params).blend_batch(P, IDX, VLM)
    z = ((candidate_features(P, IDX, VLM)[0] - 0.5) / 2.0) @ np.array(params.coef) + 0.7
    q = softmax(z / 1.5) * (0.5 + 0.3 + 0.0)
    assert out[0] == pytest.approx([q[0], q[1], 0.2, q[2]], abs=1e-12)
    # from the bundle's config: the same numbers
    via_config = StackingBlender.from_config(BlendConfig(method="stacking", stacking=params))
    assert via_config.blend(P[0], (0, 1, 3), VLM[0]) == pytest.approx(out[0], abs=1e-12)
    assert StackingBlender(params=params).to_config().stacking == params


def test_stacker_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"^BlendConfig has no stacking parameters$"):
        StackingBlender.from_config(BlendConfig())
    with pytest.raises(RuntimeError, match=r"^StackingBlender is not fitted: call fit\(\) or load fitted parameters$"):
        StackingBlender().blend_batch(P, IDX, VLM)
    with pytest.raises(ValueError, match=r"^the stacker was fitted on top-3 candidates, got 4$"):
        StackingBlender(params=_params()).blend_batch(P, np.array([[0, 1, 2, 3]]), np.full((1, 4), 0.25))


def test_fewer_candidates_than_fitted_use_the_first_rank_columns():
    """A conformal set of 2 under a stacker fitted on 3: ranks 0 and 1 keep their columns."""
    params = _params()
    f = candidate_features(P, IDX[:, :2], VLM[:, :2], top_k=3)
    assert f.shape == (1, 2, 10) and f[0, :, 8:].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    z = ((f[0] - 0.5) / 2.0) @ np.array(params.coef) + 0.7
    q = softmax(z / 1.5) * 0.8
    out = StackingBlender(params=params).blend_batch(P, IDX[:, :2], VLM[:, :2])
    assert out[0] == pytest.approx([q[0], q[1], 0.2, 0.0], abs=1e-12)


def _dataset(n=300, k=3, c=5, seed=0):
    """Images whose true class is among the CNN's top-k, with a VLM that usually points at it."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(c), n)
    idx = np.argsort(-p, axis=1)[:, :k]
    y = idx[np.arange(n), rng.integers(0, k, n)]
    vlm = np.where(idx == y[:, None], 0.7, 0.3 / (k - 1)) + rng.uniform(0, 0.05, (n, k))
    return p, idx, vlm, y


def test_fit_standardises_features_and_uses_C():
    p, idx, vlm, y = _dataset()
    fitted = StackingBlender().fit(p, idx, vlm, y.astype(float)).params_
    feats = candidate_features(p, idx, vlm).reshape(-1, 10)
    assert fitted.mean == pytest.approx(feats.mean(axis=0).tolist(), abs=1e-12)
    assert fitted.scale == pytest.approx(feats.std(axis=0).tolist(), abs=1e-12)
    assert fitted.features == feature_names(3) and fitted.top_k == 3 and 0.05 <= fitted.temperature <= 20
    assert fitted.coef[1] > 0  # the VLM's log-score counts for the true class
    assert StackingBlender().C == 1.0
    tight = StackingBlender(C=0.001).fit(p, idx, vlm, y).params_
    assert np.abs(tight.coef).sum() < 0.5 * np.abs(fitted.coef).sum()  # stronger regularisation


def test_fit_keeps_constant_features_unscaled():
    """One image class only: margin and entropy are the same for every row, std 0 -> scale 1."""
    p = np.tile([[0.5, 0.3, 0.2]], (6, 1))
    idx = np.tile([[0, 1, 2]], (6, 1))
    vlm = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]] * 2)
    y = np.array([0, 1, 2, 0, 1, 2])
    params = StackingBlender().fit(p, idx, vlm, y).params_
    names = feature_names(3)
    assert params.scale[names.index("margin")] == 1.0 and params.scale[names.index("entropy_conf")] == 1.0
    assert params.scale[names.index("log_p_vlm")] == pytest.approx(np.log(8.0) * math.sqrt(2) / 3, rel=1e-9)
    assert np.isfinite(params.coef).all()


def test_fit_needs_at_least_two_right_and_two_wrong_candidates():
    p = np.array([[0.6, 0.4], [0.3, 0.7]])
    idx = np.array([[0, 1], [1, 0]])
    vlm = np.array([[0.9, 0.1], [0.8, 0.2]])
    StackingBlender().fit(p, idx, vlm, np.array([0, 1]))  # 2 right, 2 wrong candidates: just enough
    message = re.escape("stacking needs held-out images where both stages ran and the true class is among the "
                        "candidates for some but not all candidates; got 2 usable rows")
    with pytest.raises(ValueError, match=message):
        StackingBlender().fit(p, idx, vlm, np.array([0, 2]))  # the second image's class is no candidate
    with pytest.raises(ValueError, match=r"^2 rows but 3 labels$"):
        StackingBlender().fit(p, idx, vlm, np.array([0, 1, 1]))
