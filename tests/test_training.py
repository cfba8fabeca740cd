from __future__ import annotations

import pytest

from catcascade.training.schedules import warmup_cosine
from catcascade.training.unfreezing import apply_phase, block_of, layer_decay_groups, trainable_blocks


@pytest.fixture(scope="module")
def atto():
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=4)


def test_each_phase_unfreezes_one_more_stage_from_the_top(atto):
    expected = [
        {"head"}, {"head", "stages.3"}, {"head", "stages.3", "stages.2"},
        {"head", "stages.3", "stages.2", "stages.1"}, {"head", "stages.3", "stages.2", "stages.1", "stages.0"},
        {"head", "stages.3", "stages.2", "stages.1", "stages.0", "stem"},
    ]
    for phase, blocks in enumerate(expected):
        names = apply_phase(atto, phase)
        assert {block_of(n) for n in names} == blocks
        frozen = [n for n, p in atto.named_parameters() if not p.requires_grad]
        assert all(block_of(n) not in blocks for n in frozen)
    assert trainable_blocks(99) == trainable_blocks(5)


def test_frozen_layernorm_policy(atto):
    names = apply_phase(atto, 1, train_norm=False)
    assert not any("stages.3" in n and ".norm" in n for n in names)
    assert any("stages.3" in n and "conv_dw" in n for n in names)


def test_layer_decay_lowers_lr_towards_the_stem(atto):
    groups = layer_decay_groups(atto, lr=1.0, layer_decay=0.5, weight_decay=0.05)
    lr = {g["block"]: g["lr"] for g in groups}
    assert lr["head"] == 1.0 and lr["stages.3"] == 0.5 and lr["stem"] == 0.5**5
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim <= 1 for p in g["params"]))
    assert sum(len(g["params"]) for g in groups) == len(list(atto.parameters()))


def test_warmup_cosine_shape():
    vals = [warmup_cosine(s, 100, 10) for s in range(100)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))
    assert vals[-1] < 0.05
