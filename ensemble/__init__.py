"""Ensemble: calibration (temperature), the escalation policy and the CNN+VLM blender."""
from ensemble.blender import LogLinearBlender
from ensemble.config import BlendConfig, CascadeConfig, EscalationConfig
from ensemble.escalation_policy import EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason
from ensemble.temperature import TemperatureScaler

__all__ = [
    "LogLinearBlender", "BlendConfig", "CascadeConfig", "EscalationConfig", "EscalationDecision",
    "EscalationMode", "EscalationPolicy", "EscalationReason", "TemperatureScaler",
]
