"""Progressive unfreezing for timm ConvNeXt: head first, then stages from the top down.

All parameter groups stay in the optimizer; a phase only toggles ``requires_grad`` (frozen
parameters get no gradient, and AdamW skips them), so no optimizer rebuild is needed.
"""
from __future__ import annotations

import re

# Blocks from the output down: what each successive phase adds to the trainable set.
CONVNEXT_BLOCKS = ("head", "stages.3", "stages.2", "stages.1", "stages.0", "stem")


def block_of(param_name: str) -> str:
    m = re.match(r"(stages\.\d+)", param_name)
    if m:
        return m.group(1)
    if param_name.startswith(("head", "norm_pre", "fc")):
        return "head"
    if param_name.startswith("stem"):
        return "stem"
    raise ValueError(f"parameter {param_name!r} belongs to no known ConvNeXt block")


def trainable_blocks(phase: int) -> tuple[str, ...]:
    """Phase 0 trains the head; phase k adds the top k stages; the last phase adds the stem."""
    if phase < 0:
        raise ValueError(f"phase must be >= 0, got {phase}")
    return CONVNEXT_BLOCKS[: min(phase + 1, len(CONVNEXT_BLOCKS))]


def norm_parameter_names(model) -> set[str]:
    """Names of the parameters owned by normalisation layers (LayerNorm, LayerNorm2d, GroupNorm, BatchNorm)."""
    from torch import nn

    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, norm_types):
            names.update(f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False))
    return names


def apply_phase(model, phase: int, train_norm: bool = True) -> list[str]:
    """Sets requires_grad for ``phase``; returns the names of the trainable parameters.

    With ``train_norm=False`` the backbone's normalisation parameters stay frozen in every
    phase (the head's own norm still trains: it is new for the new classes).
    """
    blocks = set(trainable_blocks(phase))
    norms = set() if train_norm else norm_parameter_names(model)
    names = []
    for name, p in model.named_parameters():
        block = block_of(name)
        p.requires_grad = block in blocks and (block == "head" or name not in norms)
        if p.requires_grad:
            names.append(name)
    return names


def freeze_batchnorm_stats(model) -> int:
    """Puts every BatchNorm whose parameters are all frozen in eval mode; call after ``model.train()``.

    A frozen BatchNorm must not keep updating its running statistics from fine-tuning batches
    (the pretrained statistics are part of what is frozen). ConvNeXt has none (LayerNorm only);
    this keeps the trainer honest for backbones that do. Returns how many were switched.
    """
    from torch import nn

    n = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()
            n += 1
    return n


def epoch_plan(phase_epochs: tuple[int, ...] | list[int], unfreeze_all_last: bool = True) -> list[tuple[int, int]]:
    """(phase, unfreeze depth) for every epoch of the run, in order.

    Phase k trains the head and the top k stages (depth k); with ``unfreeze_all_last`` the last
    phase (when there is more than one) trains every block. A pure function, so a resumed run
    knows which phase its next epoch belongs to.
    """
    if not phase_epochs or any(int(e) < 0 for e in phase_epochs):
        raise ValueError(f"phase_epochs must be non-negative epoch counts, got {tuple(phase_epochs)}")
    last = len(phase_epochs) - 1
    plan = []
    for phase, epochs in enumerate(phase_epochs):
        depth = len(CONVNEXT_BLOCKS) - 1 if (unfreeze_all_last and phase == last and phase > 0) else phase
        plan.extend((phase, depth) for _ in range(int(epochs)))
    return plan


def layer_decay_groups(model, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """One AdamW group per block (x decay/no-decay), lr scaled by layer_decay per block below the head."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        block = block_of(name)
        depth = CONVNEXT_BLOCKS.index(block)
        no_decay = p.ndim <= 1
        key = (block, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * layer_decay**depth, "base_lr": lr * layer_decay**depth,
                           "weight_decay": 0.0 if no_decay else weight_decay, "block": block}
        groups[key]["params"].append(p)
    return list(groups.values())
