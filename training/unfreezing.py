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


def apply_phase(model, phase: int, train_norm: bool = True) -> list[str]:
    """Sets requires_grad for ``phase``; returns the names of the trainable parameters.

    With ``train_norm=False`` LayerNorm parameters stay frozen in every phase (BatchNorm
    backbones would also keep their running stats in eval mode; ConvNeXt has none).
    """
    blocks = set(trainable_blocks(phase))
    names = []
    for name, p in model.named_parameters():
        is_norm = ".norm" in name or name.startswith("norm") or "stem.1" in name
        p.requires_grad = block_of(name) in blocks and (train_norm or not is_norm or block_of(name) == "head")
        if p.requires_grad:
            names.append(name)
    return names


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
