"""The Open Inference Protocol's REST API (KServe v2 over HTTP/JSON, ``http_port``): spoken to
by tritonclient.http, unmodified (Triton's binary tensors), and by plain JSON with base64
images; its answers must be the gRPC service's for the same photo, its failures the same
codes as HTTP statuses with the protocol's ``{"error": ...}`` body."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import requests

from catcascade.serving.config import ServeConfig
from catcascade.serving.request_errors import InvalidRequestError
from tests.conftest import GrpcServerThread, import_or_missing, jpeg_bytes

tc_http = import_or_missing("tritonclient.http", "requirements/dev.txt (geventhttpclient), installed by make setup")
import tritonclient.grpc as tc_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from catcascade.serving import open_inference_rest as rest  # noqa: E402

TOKEN = "rest-test-token"


def auth() -> dict:
    """Headers with the token; a fresh dict per call (tritonclient.http adds its own to it)."""
    return {"authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------ parsing, no server

def test_a_json_request_with_base64_images_becomes_the_grpc_message():
    body = json.dumps({"id": "r1", "parameters": {"top_k": 2, "escalation": "never", "binary_data_output": False},
                       "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                   "data": [base64.b64encode(b"one").decode(), base64.b64encode(b"two").decode()]}],
                       "outputs": [{"name": "labels"}]}).encode()
    message, binary = rest.infer_request(body, None, "catcascade", "v2")
    assert (message.model_name, message.model_version, message.id) == ("catcascade", "v2", "r1")
    assert list(message.inputs[0].contents.bytes_contents) == [b"one", b"two"] and list(message.inputs[0].shape) == [2]
    assert set(message.parameters) == {"top_k", "escalation"} and message.parameters["top_k"].int64_param == 2
    assert [o.name for o in message.outputs] == ["labels"] and binary is False


def test_a_binary_request_takes_its_tensor_after_the_json_header():
    raw = b"\x03\x00\x00\x00abc"
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "labels", "parameters": {"binary_data": True}}]}).encode()
    message, binary = rest.infer_request(head + raw, str(len(head)), "catcascade", "")
    assert list(message.raw_input_contents) == [raw] and binary is True


@pytest.mark.parametrize("body,header,words", [
    (b"{not json", None, "not a v2 JSON"),
    (b"[]", None, "must be a JSON object"),
    (b'{"inputs": {}}', None, "inputs must be a list"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": "1"}]}', None, "shape"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', None, "base64"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}',
     "90", "not a v2 JSON"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}',
     None, "binary_data_size"),
    (b'{"parameters": {"top_k": [1]}, "inputs": []}', None, "bool, an integer or a string"),
])
def test_malformed_requests_are_invalid_with_the_reason(body, header, words):
    with pytest.raises(InvalidRequestError, match=words):
        rest.infer_request(body, header, "catcascade", "")


def test_outputs_come_back_as_json_or_as_binary_tensors():
    from tritonclient.grpc import service_pb2 as v2

    response = v2.ModelInferResponse(model_name="catcascade", model_version="1", id="x")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(np.array([0.75, 0.25], "<f4").tobytes())
    response.outputs.add(name="labels", datatype="BYTES", shape=[1, 2])
    response.raw_output_contents.append(b"\x01\x00\x00\x00a\x02\x00\x00\x00bc")
    body, headers = rest.infer_response(response, binary=False)
    doc = json.loads(body)
    assert headers == {} and [o["data"] for o in doc["outputs"]] == [[0.75, 0.25], ["a", "bc"]]
    body, headers = rest.infer_response(response, binary=True)
    split = int(headers[rest.HEADER_LENGTH])
    sizes = [o["parameters"]["binary_data_size"] for o in json.loads(body[:split])["outputs"]]
    assert sizes == [8, 11] and body[split:] == b"".join(response.raw_output_contents)


def test_http_port_without_its_packages_is_a_clear_error_before_anything_starts(tmp_path, monkeypatch):
    import asyncio
    import importlib.util

    from catcascade.errors import CommandError
    from catcascade.serving.app import running_service

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else real(name, *a))

    async def start():
        async with running_service(ServeConfig(bundle=tmp_path, port=0, http_port=0)):
            pass

    with pytest.raises(CommandError, match="http_port needs tritonclient and aiohttp"):
        asyncio.run(start())


# ------------------------------------------------------------------ against a running server

@pytest.fixture(scope="module")
def server(demo_bundle):
    s = GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0, http_port=0,
                                     auth={"bearer_tokens": [TOKEN]})).start()
    yield s
    s.stop()


def _url(server) -> str:
    return f"127.0.0.1:{server.servicer.http_port}"


def _count(server, code: str) -> float:
    return server.servicer.metrics.registry.get_sample_value(
        "catcascade_requests_total", {"method": "ModelInfer/REST", "code": code}) or 0.0


@pytest.mark.integration
def test_tritonclient_http_classifies_as_the_grpc_service_does(server, sample_data):
    photos = [p.read_bytes() for p in sorted(sample_data.glob("*/*.jpg"))[::29][:4]]
    c = tc_http.InferenceServerClient(_url(server))
    assert c.is_server_live() and c.is_server_ready() and c.get_server_metadata()["name"] == "catcascade"
    assert c.is_model_ready("catcascade", headers=auth()) and not c.is_model_ready("resnet50", headers=auth())
    assert c.get_model_metadata("catcascade", headers=auth())["versions"] == ["1"]
    image = tc_http.InferInput("image", [len(photos)], "BYTES")
    image.set_data_from_numpy(np.array(photos, dtype=np.object_))  # binary, Triton's extension
    ok = _count(server, "OK")
    result = c.infer("catcascade", [image], parameters={"escalation": "never", "top_k": 2}, headers=auth())
    assert _count(server, "OK") == ok + 1
    grpc_image = tc_grpc.InferInput("image", [len(photos)], "BYTES")
    grpc_image.set_data_from_numpy(np.array(photos, dtype=np.object_))
    reference = tc_grpc.InferenceServerClient(server.target).infer(
        "catcascade", [grpc_image], parameters={"escalation": "never", "top_k": 2}, headers=auth())
    assert result.as_numpy("labels").tolist() == reference.as_numpy("labels").tolist()
    assert result.as_numpy("probabilities") == pytest.approx(reference.as_numpy("probabilities"), abs=1e-6)
    assert result.as_numpy("escalated").tolist() == [False] * len(photos)


@pytest.mark.integration
def test_plain_json_with_a_base64_image(server):
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(jpeg_bytes(seed=7)).decode()]}],
            "parameters": {"top_k": 3}, "outputs": [{"name": "labels"}, {"name": "probabilities"}]}
    r = requests.post(f"http://{_url(server)}/v2/models/catcascade/versions/1/infer", json=body, headers=auth(),
                      timeout=60)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["labels"]["shape"] == [1, 3] and all(isinstance(x, str) for x in outputs["labels"]["data"])
    assert sum(outputs["probabilities"]["data"]) <= 1.0 + 1e-6 and r.json()["model_version"] == "1"


@pytest.mark.integration
@pytest.mark.parametrize("path,body,status,words", [
    ("catcascade/infer", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                      "data": [base64.b64encode(b"not an image").decode()]}]}, 400, "image"),
    ("catcascade/infer", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
     400, "one input named 'image'"),
    ("catcascade/infer", {"inputs": []}, 400, "one input named 'image'"),
    ("resnet50/infer", {"inputs": []}, 404, "unknown model"),
    ("catcascade/versions/7/infer", {"inputs": []}, 404, "version"),
])
def test_junk_gets_the_http_status_of_its_grpc_code_and_an_error_body(server, path, body, status, words):
    r = requests.post(f"http://{_url(server)}/v2/models/{path}", json=body, headers=auth(), timeout=60)
    assert r.status_code == status and words in r.json()["error"], r.text


@pytest.mark.integration
def test_models_need_the_bearer_token_and_health_does_not(server):
    base = f"http://{_url(server)}/v2"
    assert requests.get(f"{base}/health/ready", timeout=10).status_code == 200
    for token in (None, "Bearer wrong"):
        r = requests.post(f"{base}/models/catcascade/infer", json={"inputs": []}, timeout=10,
                          headers={"authorization": token} if token else {})
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
    with pytest.raises(InferenceServerException):
        tc_http.InferenceServerClient(_url(server)).get_model_metadata("catcascade")


@pytest.mark.integration
def test_a_body_over_the_message_limit_is_refused(demo_bundle):
    with GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0, http_port=0,
                                      limits={"max_message_bytes": 200_000})) as s:
        r = requests.post(f"http://127.0.0.1:{s.servicer.http_port}/v2/models/catcascade/infer",
                          data=b"x" * 300_000, timeout=30)
    assert r.status_code == 413
