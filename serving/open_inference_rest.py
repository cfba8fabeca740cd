"""The Open Inference Protocol's REST API (KServe v2 over HTTP/JSON), for clients without gRPC:
``http_port`` in the config, on the gRPC server's host and TLS. Each call becomes the gRPC
service's message and runs through the same servicer (serving/open_inference.py), so both
transports share the model, the request path and its status codes (as HTTP statuses here).

Images are BYTES elements: base64 strings in the JSON ``data``, or raw with Triton's binary
tensor extension (``Inference-Header-Content-Length``), the form tritonclient.http sends;
outputs come back in JSON, or binary where the request asks for it (``binary_data``).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import ssl

import grpc
import numpy as np
from aiohttp import web
from tritonclient.grpc import service_pb2 as v2

from catcascade.serving.open_inference import OpenInferenceServicer, serialized_bytes
from catcascade.serving.request_errors import InvalidRequestError
from catcascade.serving.status_codes import status_of

HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.FAILED_PRECONDITION: 412,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}
TRANSPORT_PARAMETERS = ("binary_data_output", "binary_data", "binary_data_size")
"""Triton's binary-extension parameters: how tensors travel, not what the model does."""


def _parameter(value) -> v2.InferParameter:
    if isinstance(value, bool):
        return v2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return v2.InferParameter(int64_param=value)
    if isinstance(value, str):
        return v2.InferParameter(string_param=value)
    raise InvalidRequestError(f"parameter value {value!r} must be a bool, an integer or a string")


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{what} must be a JSON object")
    return value


