"""The vLLM client settings for a bundle: which model name to ask vLLM for and how to score,
decided once for every caller (the server, its Ray deployment, offline scoring)."""
from __future__ import annotations

from catcascade.vlm_stage.vllm_client import VlmClientConfig


def bundle_vlm_client_config(bundle, urls: list[str] | tuple[str, ...], *, model: str | None = None,
                             scoring_mode: str | None = None, **settings) -> VlmClientConfig:
    """``model`` defaults to the bundle's LoRA adapter, else its served base model; ``scoring_mode``
    to the bundle's (multiple choice without a vlm section). ``settings`` are the remaining
    VlmClientConfig fields (timeouts, retries, constraint, connections)."""
    spec = bundle.manifest.vlm
    if spec is None and model is None:
        raise ValueError(f"bundle {bundle.root} has no vlm section: set vlm.model, or serve CNN-only")
    mode = scoring_mode or (spec.scoring_mode if spec else "multiple_choice")
    return VlmClientConfig(urls=list(urls), model=model or spec.adapter_name or spec.served_model_name,
                           scoring_mode=mode, **settings)
