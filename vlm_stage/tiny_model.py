"""Tiny vision-language models (random weights) built from a config, for tests and the demo.

No weights can be downloaded on the machines this project is tested on, so the demo and the
tests use ~1M-parameter models that the project builds itself, one per family
(vlm_stage/families/): the tiny LLaVA of the demo bundle, tiny Qwen2.5-VL and Qwen2-VL in the
layout of the default base model, and tiny Qwen3-VL, Pixtral, Gemma 3 and Llama 3.2 Vision in
their real models' layouts. vLLM loads them from the folder like hub models.
"""
from __future__ import annotations

from pathlib import Path

from catcascade.vlm_stage.families import family_named
from catcascade.vlm_stage.families.llava import (CHAT_TEMPLATE, IMAGE_SIZE, SIZES, SPECIAL_TOKENS, TinyLlavaSize,  # noqa: F401
                                      build_tiny_llava, to_hub_layout)


def build_tiny_vlm(out_dir: str | Path, labels: list[str], family: str = "llava", seed: int = 0) -> Path:
    """Writes a loadable tiny model of ``family`` (llava, qwen2_5_vl, qwen2_vl, qwen3_vl, pixtral,
    gemma3, mllama) to ``out_dir``."""
    fam = family_named(family)
    if fam.build_tiny is None:
        raise ValueError(f"no tiny build for the {family} family")
    return fam.build_tiny(out_dir, labels, seed=seed)
