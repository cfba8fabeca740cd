"""Prometheus metrics of the model repository, labelled by version, on the service's registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class RepositoryMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter("catcascade_model_requests", "Requests run per version and route (live, canary, "
                                "shadow), by outcome (ok or the error's type)", ["version", "route", "outcome"],
                                registry=r)
        self.latency_ms = Histogram("catcascade_model_latency_milliseconds", "Server time per request, per version "
                                    "and route", ["version", "route"], buckets=_MS_BUCKETS, registry=r)
        self.escalated = Counter("catcascade_model_escalated", "Requests the VLM answered, per version and route",
                                 ["version", "route"], registry=r)
        self.shadow_comparisons = Counter("catcascade_shadow_comparisons", "Shadow copies compared with the live "
                                          "answer, by whether the top-1 labels agree",
                                          ["live", "candidate", "top1"], registry=r)
        self.shadow_dropped = Counter("catcascade_shadow_dropped", "Shadow copies not run: shadow_max_concurrency "
                                      "copies were running", ["candidate"], registry=r)
        self.top1_agreement = Gauge("catcascade_candidate_top1_agreement", "Share of shadowed requests where the "
                                    "candidate's top-1 label is the live one's (current window)",
                                    ["live", "candidate"], registry=r)
        self.loads = Counter("catcascade_model_loads", "Version loads by outcome (loaded, rejected) and the "
                             "rejection's reason", ["version", "outcome", "reason"], registry=r)
        self.serving = Gauge("catcascade_model_serving", "1 while a version serves in a role (live, canary, "
                             "shadow)", ["version", "role"], registry=r)
        self.swaps = Counter("catcascade_model_swaps", "Times the live version or the candidate changed", registry=r)
        self.adapters = Gauge("catcascade_lora_adapters_loaded", "LoRA adapters loaded into vLLM for the "
                              "repository's versions", registry=r)
