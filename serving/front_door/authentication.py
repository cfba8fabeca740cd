"""Bearer-token authentication as a grpc.aio server interceptor (and the token check the
metrics endpoint shares)."""
from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

# Load balancers and orchestrators probe health without credentials.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort(_request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


def bearer_credentials(value: str | bytes | None) -> str | None:
    """The token of an ``Authorization`` value ``Bearer <token>``: the scheme is
    case-insensitive (RFC 9110 section 11.1) and spaces around the token are not part of it.
    None for another scheme or no token."""
    if not isinstance(value, str):
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip(" \t")
    return token if scheme.lower() == "bearer" and token else None


class TokenSet:
    """Accepted bearer tokens, compared in constant time."""

    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("a token set needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    def accepts(self, authorization: str | None) -> bool:
        given = bearer_credentials(authorization)
        if given is None:
            return False
        g = given.encode()
        return any(hmac.compare_digest(g, t) for t in self._tokens)  # no early exit: timing says nothing


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata with one of the accepted tokens;
    ``on_refused(method)`` is called for every call it refuses (a metrics counter)."""

    def __init__(self, tokens: list[str], on_refused: Callable[[str], None] | None = None):
        self._tokens = TokenSet(tokens)
        self._on_refused = on_refused

    def _ok(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                return self._tokens.accepts(value)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        if self._ok(handler_call_details.invocation_metadata):
            return handler
        if self._on_refused is not None:
            self._on_refused(handler_call_details.method)
        return _deny_handler(handler, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in gRPC metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None
