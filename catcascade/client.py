"""The public import path of the Python client: ``from catcascade.client import CatcascadeClient``.

The client lives in serving/client/ (the serving layer's commands use it); this module only
re-exports it, from the top layer, so nothing below may import it.
"""
from catcascade.serving.client import (AsyncCatcascadeClient, CatcascadeClient, CatcascadeRpcError, ClassifyResult,
                            EscalationMode, EscalationReason, LabelScore, ModelInfo, ModelVersions, Priority,
                            Rationale, RetryPolicy, Timings, TrafficMode, VlmVerdict, classify_request,
                            results_table)

__all__ = ["AsyncCatcascadeClient", "CatcascadeClient", "CatcascadeRpcError", "ClassifyResult", "EscalationMode",
           "EscalationReason", "LabelScore", "ModelInfo", "ModelVersions", "Priority", "Rationale", "RetryPolicy",
           "Timings", "TrafficMode", "VlmVerdict", "classify_request", "results_table"]
