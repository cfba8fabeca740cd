"""The first stage: a protobuf ClassifyRequest checked and turned into the one request type."""
from __future__ import annotations

import uuid
from typing import Mapping

from catcascade.ensemble.escalation_policy import EscalationMode
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import ClassifyRequest
from catcascade.serving.request_errors import InvalidRequestError
from catcascade.serving.traffic.priorities import Priority

MAX_REQUEST_ID = 128
MAX_TOP_K = 100


def validated_request(message: pb.ClassifyRequest, *, labels: int, deadline: float | None, tenant: str | None,
                      trace_headers: Mapping[str, str] | None = None) -> ClassifyRequest:
    """The request ``message`` asks for, for a model with ``labels`` labels; raises
    InvalidRequestError saying what is wrong. A missing request_id gets a fresh one."""
    if len(message.request_id) > MAX_REQUEST_ID:
        raise InvalidRequestError(f"request_id longer than {MAX_REQUEST_ID} characters")
    if not message.request_id.isprintable():  # control characters and line breaks could forge log lines
        raise InvalidRequestError("request_id must be printable characters (no control characters or line breaks)")
    if message.top_k > min(MAX_TOP_K, labels):
        raise InvalidRequestError(f"top_k={message.top_k} exceeds the {labels} known labels")
    if message.escalation not in pb.EscalationMode.values():
        raise InvalidRequestError(f"unknown escalation mode {message.escalation}")
    if len(message.model_version) > MAX_REQUEST_ID or not message.model_version.isprintable():
        raise InvalidRequestError(f"model_version must be at most {MAX_REQUEST_ID} printable characters")
    if message.priority not in pb.Priority.values():
        raise InvalidRequestError(f"unknown priority {message.priority}")
    return ClassifyRequest(image=message.image, top_k=message.top_k, mode=EscalationMode(message.escalation),
                           deadline=deadline, priority=Priority(message.priority), tenant=tenant,
                           explain=message.explain, trace_headers=dict(trace_headers or {}),
                           request_id=message.request_id or uuid.uuid4().hex, model_version=message.model_version)
