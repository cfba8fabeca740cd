"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) on the same gRPC
server as catcascade.v1, so the field's clients (tritonclient, perf_analyzer, KServe) talk to
catcascade unmodified.

It uses the stubs the `tritonclient` wheel ships (no copied proto: a second copy of the
`inference.*` messages in one process would clash with the client's). Each element of a
ModelInfer batch is one ``FrontDoor.classify`` call, run concurrently, so admission, deadlines,
auth (the server's interceptor), tenant budgets, the cache, metrics, tracing and status codes
(``status_of``) are the native API's. docs/reference/open-inference.md describes the model.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import time

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as v2

from catcascade import __version__
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.front_door.chain import FrontDoor
from catcascade.serving.front_door.observation import span_attributes
from catcascade.serving.request_errors import MALFORMED, InvalidRequestError, UnknownVersionError, lenient
from catcascade.serving.status_codes import status_of

log = logging.getLogger(__name__)
SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MODEL = "catcascade"
MAX_BATCH = 64
"""Images in one ModelInfer call; each is a request of its own to the front door."""
OUTPUTS = {  # name: (v2 datatype, shape with -1 for the batch and for top_k)
    "labels": ("BYTES", [-1, -1]), "probabilities": ("FP32", [-1, -1]), "escalated": ("BOOL", [-1]),
    "escalation_reason": ("BYTES", [-1]), "vlm": ("BYTES", [-1]), "versions": ("BYTES", [-1]),
    "rationale": ("BYTES", [-1]),
}
CONFIG_TYPES = {"BYTES": mc.TYPE_STRING, "FP32": mc.TYPE_FP32, "BOOL": mc.TYPE_BOOL}
ESCALATION = {"auto": pb.ESCALATION_MODE_AUTO, "never": pb.ESCALATION_MODE_NEVER, "always": pb.ESCALATION_MODE_ALWAYS}
PRIORITY = {"interactive": pb.PRIORITY_INTERACTIVE, "batch": pb.PRIORITY_BATCH}
IMPLEMENTED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
               "ModelInfer", "RepositoryIndex")
ONE_BUNDLE = "1"
"""The version a server of one bundle (``serve --bundle``) reports; it has no others."""


def _scalar(p: v2.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def request_options(parameters) -> tuple[dict, float | None]:
    """ClassifyRequest fields from the request's parameters, and Triton's ``timeout`` (in
    microseconds) as seconds. Triton's numeric ``priority`` (0 default, 1 highest) maps
    0-1 to interactive and larger values to batch. Triton's own ``triton_*`` parameters (its
    clients add some, e.g. perf_analyzer's ``triton_enable_empty_final_response``) are ignored;
    other unknown names are refused."""
    fields, timeout_s = {}, None
    for name, p in parameters.items():
        value = _scalar(p) if isinstance(p, v2.InferParameter) else p  # JSON (REST) gives plain values
        if name.startswith("triton_"):
            continue
        if name == "top_k" and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
            fields["top_k"] = value
        elif name == "escalation" and value in ESCALATION:
            fields["escalation"] = ESCALATION[value]
        elif name == "priority" and value in PRIORITY:
            fields["priority"] = PRIORITY[value]
        elif name == "priority" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            fields["priority"] = pb.PRIORITY_INTERACTIVE if value <= 1 else pb.PRIORITY_BATCH
        elif name == "explain" and isinstance(value, bool):
            fields["explain"] = value
        elif name == "timeout" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            timeout_s = value / 1e6
        else:
            raise InvalidRequestError(
                f"parameter {name}={value!r} is not understood: top_k (int), escalation (auto, never, always), "
                "priority (interactive, batch), explain (bool), timeout (int, microseconds)")
    return fields, timeout_s


def serialized_bytes(data: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in its raw form: a 4-byte little-endian length before each."""
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise InvalidRequestError("raw BYTES input ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", data, at)
        if at + 4 + n > len(data):
            raise InvalidRequestError("raw BYTES input ends inside an element (length prefix larger than the data)")
        out.append(data[at + 4:at + 4 + n])
        at += 4 + n
    return out


def images_of(request: v2.ModelInferRequest) -> list[bytes]:
    """The encoded images of input ``image`` (BYTES, shape [N] or [N, 1]), raw or in contents."""
    if len(request.inputs) != 1 or request.inputs[0].name != "image":
        raise InvalidRequestError(f"expected one input named 'image', got {[i.name for i in request.inputs]}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"input 'image' must be BYTES (one encoded image per element), not {tensor.datatype}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or not 1 <= shape[0] <= MAX_BATCH:
        raise InvalidRequestError(f"input 'image' must have shape [N] or [N, 1] with 1 <= N <= {MAX_BATCH}, "
                                  f"not {shape}")
    if len(request.raw_input_contents) > 1:
        raise InvalidRequestError("raw_input_contents has more entries than the one input")
    images = (serialized_bytes(request.raw_input_contents[0]) if request.raw_input_contents
              else list(tensor.contents.bytes_contents))
    if len(images) != shape[0]:
        raise InvalidRequestError(f"input 'image' has {len(images)} elements for shape {shape}")
    return images


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _json(message) -> bytes:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), sort_keys=True).encode()


def output_tensors(responses: list[pb.ClassifyResponse]) -> dict[str, tuple[list[int], bytes]]:
    """Each output's shape and raw contents for the batch's answers (rankings padded with ''
    and 0 to the longest, should they differ in length)."""
    n, k = len(responses), max(len(r.labels) for r in responses)
    labels = [[s.label.encode() for s in r.labels] + [b""] * (k - len(r.labels)) for r in responses]
    probs = np.array([[s.probability for s in r.labels] + [0.0] * (k - len(r.labels)) for r in responses],
                     dtype="<f4").reshape(n, k)
    return {
        "labels": ([n, k], _bytes_tensor([label for row in labels for label in row])),
        "probabilities": ([n, k], probs.tobytes()),
        "escalated": ([n], bytes(bool(r.escalated) for r in responses)),
        "escalation_reason": ([n], _bytes_tensor([pb.EscalationReason.Name(r.escalation_reason)
                                                 .removeprefix("ESCALATION_REASON_").encode() for r in responses])),
        "vlm": ([n], _bytes_tensor([_json(r.vlm) if r.HasField("vlm") else b"" for r in responses])),
        "versions": ([n], _bytes_tensor([_json(r.versions) for r in responses])),
        "rationale": ([n], _bytes_tensor([r.rationale.text.encode() for r in responses])),
    }


class OpenInferenceServicer:
    """`inference.GRPCInferenceService` for one model, ``catcascade``, over the front door. A
    model repository's served versions (the live one and the candidate) are the model's
    versions, as in Triton's repository: an empty ``model_version`` is routed (a canary may
    answer; the ``versions`` output names who did), a version's name pins the request to it."""

    def __init__(self, front_door: FrontDoor, tracing):
        self.front_door = front_door
        self.metrics = front_door.metrics
        self.tracing = tracing

    def add_to(self, server) -> None:
        """Registers the implemented methods; the protocol's others answer UNIMPLEMENTED."""
        handlers = {}
        for method in SERVICE.methods:
            if method.name in IMPLEMENTED:
                parse = lenient(getattr(v2, method.input_type.name).FromString)
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._guarded(method.name, getattr(self, method.name)), parse,
                    getattr(v2, method.output_type.name).SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))

    def _guarded(self, name: str, handler):
        async def call(request, context):
            if request is MALFORMED:
                if name == "ModelInfer":
                    self.metrics.requests.labels(name, "INVALID_ARGUMENT").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid v2 protobuf message")
            try:
                return await handler(request, context)
            except UnknownVersionError as e:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return call

    def versions(self) -> list[str]:
        return list(self.front_door.router.served_versions()) or [ONE_BUNDLE]

    def _pin(self, name: str, version: str) -> str:
        """The ClassifyRequest.model_version for a v2 (name, version); UnknownVersionError if not served."""
        if name != MODEL or version not in ("", *self.versions()):
            raise UnknownVersionError(f"unknown model '{name}' version '{version}': this server serves '{MODEL}' "
                                      f"(versions {', '.join(self.versions())})")
        return "" if version == ONE_BUNDLE else version

    async def ServerLive(self, request, context):
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return v2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        try:
            self._pin(request.name, request.version)
        except UnknownVersionError:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return v2.ServerMetadataResponse(name="catcascade", version=__version__,
                                         extensions=["model_configuration", "parameters"])

    async def ModelMetadata(self, request, context):
        self._pin(request.name, request.version)
        tensor = v2.ModelMetadataResponse.TensorMetadata
        return v2.ModelMetadataResponse(
            name=MODEL, versions=self.versions(), platform="catcascade",
            inputs=[tensor(name="image", datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=name, datatype=t, shape=shape) for name, (t, shape) in OUTPUTS.items()])

    async def ModelConfig(self, request, context):
        self._pin(request.name, request.version)
        return v2.ModelConfigResponse(config=mc.ModelConfig(
            name=MODEL, platform="catcascade", backend="catcascade", max_batch_size=0,
            input=[mc.ModelInput(name="image", data_type=mc.TYPE_STRING, dims=[-1])],
            output=[mc.ModelOutput(name=name, data_type=CONFIG_TYPES[t], dims=shape)
                    for name, (t, shape) in OUTPUTS.items()]))

    async def RepositoryIndex(self, request, context):
        """Triton's repository extension: one entry per served version."""
        return v2.RepositoryIndexResponse(models=[v2.RepositoryIndexResponse.ModelIndex(
            name=MODEL, version=version, state="READY") for version in self.versions()])

    async def ModelInfer(self, request, context):
        try:
            return await self.infer(request, context.invocation_metadata(), context.time_remaining())
        except Exception as e:
            await context.abort(*status_of(e))

    async def infer(self, request: v2.ModelInferRequest, metadata, remaining_s: float | None,
                    method: str = "ModelInfer") -> v2.ModelInferResponse:
        """ModelInfer for either transport (gRPC, REST): counted under ``method``; a failure
        raises, for the transport to answer with ``status_of``'s code."""
        count = self.metrics.requests.labels
        try:
            response = await self._infer(request, metadata, remaining_s)
        except asyncio.CancelledError:
            count(method, "CANCELLED").inc()
            raise
        except Exception as e:
            status, _ = status_of(e)
            if status == grpc.StatusCode.INTERNAL:
                log.exception("internal error on %s id=%s", method, request.id)
            count(method, status.name).inc()
            raise
        count(method, "OK").inc()
        return response

    async def _infer(self, request, metadata, remaining_s: float | None) -> v2.ModelInferResponse:
        pin = self._pin(request.model_name, request.model_version)
        images = images_of(request)
        fields, timeout_s = request_options(request.parameters)
        wanted = [o.name for o in request.outputs] or list(OUTPUTS)
        if unknown := [name for name in wanted if name not in OUTPUTS]:
            raise InvalidRequestError(f"unknown outputs {unknown}; this model has {list(OUTPUTS)}")
        deadline = _deadline(remaining_s, timeout_s)
        tenant = self.front_door.tenant_of(metadata)

        def message(i: int, image: bytes) -> pb.ClassifyRequest:
            request_id = request.id if len(images) == 1 else (f"{request.id}/{i}" if request.id else "")
            return pb.ClassifyRequest(image=image, request_id=request_id, model_version=pin, **fields)

        if self.tracing.enabled:
            with self.tracing.request_span("catcascade.ModelInfer", metadata) as span:
                headers = self.tracing.outgoing_headers()
                answers = await self._all([message(i, im) for i, im in enumerate(images)], tenant, deadline, headers)
                if len(answers) == 1:
                    self.tracing.annotate(span, span_attributes(message(0, images[0]), answers[0]))
        else:
            answers = await self._all([message(i, im) for i, im in enumerate(images)], tenant, deadline, None)
        tensors = output_tensors(answers)
        response = v2.ModelInferResponse(model_name=MODEL, model_version=request.model_version or self.versions()[0],
                                         id=request.id)
        for name in wanted:
            shape, raw = tensors[name]
            response.outputs.add(name=name, datatype=OUTPUTS[name][0], shape=shape)
            response.raw_output_contents.append(raw)
        return response

    async def _all(self, messages, tenant, deadline, headers) -> list[pb.ClassifyResponse]:
        """Every element through the front door at once; the first failure cancels the rest."""
        tasks = [asyncio.ensure_future(self.front_door.classify(m, tenant=tenant, deadline=deadline,
                                                                trace_headers=headers)) for m in messages]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their cleanup (tickets, slots) runs
            raise


def _deadline(remaining_s: float | None, timeout_s: float | None) -> float | None:
    """The earlier of the call's own deadline (gRPC's time remaining) and Triton's ``timeout``."""
    candidates = [r for r in (remaining_s, timeout_s) if r is not None]
    return time.monotonic() + min(candidates) if candidates else None
