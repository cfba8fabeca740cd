"""The VLM stage a ServeConfig asks for: vLLM over HTTP, the bundle's VLM in-process, or none.
The local engine builds its verifier here and the Ray VlmStage deployment its vLLM client, so
both ask the same model the same way."""
from __future__ import annotations

from typing import Callable, Mapping

from catcascade.ensemble.bundle import Bundle
from catcascade.ensemble.vlm_client_settings import bundle_vlm_client_config
from catcascade.serving.config import ServeConfig


def vlm_client_config(cfg: ServeConfig, bundle: Bundle):
    """The vLLM client settings for this config and bundle (vlm.* overrides the bundle's)."""
    v = cfg.vlm
    return bundle_vlm_client_config(bundle, v.urls, model=v.model, scoring_mode=v.scoring_mode,
                                    timeout_s=v.timeout_s, max_retries=v.max_retries, constraint=v.constraint,
                                    max_connections=max(64, cfg.limits.max_concurrent_escalations))


def make_verifier(bundle: Bundle, cfg: ServeConfig, request_headers: Callable[[], Mapping[str, str]] | None = None):
    """The in-process verifier for ``cfg.vlm.backend`` (None for ``none``). ``request_headers``
    is called per vLLM request (the trace context of the request it serves)."""
    backend = cfg.vlm.backend
    if backend == "none":
        return None
    if backend == "transformers":
        from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier

        spec = bundle.manifest.vlm
        if spec is None:
            raise ValueError(f"bundle {bundle.root} has no vlm section: set vlm.model, or serve CNN-only")
        adapter = bundle.vlm_adapter_path()
        return TransformersVerifier(TransformersBackendConfig(
            model=bundle.vlm_base_path(), adapter=str(adapter) if adapter else None,
            name=spec.adapter_name or spec.served_model_name,
            scoring_mode=cfg.vlm.scoring_mode or spec.scoring_mode))
    from catcascade.vlm_stage.vllm_client import VllmVerifier

    return VllmVerifier(vlm_client_config(cfg, bundle), request_headers=request_headers)
