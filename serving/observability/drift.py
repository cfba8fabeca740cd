"""Drift signals for Prometheus, per served model version.

What the server sees of its traffic that would move if the images changed: the calibrated
top-1 confidence (a histogram, and its population-stability index against the validation
histogram the bundle ships in ``cnn.confidence_histogram``), the escalation rate, and how often
the VLM's top choice agrees with the CNN's. The gauges cover the last ``window`` answers the
models computed (cache hits are not new evidence); they are computed when Prometheus scrapes,
so a request pays only for a few appends and one histogram observation.
"""
from __future__ import annotations

import math
import weakref
from collections import deque

from pydantic import BaseModel, ConfigDict, Field

from catcascade.ensemble.confidence_histogram import (ConfidenceHistogram, bin_counts, equal_width_edges,
                                           population_stability_index)


class DriftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    window: int = Field(500, ge=10, description="recent computed answers the drift gauges cover")


class DriftMetrics:
    """The metric families, once per registry; `DriftMonitor` binds one version's children."""

    def __init__(self, registry, edges: list[float]):
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.confidence = Histogram("catcascade_cnn_top1_confidence", "Calibrated CNN top-1 probability",
                                    ["version"], buckets=tuple(edges[1:-1]) + (float("inf"),), registry=r)
        self.answers = Counter("catcascade_drift_answers", "Computed answers by version and whether the VLM was asked",
                               ["version", "escalated"], registry=r)
        self.agreements = Counter("catcascade_vlm_cnn_top1", "Escalated answers by whether the VLM's top choice "
                                  "was the CNN's", ["version", "agree"], registry=r)
        self.psi = Gauge("catcascade_drift_confidence_psi", "Population-stability index of the recent top-1 "
                         "confidence against the bundle's validation histogram (NaN without one)", ["version"],
                         registry=r)
        self.escalation_rate = Gauge("catcascade_drift_escalation_rate", "Share of the recent answers that "
                                     "were escalated to the VLM", ["version"], registry=r)
        self.agreement_rate = Gauge("catcascade_drift_vlm_cnn_agreement", "Share of the recent escalated "
                                    "answers where the VLM's top choice was the CNN's", ["version"], registry=r)


def vlm_agrees(cnn_top1: str, vlm) -> bool | None:
    """Whether the VLM's top choice (a ``vlm_stage.scoring.CandidateScores``; "none of these"
    counts as a choice) was the CNN's top label; None when the VLM did not answer."""
    if vlm is None or not vlm.candidates:
        return None
    best = max(range(len(vlm.candidates)), key=lambda i: vlm.probabilities[i])
    return vlm.probabilities[best] >= vlm.none_probability and vlm.candidates[best] == cnn_top1


_FAMILIES: "weakref.WeakKeyDictionary[object, DriftMetrics]" = weakref.WeakKeyDictionary()


def drift_metrics(registry, edges: list[float]) -> DriftMetrics:
    """The registry's drift metric families (created on first use: a registry takes a name once)."""
    if registry not in _FAMILIES:
        _FAMILIES[registry] = DriftMetrics(registry, edges)
    return _FAMILIES[registry]


class DriftMonitor:
    """One model version's drift signals over its last ``window`` computed answers."""

    def __init__(self, version: str, reference: ConfidenceHistogram | None, config: DriftConfig = DriftConfig(),
                 registry=None):
        self.version = version
        self.reference = reference
        self.edges = reference.edges if reference is not None else equal_width_edges()
        self._ref_fractions = reference.fractions() if reference is not None else None
        self._confidences: deque[float] = deque(maxlen=config.window)
        self._escalated: deque[bool] = deque(maxlen=config.window)
        self._agreed: deque[bool] = deque(maxlen=config.window)
        self._children = None
        if registry is not None:
            m = drift_metrics(registry, self.edges)
            self._children = (m.confidence.labels(version), m.answers.labels(version, "true"),
                              m.answers.labels(version, "false"), m.agreements.labels(version, "true"),
                              m.agreements.labels(version, "false"))
            m.psi.labels(version).set_function(self.psi)
            m.escalation_rate.labels(version).set_function(self.escalation_rate)
            m.agreement_rate.labels(version).set_function(self.agreement_rate)

    def observe(self, top1_confidence: float, escalated: bool, vlm_agrees: bool | None) -> None:
        """One computed answer: the calibrated CNN top-1 probability, whether the VLM answered,
        and (when it did) whether its top choice was the CNN's."""
        self._confidences.append(top1_confidence)
        self._escalated.append(escalated)
        if vlm_agrees is not None:
            self._agreed.append(vlm_agrees)
        if self._children is not None:
            hist, esc_yes, esc_no, agree_yes, agree_no = self._children
            hist.observe(top1_confidence)
            (esc_yes if escalated else esc_no).inc()
            if vlm_agrees is not None:
                (agree_yes if vlm_agrees else agree_no).inc()

    def psi(self) -> float:
        if self._ref_fractions is None or not self._confidences:
            return math.nan
        return population_stability_index(self._ref_fractions, bin_counts(list(self._confidences), self.edges))

    def escalation_rate(self) -> float:
        return sum(self._escalated) / len(self._escalated) if self._escalated else math.nan

    def agreement_rate(self) -> float:
        return sum(self._agreed) / len(self._agreed) if self._agreed else math.nan
