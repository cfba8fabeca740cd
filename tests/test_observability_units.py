"""Unit tests of serving/observability/ (tracing, drift) and the confidence histogram the bundle
carries for it."""
from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from catcascade.ensemble.confidence_histogram import (ConfidenceHistogram, bin_counts, equal_width_edges,
                                           population_stability_index, top1_confidence_histogram)
from catcascade.serving.observability.drift import DriftConfig, DriftMonitor
from catcascade.serving.observability.tracing import NoTracing, OtelTracing, TracingConfig, make_tracing


def test_confidence_histogram_of_top1_probabilities():
    probs = np.array([[0.95, 0.05], [0.55, 0.45], [0.5, 0.5], [0.1, 0.9]])
    h = top1_confidence_histogram(probs, bins=10)
    assert h.edges[0] == 0.0 and h.edges[-1] == 1.0 and len(h.counts) == 10
    assert h.counts[5] == 2 and h.counts[9] == 2 and sum(h.counts) == 4  # 0.5 and 0.55; 0.9 and 0.95
    assert list(bin_counts([-1.0, 2.0], h.edges)) == [1] + [0] * 8 + [1]  # out of range: the end bins
    with pytest.raises(ValueError, match="counts"):
        ConfidenceHistogram(edges=[0.0, 0.5, 1.0], counts=[1])
    with pytest.raises(ValueError, match="increase"):
        ConfidenceHistogram(edges=[0.0, 0.5, 0.5], counts=[1, 1])


def test_population_stability_index_is_zero_for_the_same_mix_and_large_for_a_shift():
    ref = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    assert population_stability_index(ref, ref * 1000) == pytest.approx(0.0, abs=1e-12)
    shifted = np.array([0, 0, 10, 30, 60])
    assert population_stability_index(ref, shifted) > 0.25
    assert population_stability_index(ref, [0, 0, 0, 0, 0]) == 0.0


def test_old_bundle_manifests_without_a_histogram_still_load():
    from catcascade.ensemble.bundle import CnnSpec

    old = CnnSpec.model_validate({"architecture": "convnext_atto", "sha256": "0" * 64, "temperature": 1.5})
    assert old.confidence_histogram is None
    new = CnnSpec.model_validate({"architecture": "convnext_atto", "sha256": "0" * 64,
                                  "confidence_histogram": {"edges": [0, 0.5, 1], "counts": [3, 7]}})
    assert new.confidence_histogram.fractions().tolist() == [0.3, 0.7]


def test_drift_index_rises_when_confidences_shift_and_gauges_reach_prometheus():
    rng = np.random.default_rng(0)
    ref_conf = rng.beta(8, 2, 2000)  # a confident model on its validation set
    edges = equal_width_edges()
    reference = ConfidenceHistogram(edges=edges, counts=bin_counts(ref_conf, edges).tolist())
    registry = CollectorRegistry()
    monitor = DriftMonitor("demo:1", reference, DriftConfig(window=200), registry)
    for c in rng.beta(8, 2, 200):
        monitor.observe(float(c), escalated=c < 0.6, vlm_agrees=True if c < 0.6 else None)
    steady = monitor.psi()
    for c in rng.beta(2, 2, 200):  # the images changed: much less confident
        monitor.observe(float(c), escalated=c < 0.6, vlm_agrees=bool(c > 0.4) if c < 0.6 else None)
    shifted = monitor.psi()
    assert steady < 0.1 < 0.25 < shifted
    assert 0.4 < monitor.escalation_rate() < 0.9 and monitor.agreement_rate() < 1.0
    text = generate_latest(registry).decode()
    assert f'catcascade_drift_confidence_psi{{version="demo:1"}} {shifted}' in text
    assert 'catcascade_cnn_top1_confidence_count{version="demo:1"} 400.0' in text
    assert 'catcascade_drift_answers_total{escalated="true",version="demo:1"}' in text
    assert 'catcascade_vlm_cnn_top1_total{agree="false",version="demo:1"}' in text
    # A second version shares the registry (e.g. after a reload) with its own children.
    DriftMonitor("demo:2", None, DriftConfig(), registry).observe(0.5, False, None)
    assert 'catcascade_drift_confidence_psi{version="demo:2"} NaN' in generate_latest(registry).decode()


def test_vlm_agreement_counts_none_of_these_as_a_choice():
    from catcascade.serving.observability.drift import vlm_agrees
    from catcascade.vlm_stage.scoring import CandidateScores

    def scores(probs, none):
        return CandidateScores(("Bengal", "Persian"), probs, none, "cats", "multiple_choice")

    assert vlm_agrees("Bengal", scores((0.6, 0.3), 0.1)) is True
    assert vlm_agrees("Bengal", scores((0.3, 0.6), 0.1)) is False
    assert vlm_agrees("Bengal", scores((0.2, 0.1), 0.7)) is False
    assert vlm_agrees("Bengal", None) is None


def test_tracing_is_off_by_default_and_off_costs_no_spans():
    from catcascade.serving.config import ServeConfig

    off = make_tracing(ServeConfig(bundle="/b").tracing)
    assert isinstance(off, NoTracing) and not off.enabled
    with off.request_span("x", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]) as span:
        assert span is None
    assert off.outgoing_headers() == {}


def test_tracing_continues_the_callers_trace_and_hands_it_on():
    tracing = make_tracing(TracingConfig(exporter="memory"))
    assert isinstance(tracing, OtelTracing)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = [("traceparent", f"00-{trace_id}-{parent_id}-01"), ("authorization", "Bearer x")]
    with tracing.request_span("catcascade.Classify", metadata) as request_span:
        with tracing.stage("vlm"):
            headers = tracing.outgoing_headers()
        tracing.record_stage("cnn", 1_000, 2_000, {"catcascade.cnn.batch_size": 4})
        tracing.annotate(request_span, {"catcascade.escalation_reason": "ESCALATION_REASON_SHED", "none": None})
    spans = {s.name: s for s in tracing.memory_exporter.get_finished_spans()}
    assert set(spans) == {"catcascade.Classify", "vlm", "cnn"}
    assert all(format(s.context.trace_id, "032x") == trace_id for s in spans.values())
    assert format(spans["catcascade.Classify"].parent.span_id, "016x") == parent_id
    assert spans["vlm"].parent.span_id == spans["cnn"].parent.span_id == spans["catcascade.Classify"].context.span_id
    assert spans["cnn"].start_time == 1_000 and spans["cnn"].attributes["catcascade.cnn.batch_size"] == 4
    assert spans["catcascade.Classify"].attributes["catcascade.escalation_reason"] == "ESCALATION_REASON_SHED"
    assert headers["traceparent"] == f"00-{trace_id}-{format(spans['vlm'].context.span_id, '016x')}-01"
    tracing.shutdown()


def test_escalation_reasons_mirror_the_proto():
    from catcascade.ensemble.escalation_policy import EscalationReason
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.traffic.priorities import Priority

    assert {f"ESCALATION_REASON_{r.name}": int(r) for r in EscalationReason} == dict(pb.EscalationReason.items())
    assert {f"PRIORITY_{p.name}": int(p) for p in Priority} == dict(pb.Priority.items())
