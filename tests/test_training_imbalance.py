"""Imbalance options (focal loss, class weights, balanced sampler), the norm-layer policy, the
epoch plan of progressive unfreezing, the config checks and the pickle-free checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from catcascade.training.imbalance import SoftTargetFocalLoss, balanced_sampler, inverse_frequency_weights, make_loss


def test_gamma_zero_is_label_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ours = make_loss("none", y.tolist(), 5, label_smoothing=0.1)(logits, y)
    ref = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_soft_targets_match_timm_soft_target_cross_entropy():
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(1)
    logits = torch.randn(8, 4)
    target = torch.softmax(torch.randn(8, 4), dim=1)
    assert torch.allclose(SoftTargetFocalLoss(4)(logits, target), SoftTargetCrossEntropy()(logits, target), atol=1e-6)


def test_focal_loss_down_weights_easy_examples_more_than_hard_ones():
    easy, hard = torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([0])
    ce, focal = SoftTargetFocalLoss(3), SoftTargetFocalLoss(3, gamma=2.0)
    easy_ratio = focal(easy, y) / ce(easy, y)
    hard_ratio = focal(hard, y) / ce(hard, y)
    assert easy_ratio < 0.01 < hard_ratio < 1.0
    with pytest.raises(ValueError, match="gamma"):
        SoftTargetFocalLoss(3, gamma=-1)


def test_class_weights_favour_the_rare_class():
    labels = [0] * 90 + [1] * 10
    w = inverse_frequency_weights(labels, 3)
    assert w[1] == pytest.approx(9 * w[0]) and w[2] == 0.0
    assert np.mean([w[y] for y in labels]) == pytest.approx(1.0)
    loss = make_loss("class_weights", labels, 3)
    logits = torch.zeros(1, 3)
    assert loss(logits, torch.tensor([1])) > 5 * loss(logits, torch.tensor([0]))
    with pytest.raises(ValueError, match="imbalance"):
        make_loss("oversample", labels, 3)


def test_balanced_sampler_draws_classes_equally():
    torch.manual_seed(0)
    labels = [0] * 180 + [1] * 20
    drawn = [labels[i] for i in balanced_sampler(labels, 2, num_samples=4000)]
    assert 0.45 < np.mean(drawn) < 0.55


def test_frozen_batchnorm_keeps_its_running_statistics():
    from catcascade.training.unfreezing import freeze_batchnorm_stats

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1),
                              torch.nn.BatchNorm2d(2))
    for p in net[1].parameters():
        p.requires_grad = False
    net.train()
    assert freeze_batchnorm_stats(net) == 1
    before = net[1].running_mean.clone()
    net(torch.randn(4, 3, 8, 8) + 3.0)
    assert not net[1].training and torch.equal(net[1].running_mean, before)
    assert net[3].training and not torch.equal(net[3].running_mean, torch.zeros(2))


def test_freeze_norm_covers_downsample_layernorms():
    import timm

    from catcascade.training.unfreezing import apply_phase, norm_parameter_names

    atto = timm.create_model("convnext_atto", num_classes=3)
    norms = norm_parameter_names(atto)
    assert "stages.3.downsample.0.weight" in norms and "stem.1.weight" in norms
    names = set(apply_phase(atto, 5, train_norm=False))
    assert not names & (norms - {"head.norm.weight", "head.norm.bias"})
    assert {"head.norm.weight", "stages.3.downsample.1.weight", "stem.0.weight"} <= names


def test_epoch_plan_follows_phase_lengths():
    from catcascade.training.unfreezing import epoch_plan

    assert epoch_plan((1, 2, 2)) == [(0, 0), (1, 1), (1, 1), (2, 5), (2, 5)]
    assert epoch_plan((2, 0, 1), unfreeze_all_last=False) == [(0, 0), (0, 0), (2, 2)]
    assert epoch_plan((3,)) == [(0, 0)] * 3
    with pytest.raises(ValueError, match="phase_epochs"):
        epoch_plan((1, -1))


@pytest.mark.parametrize("bad, match", [
    ({"imbalance": "smote"}, "imbalance"), ({"phase_epochs": (0, 0)}, "phase_epochs"),
    ({"layer_decay": 1.5}, "layer_decay"), ({"pretrained": True, "checkpoint": "x.safetensors"}, "not both"),
    ({"randaugment": "flip"}, "randaugment"), ({"crop_scale": (0.9, 0.2)}, "crop_scale"),
])
def test_train_config_rejects_bad_values(bad, match):
    from catcascade.training.train_cnn import CnnTrainConfig

    with pytest.raises(ValueError, match=match):
        CnnTrainConfig(**bad)


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from catcascade.training.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW([{"params": [net.weight], "lr": 0.1, "block": "head"},
                             {"params": [net.bias], "lr": 0.01, "block": "head"}])
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    save_checkpoint(tmp_path, net.state_dict(), opt.state_dict(), {"epoch": 4, "history": [{"a": 1}]})
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pth"))
    model_state, opt_state, state = load_checkpoint(tmp_path)
    net2 = torch.nn.Linear(4, 3)
    net2.load_state_dict(model_state)
    opt2 = torch.optim.AdamW([{"params": [net2.weight]}, {"params": [net2.bias]}])
    opt2.load_state_dict(opt_state)
    assert state["epoch"] == 4 and opt2.param_groups[1]["lr"] == 0.01
    for p, p2 in zip(net.parameters(), net2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
    with pytest.raises(FileNotFoundError, match="resumable"):
        load_checkpoint(tmp_path / "nowhere")
