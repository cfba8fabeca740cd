"""Prometheus metrics for the service, on their own registry (served over HTTP when enabled)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_MS_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.http_server = None
        r = self.registry
        self.requests = Counter("catcascade_requests", "Classify requests by final gRPC status code",
                                ["method", "code"], registry=r)
        self.stage_ms = Histogram("catcascade_stage_milliseconds", "Time per stage of a request",
                                  ["stage"], buckets=_MS_BUCKETS, registry=r)
        self.escalations = Counter("catcascade_escalation_decisions", "Escalation decisions by reason",
                                   ["reason"], registry=r)
        self.batch_size = Histogram("catcascade_cnn_batch_size", "Images per CNN batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("catcascade_cnn_queue_depth", "Images waiting for the CNN", registry=r)
        self.batches_running = Gauge("catcascade_cnn_batches_running",
                                     "CNN batches in the model now (at most batching.instances)", registry=r)
        self.inflight = Gauge("catcascade_inflight_requests", "Requests being processed", registry=r)
        self.inflight_escalations = Gauge("catcascade_inflight_escalations", "VLM calls in flight", registry=r)
        self.vlm_errors = Counter("catcascade_vlm_errors", "VLM calls that failed, by kind", ["kind"], registry=r)
        self.images_refused = Counter("catcascade_images_refused", "Images refused before or while decoding, by "
                                      "reason (format, corrupt, dimensions, pixels, aspect, memory, scans, segments...)",
                                      ["reason"], registry=r)
        self.decodes_started = Counter("catcascade_decodes_started", "Decode jobs a decode thread started",
                                       registry=r)
        self.decodes_skipped = Counter("catcascade_decodes_skipped", "Decode jobs dropped unstarted: the call was "
                                       "cancelled, or its deadline had passed", ["why"], registry=r)
        self.unauthenticated = Counter("catcascade_unauthenticated", "Calls refused for a missing or wrong bearer "
                                       "token, by method", ["method"], registry=r)
        self.breaker_state = Gauge("catcascade_vlm_breaker_state", "VLM circuit breaker: 0 closed, 1 open, 2 half-open",
                                   registry=r)
        self.admission_refusals = Counter("catcascade_admission_refusals",
                                          "Requests refused because the queue would miss their deadline "
                                          "(deadline) or wait too long (queue_wait)", ["reason"], registry=r)
        self.admission_wait_ms = Gauge("catcascade_admission_wait_estimate_milliseconds",
                                       "Estimated wait through decode and CNN for a request arriving now", registry=r)

    def serve_http(self, port: int, host: str = "127.0.0.1", tls=None, tokens: list[str] | None = None):
        """Starts the /metrics endpoint (HTTPS with ``tls``, bearer-token protected with
        ``tokens``); returns (server, thread) and keeps the server as ``http_server``."""
        from catcascade.serving.observability.metrics_endpoint import start_metrics_server

        server, thread = start_metrics_server(self.registry, port, host, tls=tls, tokens=tokens)
        self.http_server = server
        return server, thread

    def stop_http(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None
