"""Building a ClassifyRequest from what a caller has at hand (a path or bytes, names for enums)."""
from __future__ import annotations

from pathlib import Path

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.client.results import EscalationMode, Priority, parse_enum

ImageInput = bytes | str | Path


def image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


def classify_request(image: ImageInput, top_k: int = 0, mode="auto", request_id: str = "",
                     priority="interactive", explain: bool = False, model_version: str = "") -> pb.ClassifyRequest:
    """``mode``: auto, never or always (or the enum); ``priority``: interactive or batch;
    ``explain`` asks the VLM for a short rationale (ClassifyResponse.rationale);
    ``model_version`` pins a model repository's served version (empty: the server routes)."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return pb.ClassifyRequest(image=image_bytes(image), top_k=top_k,
                              escalation=int(parse_enum(EscalationMode, mode)), request_id=request_id,
                              priority=int(parse_enum(Priority, priority)), explain=explain,
                              model_version=model_version)
