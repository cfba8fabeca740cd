"""The errors the front door raises about a request itself, before or instead of running it;
serving/status_codes.py maps each to the gRPC status the caller gets."""
from __future__ import annotations

from catcascade.errors import CatcascadeError


class InvalidRequestError(CatcascadeError):
    """The request is malformed or asks for what the service does not offer: the caller must
    change it (INVALID_ARGUMENT)."""


class OverloadedError(CatcascadeError):
    """The service cannot take the request now; the same request may succeed later
    (RESOURCE_EXHAUSTED)."""

