"""VLM families: everything that differs between LLaVA and Qwen-VL models, one module each.

A family says how to build its tiny test model, which modules LoRA may target, how large an
image may get (Qwen-VL's dynamic resolution turns pixels into tokens), how to load its
processor with that bound, and which flags vLLM needs to serve it the same way. Training
(training/train_vlm.py), the in-process backend (transformers_backend.py), the vLLM launcher
(vllm_server.py) and the tiny builders (tiny_model.py) all ask ``family_for(model)``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LANGUAGE_PARTS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
"""Linear layers of the language model (the same names in Llama and Qwen2 decoders)."""
TARGET_PARTS = (*LANGUAGE_PARTS, "vision")
_LANGUAGE = r".*language_model.*\.({})"


@dataclass(frozen=True)
class VlmFamily:
    """What one family of vision-language models needs, in one place."""

    name: str
    model_types: tuple[str, ...]
    """config.json ``model_type`` values of the family."""
    hub_pattern: str
    """Regex (case-insensitive) recognising the family's hub ids."""
    vision_modules: str
    """PEFT regex of the vision tower's linear layers (LoRA's "vision" part)."""
    image_limits: dict = field(default_factory=lambda: {"image": 1})
    """vLLM ``--limit-mm-per-prompt``: one image, and no video budget for families that have video."""
    min_pixels: int | None = None
    max_pixels: int | None = None
    """Bounds on image area for dynamic-resolution processors (None: the processor resizes to a fixed size)."""
    build_tiny: Callable[..., Path] | None = None
    """``build_tiny(out_dir, labels, seed) -> Path``: a random-weight model of the family, from a config."""

    def processor_kwargs(self) -> dict:
        """Given to the processor wherever it is loaded (training, the in-process backend) and
        to vLLM's (``--mm-processor-kwargs``), so all three turn an image into the same number
        of tokens whatever the model folder's own defaults (12.8 Mpx for the real Qwen-VL)."""
        if self.min_pixels is None and self.max_pixels is None:
            return {}
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        return {"size": {k: v for k, v in size.items() if v is not None}}

    def load_processor(self, model: str):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model, **self.processor_kwargs())

    def vllm_args(self) -> list[str]:
        args = ["--limit-mm-per-prompt", json.dumps(self.image_limits)]
        if self.processor_kwargs():
            args += ["--mm-processor-kwargs", json.dumps(self.processor_kwargs())]
        return args

    def target_modules(self, parts: tuple[str, ...] | list[str]) -> str:
        """A PEFT ``target_modules`` regex: attention and/or mlp of the language model, and/or
        the vision tower (which vLLM does not serve: see training/train_vlm.py)."""
        unknown = [p for p in parts if p not in TARGET_PARTS]
        if unknown or not parts:
            raise ValueError(f"target parts must be a non-empty subset of {sorted(TARGET_PARTS)}, got {list(parts)}")
        names = [n for p in parts for n in LANGUAGE_PARTS.get(p, ())]
        pieces = [_LANGUAGE.format("|".join(names))] if names else []
        if "vision" in parts:
            pieces.append(self.vision_modules)
        return "|".join(f"(?:{p})" for p in pieces)


def _registry() -> dict[str, VlmFamily]:
    from catcascade.vlm_stage.families import llava, qwen_vl

    return {f.name: f for f in (llava.LLAVA, qwen_vl.QWEN2_VL, qwen_vl.QWEN2_5_VL)}


GENERIC = VlmFamily(name="generic", model_types=(), hub_pattern=r"(?!)",
                    vision_modules=r".*(vision_tower|visual|vision_model)\..*\.(q_proj|k_proj|v_proj|out_proj|qkv|proj"
                                   r"|fc1|fc2|gate_proj|up_proj|down_proj)")
"""Any other image-text-to-text model: no extra flags, a broad vision regex."""


def family_named(name: str) -> VlmFamily:
    families = _registry()
    if name not in families:
        raise ValueError(f"unknown VLM family {name!r}; known: {sorted(families)}")
    return families[name]


def family_for(model: str | Path) -> VlmFamily:
    """The family of a local model folder (its config.json ``model_type``) or of a hub id."""
    families = list(_registry().values())
    config = Path(model) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        return next((f for f in families if model_type in f.model_types), GENERIC)
    return next((f for f in families if re.search(f.hub_pattern, str(model), re.IGNORECASE)), GENERIC)
