"""Cascade settings (escalation + blending), validated pydantic models saved as JSON/YAML."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EscalationConfig(BaseModel):
    """When AUTO mode asks the VLM: the CNN's confidence score is below ``threshold``."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["top1", "margin", "entropy"] = Field(
        "top1", description="top1: calibrated p1; margin: p1 - p2; entropy: 1 - H(p)/log(C)")
    threshold: float = Field(0.6, ge=0.0, le=1.0, description="escalate when the confidence score is below this")


class BlendConfig(BaseModel):
    """Weighted log-linear pool over the CNN's top-k: log p = (1-w) log p_cnn + w log p_vlm."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(0.5, ge=0.0, le=1.0, description="weight of the VLM in the pool")


class CascadeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(3, ge=2, le=8, description="candidates the VLM is asked about")
    escalation: EscalationConfig = EscalationConfig()
    blend: BlendConfig = BlendConfig()

    @classmethod
    def from_file(cls, path: str | Path) -> "CascadeConfig":
        """Loads a .json or .yaml/.yml file; pydantic names any bad field."""
        import json

        import yaml

        path = Path(path)
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        return cls.model_validate(data or {})
