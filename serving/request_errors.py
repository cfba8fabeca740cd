"""What is wrong with a request itself: malformed bytes, and the errors the front door raises
before or instead of running it (serving/status_codes.py maps each to a gRPC status)."""
from __future__ import annotations

from google.protobuf.message import DecodeError

from catcascade.errors import CatcascadeError

MALFORMED = object()
"""What a message that is not valid protobuf parses to with ``lenient`` (gRPC would answer UNKNOWN)."""


def lenient(parse):
    """``parse`` (a message's FromString) returning MALFORMED instead of raising on bad bytes."""
    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError:
            return MALFORMED
    return deserialize


class InvalidRequestError(CatcascadeError):
    """The request is malformed or asks for what the service does not offer: the caller must
    change it (INVALID_ARGUMENT)."""


class UnknownVersionError(CatcascadeError):
    """The request names a model or version this server does not serve (NOT_FOUND)."""


class OverloadedError(CatcascadeError):
    """The service cannot take the request now; the same request may succeed later
    (RESOURCE_EXHAUSTED)."""