def infer_request(body: bytes, header_length: str | None, name: str, version: str) -> tuple[v2.ModelInferRequest, bool]:
    """The gRPC message a REST infer call means, and whether it wants binary outputs."""
    try:
        split = len(body) if header_length is None else int(header_length)
        if not 0 <= split <= len(body):
            raise ValueError
        doc = _object(json.loads(body[:split]), "the request body")
    except ValueError:
        raise InvalidRequestError(f"the request is not a v2 JSON inference request (or {HEADER_LENGTH} is not "
                                  "the JSON part's length)") from None
    binary, at = body[split:], 0
    parameters = _object(doc.get("parameters") or {}, "parameters")
    request = v2.ModelInferRequest(model_name=name, model_version=version, id=str(doc.get("id", "")))
    for key, value in parameters.items():
        if key not in TRANSPORT_PARAMETERS:
            request.parameters[key].CopyFrom(_parameter(value))
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidRequestError("inputs must be a list of tensors")
    for tensor in inputs:
        tensor = _object(tensor, "each input")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidRequestError("each input needs a shape: a list of integers")
        added = request.inputs.add(name=str(tensor.get("name", "")), datatype=str(tensor.get("datatype", "")),
                                   shape=shape)
        size = _object(tensor.get("parameters") or {}, "an input's parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or not 0 <= size <= len(binary) - at:
                raise InvalidRequestError("binary_data_size does not fit the binary part of the body")
            request.raw_input_contents.append(binary[at:at + size])
            at += size
        elif added.datatype == "BYTES":
            data = np.asarray(tensor.get("data", []), dtype=object).ravel()
            try:
                added.contents.bytes_contents.extend(base64.b64decode(e, validate=True) for e in data)
            except (TypeError, ValueError, binascii.Error):
                raise InvalidRequestError("BYTES data must be base64 strings (or binary, with "
                                          f"{HEADER_LENGTH})") from None
    wants_binary = parameters.get("binary_data_output") is True
    for output in doc.get("outputs") or []:
        output = _object(output, "each output")
        request.outputs.add(name=str(output.get("name", "")))
        wants_binary |= _object(output.get("parameters") or {}, "an output's parameters").get("binary_data") is True
    return request, wants_binary


def _decoded(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        return [e.decode("utf-8", "replace") for e in serialized_bytes(raw)]
    if datatype == "FP32":
        return np.frombuffer(raw, "<f4").tolist()
    return [bool(b) for b in raw]


def infer_response(response: v2.ModelInferResponse, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The REST body (JSON, then the binary tensors when ``binary``) and its extra headers."""
    outputs, tail = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        out = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            out["data"] = _decoded(tensor.datatype, raw)
        outputs.append(out)
    head = json.dumps({"model_name": response.model_name, "model_version": response.model_version,
                       "id": response.id, "outputs": outputs}).encode()
    return head + b"".join(tail), ({HEADER_LENGTH: str(len(head))} if binary else {})


class RestFrontDoor:
    """aiohttp handlers over an OpenInferenceServicer."""

    def __init__(self, servicer: OpenInferenceServicer, max_body_bytes: int):
        self.servicer = servicer
        self.authenticator = servicer.front_door.authenticator
        self.max_body_bytes = max_body_bytes

    def app(self):
        @web.middleware
        async def errors(request, handler):
            """Every failure as the protocol's ``{"error": message}`` with the HTTP status of its
            gRPC code; a missing or refused bearer token is 401 before anything runs."""
            if self.authenticator.required and request.path.startswith("/v2/models") and \
                    self.authenticator.identify(self._metadata(request)) is None:
                return self._json({"error": "missing or invalid bearer token"}, 401)
            try:
                return await handler(request)
            except web.HTTPException:
                raise
            except Exception as e:
                code, message = status_of(e)
                return self._json({"error": message}, HTTP_STATUS.get(code, 500))

        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[errors])
        model = "/v2/models/{name}"
        for prefix in (model, model + "/versions/{version}"):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_post(prefix + "/infer", self.infer)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.alive)
        app.router.add_get("/v2/health/ready", self.alive)
        app.router.add_post("/v2/repository/index", self.repository_index)
        return app

    def _json(self, doc: dict, status: int = 200):
        return web.json_response(doc, status=status)

    @staticmethod
    def _metadata(request) -> tuple[tuple[str, str], ...]:
        return tuple((k.lower(), v) for k, v in request.headers.items())

    async def alive(self, request):
        return self._json({"live": True, "ready": True})

    async def server_metadata(self, request):
        reply = await self.servicer.ServerMetadata(v2.ServerMetadataRequest(), None)
        return self._json({"name": reply.name, "version": reply.version, "extensions": list(reply.extensions)})

    async def model_metadata(self, request):
        reply = await self.servicer.ModelMetadata(v2.ModelMetadataRequest(
            name=request.match_info["name"], version=request.match_info.get("version", "")), None)
        tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]  # noqa: E731
        return self._json({"name": reply.name, "versions": list(reply.versions), "platform": reply.platform,
                           "inputs": tensors(reply.inputs), "outputs": tensors(reply.outputs)})

    async def model_ready(self, request):
        reply = await self.servicer.ModelReady(v2.ModelReadyRequest(
            name=request.match_info["name"], version=request.match_info.get("version", "")), None)
        return self._json({"name": request.match_info["name"], "ready": reply.ready}, 200 if reply.ready else 400)

    async def repository_index(self, request):
        reply = await self.servicer.RepositoryIndex(v2.RepositoryIndexRequest(), None)
        return self._json([{"name": m.name, "version": m.version, "state": m.state} for m in reply.models])

    async def infer(self, request):
        message, binary = infer_request(await request.read(), request.headers.get(HEADER_LENGTH),
                                        request.match_info["name"], request.match_info.get("version", ""))
        response = await self.servicer.infer(message, self._metadata(request), None, method="ModelInfer/REST")
        body, headers = infer_response(response, binary)
        return web.Response(body=body, headers=headers, content_type="application/json" if not binary
                            else "application/octet-stream")


@contextlib.asynccontextmanager
async def serve_rest(servicer: OpenInferenceServicer, host: str, port: int, max_body_bytes: int, tls=None):
    """Serves the REST API on ``host:port`` (0 picks one) and yields the bound port; with ``tls``
    (ServeConfig.tls), over HTTPS with the gRPC server's certificate. Bodies over
    ``max_body_bytes`` get 413."""
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file:
            context.load_verify_locations(tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    runner = web.AppRunner(RestFrontDoor(servicer, max_body_bytes).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context, reuse_port=False)
    try:
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()

