"""OpenTelemetry tracing: a span per request with a child span per stage, continuing the
caller's W3C trace context (``traceparent`` gRPC metadata) and handing it on to vLLM.

    catcascade.Classify                     (SERVER span; the caller's trace id)
      ├─ decode
      ├─ cnn_queue                          (from the batcher's own clock readings)
      ├─ cnn
      ├─ vlm      ── HTTP to vLLM with traceparent: vLLM's own spans join the same trace
      └─ blend

Off by default (``tracing.exporter: none``): then `make_tracing` returns `NoTracing`, whose
hooks return shared do-nothing objects, and the opentelemetry packages are not even imported
(the per-request cost is measured in benchmarks/latency.py --features). The server uses a
TracerProvider of its own, not the process-global one, so several servers (tests) and the
host application's own tracing do not mix.
"""
from __future__ import annotations

import contextlib
import time
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

_NULL = contextlib.nullcontext()
TRACEPARENT = "traceparent"


class TracingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exporter: Literal["none", "otlp", "console", "memory"] = Field(
        "none", description="none = tracing off; otlp = export to an OpenTelemetry collector; console = print "
                            "spans; memory = keep them in the process (tests)")
    otlp_endpoint: str | None = Field(None, description="collector address, e.g. http://127.0.0.1:4317 (grpc) or "
                                      "http://127.0.0.1:4318/v1/traces (http); default: OTEL_EXPORTER_OTLP_* env")
    otlp_protocol: Literal["grpc", "http"] = "grpc"
    service_name: str = "catcascade"
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="share of new traces recorded; a caller's "
                                "sampled flag is always followed")


class NoTracing:
    """Tracing off: every hook does nothing, as cheaply as Python allows."""

    enabled = False

    def request_span(self, name: str, metadata=None):
        return _NULL

    def stage(self, name: str, attributes: Mapping | None = None):
        return _NULL

    def record_stage(self, name: str, start_ns: int, end_ns: int, attributes: Mapping | None = None) -> None:
        pass

    def annotate(self, span, attributes: Mapping) -> None:
        pass

    def outgoing_headers(self) -> dict[str, str]:
        return {}

    def shutdown(self) -> None:
        pass


class OtelTracing(NoTracing):
    """Tracing on, with the exporter the config names."""

    enabled = True

    def __init__(self, config: TracingConfig):
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as e:  # pragma: no cover - the packages are in requirements/project.txt
            raise RuntimeError("tracing needs opentelemetry-api and opentelemetry-sdk "
                               "(pip install opentelemetry-sdk)") from e
        self.config = config
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        self.memory_exporter = None
        self.provider.add_span_processor(self._processor(config))
        self.tracer = self.provider.get_tracer("catcascade.serving")

    def _processor(self, config: TracingConfig):
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

        if config.exporter == "memory":
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            self.memory_exporter = InMemorySpanExporter()
            return SimpleSpanProcessor(self.memory_exporter)
        if config.exporter == "console":
            return SimpleSpanProcessor(ConsoleSpanExporter())
        kwargs = {"endpoint": config.otlp_endpoint} if config.otlp_endpoint else {}
        try:
            if config.otlp_protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                if config.otlp_endpoint and config.otlp_endpoint.startswith("http://"):
                    kwargs["insecure"] = True
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise RuntimeError(f"tracing.exporter otlp ({config.otlp_protocol}) needs "
                               f"opentelemetry-exporter-otlp-proto-{config.otlp_protocol}") from e
        return BatchSpanProcessor(OTLPSpanExporter(**kwargs))

    def request_span(self, name: str, metadata=None):
        """The request's SERVER span, made current, continuing the caller's trace if the
        gRPC metadata carries a ``traceparent``."""
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        parent = self._propagator.extract(carrier) if TRACEPARENT in carrier else None
        return self.tracer.start_as_current_span(name, context=parent, kind=self._trace.SpanKind.SERVER)

    def stage(self, name: str, attributes: Mapping | None = None):
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def record_stage(self, name: str, start_ns: int, end_ns: int, attributes: Mapping | None = None) -> None:
        """A span for a stage timed elsewhere (the batcher's queue and model time)."""
        span = self.tracer.start_span(name, start_time=start_ns, attributes=attributes)
        span.end(end_time=end_ns)

    def annotate(self, span, attributes: Mapping) -> None:
        if span is not None and span.is_recording():
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def outgoing_headers(self) -> dict[str, str]:
        """W3C trace context of the current span, for HTTP calls made on its behalf."""
        headers: dict[str, str] = {}
        self._propagator.inject(headers)
        return headers

    def shutdown(self) -> None:
        self.provider.shutdown()


def make_tracing(config: TracingConfig | None) -> NoTracing:
    return OtelTracing(config) if config is not None and config.exporter != "none" else NoTracing()


def now_ns() -> int:
    """The clock span timestamps use (wall time in nanoseconds)."""
    return time.time_ns()
