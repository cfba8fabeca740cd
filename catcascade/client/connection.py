"""Channel settings shared by the blocking and asyncio clients: TLS, tokens, trace context."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# A restarted server should be found again within a second or two, not after gRPC's default
# reconnect backoff (which grows to two minutes); the retry policy paces the calls themselves.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
# gRPC shares connections between channels to the same address by default (a process-wide
# subchannel pool). A new client would then inherit another channel's failed connection and
# get "Connection refused" from a server that is up (the other channel saw the port closed, say
# while the server restarted, and is waiting out its reconnect backoff). A client owns its
# connections instead; channels inside one client still share theirs.
OWN_CONNECTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class Connection:
    """Where and how to connect. ``tls_ca`` switches to TLS (``tls_cert``/``tls_key`` add a
    client certificate for mutual TLS); ``token`` is sent as ``authorization: Bearer <token>``;
    ``propagate_trace`` sends the current OpenTelemetry trace context (``traceparent``)."""

    target: str
    token: str | None = None
    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    server_name: str | None = None
    propagate_trace: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("a client certificate needs tls_ca (the server's CA) too")

    def options(self) -> list[tuple[str, object]]:
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *RECONNECT_OPTIONS, *OWN_CONNECTIONS]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.tls_ca).read_bytes(),
            private_key=Path(self.tls_key).read_bytes() if self.tls_key else None,
            certificate_chain=Path(self.tls_cert).read_bytes() if self.tls_cert else None)

    def channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is not None:
            return grpc.secure_channel(self.target, creds, options=self.options())
        return grpc.insecure_channel(self.target, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is not None:
            return grpc.aio.secure_channel(self.target, creds, options=self.options())
        return grpc.aio.insecure_channel(self.target, options=self.options())

    def metadata(self, extra=None) -> tuple[tuple[str, str], ...] | None:
        md = [("authorization", f"Bearer {self.token}")] if self.token else []
        if self.propagate_trace:
            md += trace_context_metadata()
        if extra:
            md += list(extra.items() if isinstance(extra, dict) else extra)
        return tuple(md) or None


def trace_context_metadata() -> list[tuple[str, str]]:
    """The current OpenTelemetry context as W3C ``traceparent``/``tracestate`` metadata."""
    try:
        from opentelemetry.propagate import inject
    except ImportError as e:
        raise RuntimeError("propagate_trace needs opentelemetry-api (pip install opentelemetry-api)") from e
    carrier: dict[str, str] = {}
    inject(carrier)
    return list(carrier.items())
