"""Ensemble: calibration (temperature), the escalation policy (confidence or learned deferral),
conformal candidate sets and the CNN+VLM blenders, their fitting on held-out data, score files
and offline evaluation."""
from catcascade.ensemble.blender import LogLinearBlender
from catcascade.ensemble.blender_registry import make_blender
from catcascade.ensemble.candidate_sets import fit_candidate_sets
from catcascade.ensemble.config import (BlendConfig, CandidateSetConfig, CascadeConfig, EscalationConfig, LearnedDeferralParams,
                             StackingParams)
from catcascade.ensemble.escalation_policy import EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason
from catcascade.ensemble.learned_deferral import LearnedDeferral
from catcascade.ensemble.policy_fitting import fit_escalation
from catcascade.ensemble.score_files import ScoreFileError, ScoreSet
from catcascade.ensemble.stacking import StackingBlender
from catcascade.ensemble.temperature import TemperatureScaler

__all__ = [
    "LogLinearBlender", "make_blender", "BlendConfig", "CandidateSetConfig", "CascadeConfig", "EscalationConfig",
    "LearnedDeferralParams", "StackingParams", "fit_candidate_sets", "LearnedDeferral",
    "EscalationDecision", "EscalationMode", "EscalationPolicy", "EscalationReason", "fit_escalation",
    "ScoreFileError", "ScoreSet", "StackingBlender", "TemperatureScaler",
]
