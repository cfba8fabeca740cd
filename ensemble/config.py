"""Cascade settings (escalation + blending), validated pydantic models saved as JSON/YAML."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LearnedDeferralParams(BaseModel):
    """A fitted learned deferral rule (ensemble/learned_deferral.py), as plain numbers.

    A multinomial logistic regression over features of the CNN's calibrated distribution,
    predicting the gain of escalating an image (one of ``gains``, e.g. -1, 0, +1); the
    predicted gain is the expectation sum_k P(k) * gains[k].
    """

    model_config = ConfigDict(extra="forbid")

    num_classes: int = Field(ge=2, description="classes of the CNN it was fitted for (the one-hot features)")
    top_k: int = Field(3, ge=1, description="sorted CNN probabilities used as features")
    features: list[str] = Field(min_length=1, description="feature names, in coefficient order")
    mean: list[float] = Field(description="standardisation: per-feature mean")
    scale: list[float] = Field(description="standardisation: per-feature scale")
    gains: list[float] = Field(min_length=1, description="the gain each output of the regression stands for")
    coef: list[list[float]] = Field(description="one row of coefficients per gain, on standardised features")
    intercept: list[float] = Field(description="one intercept per gain")
    fit_summary: dict | None = Field(None, description="what it was fitted on; informational")

    @model_validator(mode="after")
    def _check_shapes(self) -> "LearnedDeferralParams":
        f, g = len(self.features), len(self.gains)
        if len(self.mean) != f or len(self.scale) != f:
            raise ValueError(f"learned deferral: {f} features but {len(self.mean)} means and {len(self.scale)} scales")
        if len(self.coef) != g or len(self.intercept) != g or any(len(row) != f for row in self.coef):
            raise ValueError(f"learned deferral: coef must be {g} rows of {f} and intercept {g} numbers")
        return self


class EscalationConfig(BaseModel):
    """When AUTO mode asks the VLM: the CNN's confidence score is below ``threshold``.

    ``threshold`` is set by hand or fitted (ensemble/policy_fitting.py) to an escalation budget;
    ``class_thresholds`` override it for images whose CNN top-1 is one of the given classes
    (fitted for minority classes, so they escalate more often). With ``metric: learned`` the
    score is (1 - predicted gain of escalating) / 2 from the fitted rule in ``learned``: the
    images with the highest predicted gain go to the VLM.
    """

    model_config = ConfigDict(extra="forbid")

    metric: Literal["top1", "margin", "entropy", "learned"] = Field(
        "top1", description="top1: calibrated p1; margin: p1 - p2; entropy: 1 - H(p)/log(C); "
                            "learned: (1 - predicted gain of asking the VLM) / 2, from `learned`")
    threshold: float = Field(0.6, ge=0.0, le=1.0, description="escalate when the confidence score is below this")
    class_thresholds: dict[int, float] = Field(
        default_factory=dict, description="per predicted class index: its own threshold (overrides `threshold`)")
    fit_summary: dict | None = Field(
        None, description="how the thresholds were fitted (objective, budget, validation rate); informational")
    learned: LearnedDeferralParams | None = Field(None, description="the fitted rule when metric is learned")

    @model_validator(mode="after")
    def _check_class_thresholds(self) -> "EscalationConfig":
        for c, t in self.class_thresholds.items():
            if c < 0 or not 0.0 <= t <= 1.0:
                raise ValueError(f"class_thresholds[{c}] = {t}: class must be >= 0 and threshold in [0, 1]")
        if self.metric == "learned" and self.learned is None:
            raise ValueError("escalation.metric is 'learned' but escalation.learned holds no fitted rule")
        return self


class CandidateSetConfig(BaseModel):
    """Conformal candidate sets (ensemble/candidate_sets.py): the VLM is asked about the smallest
    prefix of the CNN's ranking that covers the true breed with probability 1 - alpha.

    Score of class y (rank r, 1-based): the CNN's mass strictly above y plus lam * max(0, r - k_reg)
    (RAPS; lam = 0 is APS). The set is every class whose score is <= ``qhat``, capped at
    ``max_size``; the top-1 always belongs to it.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["aps", "raps"] = "raps"
    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="target miscoverage: sets cover the truth with 1 - alpha")
    qhat: float = Field(ge=0.0, description="calibrated threshold on the conformity score")
    lam: float = Field(0.0, ge=0.0, description="RAPS penalty per rank beyond k_reg (0 = APS)")
    k_reg: int = Field(1, ge=1, description="RAPS: ranks up to this one carry no penalty")
    max_size: int = Field(5, ge=1, le=19, description="cap on the set size (the prompt lists at most 19 breeds)")
    skip_singletons: bool = Field(
        True, description="AUTO mode: a set of one breed means no VLM call (blending over one candidate changes "
                          "nothing)")
    fit_summary: dict | None = Field(None, description="calibration size, coverage and sizes; informational")


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

    top_k: int = Field(3, ge=2, le=8, description="candidates the VLM is asked about (without candidate_sets)")
    escalation: EscalationConfig = EscalationConfig()
    blend: BlendConfig = BlendConfig()
    candidate_sets: CandidateSetConfig | None = Field(
        None, description="conformal candidate sets instead of a fixed top_k; None = always top_k")

    @model_validator(mode="after")
    def _check_candidates(self) -> "CascadeConfig":
        sets, stacking = self.candidate_sets, self.blend.stacking
        if sets is not None and self.blend.method == "stacking" and stacking and sets.max_size > stacking.top_k:
            raise ValueError(f"candidate_sets.max_size {sets.max_size} exceeds the {stacking.top_k} candidates the "
                             "stacking blender was fitted on")
        return self

    @property
    def max_candidates(self) -> int:
        """The most candidates the VLM is ever asked about."""
        return self.candidate_sets.max_size if self.candidate_sets is not None else self.top_k

    @classmethod
    def from_file(cls, path: str | Path) -> "CascadeConfig":
        """Loads a .json or .yaml/.yml file; pydantic names any bad field."""
        import json

        import yaml

        path = Path(path)
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        return cls.model_validate(data or {})
