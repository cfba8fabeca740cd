"""softmax (with temperature) and top_k against inputs whose answers are known by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from catcascade.cnn_stage.topk import TopK, softmax, top_k


def test_softmax_of_log_weights_is_the_normalised_weights():
    # exp(log w) / sum = w / sum(w): 1/6, 2/6, 3/6
    p = softmax(np.log([1.0, 2.0, 3.0]))
    assert p.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-12)


def test_softmax_by_hand():
    e = math.e
    assert softmax(np.array([0.0, 1.0])).tolist() == pytest.approx([1 / (1 + e), e / (1 + e)], abs=1e-12)
    assert softmax(np.array([5.0, 5.0, 5.0, 5.0])).tolist() == pytest.approx([0.25] * 4, abs=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_divides_the_logits(temperature):
    # logits T*log(w): softmax at temperature T gives w / sum(w) again
    w = np.array([1.0, 3.0, 6.0])
    p = softmax(temperature * np.log(w), temperature)
    assert p.tolist() == pytest.approx((w / w.sum()).tolist(), abs=1e-12)
    # ... and at temperature 1 the same logits are sharper (T > 1) or flatter (T < 1)
    plain = softmax(temperature * np.log(w))
    assert plain.tolist() == pytest.approx((w ** temperature / (w ** temperature).sum()).tolist(), abs=1e-12)


def test_softmax_is_stable_for_huge_logits_and_row_wise():
    p = softmax(np.array([[1000.0, 1000.0 + math.log(3.0)], [-1000.0, -1000.0]]))
    assert p.shape == (2, 2) and np.isfinite(p).all()
    assert p[0].tolist() == pytest.approx([0.25, 0.75], abs=1e-12)
    assert p[1].tolist() == pytest.approx([0.5, 0.5], abs=1e-12)
    assert softmax(np.array([1, 2], dtype=np.int64)).dtype == np.float64
    # float32 logits (what ONNX Runtime returns) are computed in float64
    tiny = np.array([0.0, 1e-7], dtype=np.float32)
    p32 = softmax(tiny)
    assert p32.dtype == np.float64 and p32[1] - p32[0] == pytest.approx(0.5e-7, rel=1e-3)


def test_top_k_orders_labels_probabilities_and_indices():
    p = np.array([0.1, 0.4, 0.3, 0.2])
    t = top_k(p, ["a", "b", "c", "d"], 3)
    assert t == TopK((1, 2, 3), ("b", "c", "d"), (0.4, 0.3, 0.2))
    assert all(isinstance(i, int) for i in t.indices) and all(isinstance(x, float) for x in t.probabilities)


def test_top_k_is_stable_on_ties_and_clamps_k():
    # 60 classes in tied groups of 20: ties keep class order (numpy's default sort would not)
    tied = np.tile([0.3, 0.2, 0.1], 20) / 12.0
    assert top_k(tied, [str(i) for i in range(60)], 10).indices == tuple(range(0, 30, 3))
    p = np.array([0.25, 0.25, 0.25, 0.25])
    assert top_k(p, list("abcd"), 2).labels == ("a", "b")
    assert top_k(p, list("abcd"), 99).indices == (0, 1, 2, 3)
    assert top_k(p, list("abcd"), 0).indices == (0,)
    assert top_k(p, list("abcd"), -5).indices == (0,)
