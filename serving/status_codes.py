"""The one table from project exception to the gRPC status a caller gets, and ``status_of``,
which every handler uses to turn a failure into (status code, message).

The most specific class in an exception's MRO that the table names wins, so a subclass inherits
its parent's status unless it has an entry of its own. INTERNAL never carries the exception's
text (a bug's message may hold paths or data; the server logs it): anything that is not a
CatcascadeError, and any CatcascadeError without a more specific entry, answers INTERNAL with
a fixed message."""
from __future__ import annotations

import sys

import grpc

from catcascade.cnn_stage.decode_budget import InvalidImageError
from catcascade.ensemble.bundle import BundleError
from catcascade.errors import CatcascadeError
from catcascade.serving.batcher import QueueFullError
from catcascade.serving.engines.cnn_engine import EngineUnavailableError
from catcascade.serving.model_repository.loading import VersionRejected
from catcascade.serving.pipeline import DeadlineExceededError
from catcascade.serving.request_errors import InvalidRequestError, OverloadedError, UnknownVersionError
from catcascade.serving.traffic.admission import AdmissionRefused
from catcascade.vlm_stage.vllm_client import VlmUnavailableError

STATUS_CODES: dict[type[CatcascadeError], grpc.StatusCode] = {
    CatcascadeError: grpc.StatusCode.INTERNAL,  # a project error nobody expects to reach a caller
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidImageError: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownVersionError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,  # and DeadlineUnmeetableError, its subclass
    AdmissionRefused: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    EngineUnavailableError: grpc.StatusCode.UNAVAILABLE,  # the CNN stage is down: clients may retry
    VlmUnavailableError: grpc.StatusCode.UNAVAILABLE,
    VersionRejected: grpc.StatusCode.FAILED_PRECONDITION,
    BundleError: grpc.StatusCode.FAILED_PRECONDITION,
}

MESSAGE_PREFIXES: dict[type[CatcascadeError], str] = {
    QueueFullError: "server overloaded: ",
}
"""Put before the exception's text, found like the status (most specific class first)."""

INTERNAL_MESSAGE = "internal error (logged on the server)"
MAX_MESSAGE_CHARS = 300


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the message to send for ``exc``: its own text (bounded to
    MAX_MESSAGE_CHARS, never its class name or a traceback), INTERNAL_MESSAGE for INTERNAL."""
    exc = _ray_cause(exc)
    if not isinstance(exc, CatcascadeError):
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    code = next(STATUS_CODES[cls] for cls in type(exc).__mro__ if cls in STATUS_CODES)
    if code == grpc.StatusCode.INTERNAL:
        return code, INTERNAL_MESSAGE
    prefix = next((MESSAGE_PREFIXES[cls] for cls in type(exc).__mro__ if cls in MESSAGE_PREFIXES), "")
    return code, _bounded(prefix + str(exc))


def _ray_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, for one Ray re-raised around it: a RayTaskError's
    ``str`` is the remote traceback, its ``cause`` the original (typed) exception. Ray is only
    looked at where something already imported it."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    while ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError) and isinstance(
            exc.cause, BaseException):
        exc = exc.cause
    return exc


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."
