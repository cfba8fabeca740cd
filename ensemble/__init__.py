"""Ensemble: calibration (temperature), the escalation policy (confidence or learned deferral),
conformal candidate sets and the CNN+VLM blenders, their fitting on held-out data, score files
and offline evaluation."""
from ensemble.blender import LogLinearBlender
from ensemble.blender_registry import make_blender
from ensemble.candidate_sets import fit_candidate_sets
from ensemble.config import (BlendConfig, CandidateSetConfig, CascadeConfig, EscalationConfig, LearnedDeferralParams,
                             StackingParams)
from ensemble.escalation_policy import EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason
from ensemble.learned_deferral import LearnedDeferral
from ensemble.policy_fitting import fit_escalation
from ensemble.score_files import ScoreFileError, ScoreSet
from ensemble.stacking import StackingBlender
from ensemble.temperature import TemperatureScaler

__all__ = [
    "LogLinearBlender", "make_blender", "BlendConfig", "CandidateSetConfig", "CascadeConfig", "EscalationConfig",
    "LearnedDeferralParams", "StackingParams", "fit_candidate_sets", "LearnedDeferral",
    "EscalationDecision", "EscalationMode", "EscalationPolicy", "EscalationReason", "fit_escalation",
    "ScoreFileError", "ScoreSet", "StackingBlender", "TemperatureScaler",
]
