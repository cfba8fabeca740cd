"""Who a call is: bearer-token authentication and the tenant's name, from one parse.

``Authenticator.identify`` reads the ``authorization`` metadata once; the gRPC interceptor
refuses a call it cannot identify, and the front door names the call's tenant with the same
answer, so a tenant cannot escape its budget by spelling the header another way. The token
check is shared with the metrics endpoint (``TokenSet``)."""
from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

from catcascade.serving.cascade_engine import ANONYMOUS

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
        """Whether an ``Authorization`` value carries an accepted bearer token."""
        given = bearer_credentials(authorization)
        return given is not None and self.accepts_token(given)

    def accepts_token(self, token: str) -> bool:
        g = token.encode()
        return any(hmac.compare_digest(g, t) for t in self._tokens)  # no early exit: timing says nothing


def authorization_of(metadata) -> str | None:
    """The first ``authorization`` value of gRPC metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            return value
    return None


class Authenticator:
    """Accepted tokens and the tenant each tenant token names."""

    def __init__(self, tokens: list[str], tenants: dict[str, str] | None = None):
        """``tokens``: every accepted token (tenant tokens included; empty = no authentication);
        ``tenants``: tenant name -> its token (ServeConfig ``auth.tenants``)."""
        self.required = bool(tokens)
        self._tokens = TokenSet(tokens) if tokens else None
        self._tenant_of_token = {token: name for name, token in (tenants or {}).items()}

    def identify(self, metadata) -> str | None:
        """The caller's tenant: the one its token names, else ``anonymous``; None when
        authentication is required and the token is missing or not accepted."""
        token = bearer_credentials(authorization_of(metadata))
        if self._tokens is not None and (token is None or not self._tokens.accepts_token(token)):
            return None
        return self._tenant_of_token.get(token, ANONYMOUS) if token is not None else ANONYMOUS


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call (health checks aside) that ``authenticator``
    cannot identify; ``on_refused(method)`` is called for each (a metrics counter)."""

    def __init__(self, authenticator: Authenticator, on_refused: Callable[[str], None] | None = None):
        self._authenticator = authenticator
        self._on_refused = on_refused

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        if self._authenticator.identify(handler_call_details.invocation_metadata) is not None:
            return handler
        if self._on_refused is not None:
            self._on_refused(handler_call_details.method)
        return _deny_handler(handler, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")
