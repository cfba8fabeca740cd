"""Server configuration: one pydantic model, from CLI flags or a YAML file, validated at start."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue_delay_ms: float = Field(0.0, ge=0, le=1000, description="0 = batch what is already queued (Triton default)")
    max_queue_size: int = Field(256, ge=1)


class VlmEndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=list, description="vLLM OpenAI-compatible base URLs; empty = no VLM")
    model: str | None = Field(None, description="vLLM model name; default: the bundle's adapter name")
    scoring_mode: Literal["multiple_choice", "yes_no"] | None = None
    timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)

    @field_validator("urls")
    @classmethod
    def _http(cls, urls: list[str]) -> list[str]:
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"VLM URL must start with http:// or https://, got {u!r}")
        return urls


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: Path
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    cnn_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads; default all cores")
    batching: BatchingConfig = BatchingConfig()
    vlm: VlmEndpointConfig = VlmEndpointConfig()
    grace_s: float = Field(5.0, ge=0)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "ServeConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
