"""Blenders by name: the one place that knows every blender class (serving builds the one a
bundle's BlendConfig names; offline evaluation fits one by name)."""
from __future__ import annotations

from typing import Literal

from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.blending import Blender
from catcascade.ensemble.config import BlendConfig
from catcascade.ensemble.stacking import StackingBlender

BlenderName = Literal["log_linear", "stacking"]
BLENDERS: dict[str, type[Blender]] = {"log_linear": LogLinearBlender, "stacking": StackingBlender}


def make_blender(config: BlendConfig) -> Blender:
    """The blender a BlendConfig describes (what serving builds from the manifest)."""
    if config.method == "stacking":
        return StackingBlender.from_config(config)
    return LogLinearBlender(config)


def make_fitted_blender(name: BlenderName, cnn_probs, candidates, vlm_scores, y) -> Blender:
    if name not in BLENDERS:
        raise ValueError(f"unknown blender {name!r} (expected one of {', '.join(BLENDERS)})")
    return BLENDERS[name]().fit(cnn_probs, candidates, vlm_scores, y)
