"""Cascade settings (escalation + blending), validated pydantic models saved as JSON/YAML."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EscalationConfig(BaseModel):
    """When AUTO mode asks the VLM: the CNN's confidence score is below ``threshold``.

    ``threshold`` is set by hand or fitted (ensemble/policy_fitting.py) to an escalation budget;
    ``class_thresholds`` override it for images whose CNN top-1 is one of the given classes
    (fitted for minority classes, so they escalate more often).
    """

    model_config = ConfigDict(extra="forbid")

    metric: Literal["top1", "margin", "entropy"] = Field(
        "top1", description="top1: calibrated p1; margin: p1 - p2; entropy: 1 - H(p)/log(C)")
    threshold: float = Field(0.6, ge=0.0, le=1.0, description="escalate when the confidence score is below this")
    class_thresholds: dict[int, float] = Field(
        default_factory=dict, description="per predicted class index: its own threshold (overrides `threshold`)")
    fit_summary: dict | None = Field(
        None, description="how the thresholds were fitted (objective, budget, validation rate); informational")

    @model_validator(mode="after")
    def _check_class_thresholds(self) -> "EscalationConfig":
        for c, t in self.class_thresholds.items():
            if c < 0 or not 0.0 <= t <= 1.0:
                raise ValueError(f"class_thresholds[{c}] = {t}: class must be >= 0 and threshold in [0, 1]")
        return self


class StackingParams(BaseModel):
    """A fitted logistic-regression stacker (ensemble/stacking.py), as plain numbers."""

    model_config = ConfigDict(extra="forbid")

    features: list[str] = Field(min_length=1, description="feature names, in coefficient order")
    mean: list[float] = Field(description="standardisation: per-feature mean")
    scale: list[float] = Field(description="standardisation: per-feature scale")
    coef: list[float] = Field(description="logistic-regression coefficients on standardised features")
    intercept: float = 0.0
    temperature: float = Field(1.0, gt=0.0, description="re-calibration of the candidate scores, fitted by log-loss")
    top_k: int = Field(3, ge=2, le=8, description="candidates it was fitted on")

    @model_validator(mode="after")
    def _check_lengths(self) -> "StackingParams":
        n = len(self.features)
        if not len(self.mean) == len(self.scale) == len(self.coef) == n:
            raise ValueError(f"stacking: {n} features but {len(self.mean)} means, {len(self.scale)} scales "
                             f"and {len(self.coef)} coefficients")
        return self


class BlendConfig(BaseModel):
    """How the VLM's candidate scores are combined with the CNN's distribution.

    log_linear: weighted pool over the CNN's top-k, log p = ((1-w) log p_cnn + w log p_vlm) / T.
    stacking: a logistic regression over per-candidate features (``stacking`` holds it).
    """

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(0.5, ge=0.0, le=1.0, description="weight of the VLM in the pool")
    temperature: float = Field(1.0, gt=0.0, le=100.0,
                               description="log_linear: the pooled candidate log-scores are divided by this "
                                           "(fitted with the weight, so agreeing stages give confident answers)")
    method: Literal["log_linear", "stacking"] = Field("log_linear", description="which blender serving builds")
    stacking: StackingParams | None = Field(None, description="the fitted stacker when method is stacking")

    @model_validator(mode="after")
    def _check_method(self) -> "BlendConfig":
        if self.method == "stacking" and self.stacking is None:
            raise ValueError("blend.method is 'stacking' but blend.stacking holds no fitted parameters")
        return self


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
