"""The Open Inference Protocol (KServe v2) front door, spoken to by the field's own clients,
unmodified: tritonclient's sync and asyncio gRPC clients and Triton's perf_analyzer, against a
CNN-only server (no vLLM). Its answers must be the native API's for the same photo."""
from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from catcascade.serving.config import ServeConfig
from catcascade.serving.request_errors import InvalidRequestError
from tests.conftest import REPO, GrpcServerThread, import_or_missing, jpeg_bytes, missing

tc = import_or_missing("tritonclient.grpc", "requirements/open-inference.txt, installed by make setup")
from tritonclient.grpc import aio as tc_aio  # noqa: E402
from tritonclient.grpc import service_pb2 as v2  # noqa: E402
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, serialize_byte_tensor  # noqa: E402

from catcascade.serving import open_inference as oi  # noqa: E402

TOKEN = "open-inference-test-token"


def _image_input(images: list[bytes], shape=None) -> "tc.InferInput":
    tensor = tc.InferInput("image", shape or [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(shape or [len(images)]))
    return tensor


def _params(**values) -> dict:
    out = {}
    for name, value in values.items():
        p = v2.InferParameter()
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        else:
            p.string_param = value
        out[name] = p
    return out


# ------------------------------------------------------------------ protocol pieces, no server


def test_raw_bytes_tensor_round_trips_tritonclients_encoding():
    values = [b"", b"a", jpeg_bytes(seed=1)]
    raw = serialize_byte_tensor(np.array(values, dtype=np.object_)).item()
    assert oi.serialized_bytes(raw) == values
    for broken in (raw[:2], raw[:-1], struct.pack("<I", 10) + b"short"):
        with pytest.raises(InvalidRequestError):
            oi.serialized_bytes(broken)


def test_request_parameters_map_to_the_native_fields():
    fields, timeout_s = oi.request_options(_params(top_k=2, escalation="always", priority="batch", explain=True,
                                                   timeout=250_000, triton_enable_empty_final_response=True))
    assert fields == {"top_k": 2, "escalation": oi.pb.ESCALATION_MODE_ALWAYS, "priority": oi.pb.PRIORITY_BATCH,
                      "explain": True}
    assert timeout_s == pytest.approx(0.25)
    assert oi.request_options(_params(priority=1))[0]["priority"] == oi.pb.PRIORITY_INTERACTIVE
    assert oi.request_options(_params(priority=5))[0]["priority"] == oi.pb.PRIORITY_BATCH
    for bad in (dict(top_k=True), dict(top_k="3"), dict(escalation="sometimes"), dict(explain=1), dict(timeout=0),
                dict(temperature="hot"), dict(top_k=-1)):
        with pytest.raises(InvalidRequestError, match="not understood"):
            oi.request_options(_params(**bad))


def test_output_tensors_pad_rankings_of_different_lengths():
    a = oi.pb.ClassifyResponse(labels=[oi.pb.LabelScore(label="Bengal", probability=0.75),
                                       oi.pb.LabelScore(label="Sphynx", probability=0.25)], escalated=True,
                               escalation_reason=oi.pb.ESCALATION_REASON_LOW_CONFIDENCE)
    b = oi.pb.ClassifyResponse(labels=[oi.pb.LabelScore(label="Persian", probability=1.0)])
    t = oi.output_tensors([a, b])
    shape, raw = t["labels"]
    assert shape == [2, 2] and deserialize_bytes_tensor(raw).tolist() == [b"Bengal", b"Sphynx", b"Persian", b""]
    shape, raw = t["probabilities"]
    assert np.frombuffer(raw, "<f4").reshape(shape).tolist() == [[0.75, 0.25], [1.0, 0.0]]
    assert t["escalated"] == ([2], b"\x01\x00")
    assert deserialize_bytes_tensor(t["escalation_reason"][1]).tolist() == [b"LOW_CONFIDENCE", b"UNSPECIFIED"]
    assert deserialize_bytes_tensor(t["vlm"][1]).tolist() == [b"", b""]


def test_the_deadline_is_the_earlier_of_grpc_and_tritons_timeout():
    import time

    now = time.monotonic()
    assert oi._deadline(None, None) is None
    assert oi._deadline(10.0, 0.5) == pytest.approx(now + 0.5, abs=0.2)
    assert oi._deadline(0.3, 5.0) == pytest.approx(now + 0.3, abs=0.2)
    assert oi._deadline(None, 2.0) == pytest.approx(now + 2.0, abs=0.2)


# ------------------------------------------------------------------ against a running server


@pytest.fixture(scope="module")
def server(demo_bundle):
    s = GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def photos(sample_data) -> list[bytes]:
    paths = sorted(sample_data.glob("*/*.jpg"))[::17][:6]
    assert len(paths) >= 4, f"too few photos in {sample_data}"
    return [p.read_bytes() for p in paths]


def _native(target: str, image: bytes, top_k: int):
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return cascade_pb2_grpc.CatClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=image, top_k=top_k, escalation=pb.ESCALATION_MODE_NEVER), timeout=60)


def _count(server, code: str) -> float:
    return server.servicer.metrics.registry.get_sample_value(
        "catcascade_requests_total", {"method": "ModelInfer", "code": code}) or 0.0


@pytest.mark.integration
def test_metadata_and_health_through_tritonclient(server):
    c = tc.InferenceServerClient(server.target)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("catcascade") and not c.is_model_ready("resnet50")
    assert c.get_server_metadata().name == "catcascade"
    meta = c.get_model_metadata("catcascade", as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1"]}]
    outputs = {o["name"]: (o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]}
    assert outputs == oi.OUTPUTS and outputs["probabilities"] == ("FP32", [-1, -1])
    config = c.get_model_config("catcascade").config
    assert config.name == "catcascade" and config.input[0].name == "image" and config.max_batch_size == 0
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("resnet50")
    assert e.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.integration
def test_sync_client_classifies_real_photos_as_the_native_api_does(server, photos):
    c = tc.InferenceServerClient(server.target)
    before = _count(server, "OK")
    result = c.infer("catcascade", [_image_input(photos)], request_id="batch-1",
                     parameters={"top_k": 2, "escalation": "never"})
    assert result.get_response().id == "batch-1" and _count(server, "OK") == before + 1
    labels, probs = result.as_numpy("labels"), result.as_numpy("probabilities")
    assert labels.shape == (len(photos), 2) and probs.shape == (len(photos), 2) and probs.dtype == np.float32
    assert result.as_numpy("escalated").tolist() == [False] * len(photos)
    assert result.as_numpy("escalation_reason").tolist() == [b"REQUESTED_NEVER"] * len(photos)
    for i, photo in enumerate(photos):
        native = _native(server.target, photo, 2)
        assert [s.label.encode() for s in native.labels] == labels[i].tolist()
        assert probs[i] == pytest.approx([s.probability for s in native.labels], abs=1e-6)
        assert json.loads(result.as_numpy("versions")[i]) == {"bundle": native.versions.bundle,
                                                              "cnn": native.versions.cnn}


@pytest.mark.integration
def test_asyncio_client_with_concurrent_calls_and_chosen_outputs(server, photos):
    async def main():
        async with tc_aio.InferenceServerClient(server.target) as c:
            assert await c.is_model_ready("catcascade")
            wanted = [tc.InferRequestedOutput("labels"), tc.InferRequestedOutput("escalated")]
            calls = [c.infer("catcascade", [_image_input([p], shape=[1, 1])], outputs=wanted,
                             parameters={"escalation": "never", "top_k": 1}) for p in photos]
            return await asyncio.gather(*calls)

    results = asyncio.run(main())
    for photo, result in zip(photos, results):
        assert [o.name for o in result.get_response().outputs] == ["labels", "escalated"]
        assert result.as_numpy("labels").tolist() == [[_native(server.target, photo, 1).labels[0].label.encode()]]


@pytest.mark.integration
@pytest.mark.parametrize("call,code,words", [
    (lambda c: c.infer("catcascade", [_image_input([b"not an image"])]), "INVALID_ARGUMENT", "decodable image"),
    (lambda c: c.infer("catcascade", [_image_input([jpeg_bytes(), b"\x89PNG junk"])]), "INVALID_ARGUMENT", "image"),
    (lambda c: c.infer("resnet50", [_image_input([jpeg_bytes()])]), "NOT_FOUND", "unknown model"),
    (lambda c: c.infer("catcascade", [_image_input([jpeg_bytes()])], model_version="7"), "NOT_FOUND", "version"),
    (lambda c: c.infer("catcascade", [_fp32("image")]), "INVALID_ARGUMENT", "must be BYTES"),
    (lambda c: c.infer("catcascade", [_fp32("pixels")]), "INVALID_ARGUMENT", "one input named 'image'"),
    (lambda c: c.infer("catcascade", [_image_input([jpeg_bytes()])], parameters={"top_k": 1000}),
     "INVALID_ARGUMENT", "top_k"),
    (lambda c: c.infer("catcascade", [_image_input([jpeg_bytes()])], parameters={"mood": "calm"}),
     "INVALID_ARGUMENT", "not understood"),
    (lambda c: c.infer("catcascade", [_image_input([jpeg_bytes()])], outputs=[tc.InferRequestedOutput("logits")]),
     "INVALID_ARGUMENT", "unknown outputs"),
])
def test_junk_gets_the_v2_status_codes(server, call, code, words):
    c = tc.InferenceServerClient(server.target)
    before = _count(server, code)
    with pytest.raises(InferenceServerException) as e:
        call(c)
    assert e.value.status() == f"StatusCode.{code}" and words in e.value.message()
    assert _count(server, code) == before + 1
    assert c.infer("catcascade", [_image_input([jpeg_bytes()])]).as_numpy("labels").shape == (1, 3)


def _fp32(name: str):
    tensor = tc.InferInput(name, [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    return tensor


@pytest.mark.integration
def test_a_message_that_is_not_protobuf_is_invalid_argument(server):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(f"/{oi.SERVICE.full_name}/ModelInfer")
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.integration
def test_the_bearer_token_interceptor_guards_v2_too(demo_bundle):
    with GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0, auth={"bearer_tokens": [TOKEN]})) as s:
        c = tc.InferenceServerClient(s.target)
        for call in (lambda: c.is_server_live(), lambda: c.infer("catcascade", [_image_input([jpeg_bytes()])])):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        headers = {"authorization": f"Bearer {TOKEN}"}
        assert c.is_server_live(headers=headers)
        assert c.infer("catcascade", [_image_input([jpeg_bytes()])], headers=headers).as_numpy("labels").shape == (1, 3)


@pytest.mark.integration
def test_a_call_is_one_span_continuing_the_callers_trace_with_each_images_stages_under_it(demo_bundle):
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0, tracing={"exporter": "memory"})) as s:
        c = tc.InferenceServerClient(s.target)
        c.infer("catcascade", [_image_input([jpeg_bytes(seed=3), jpeg_bytes(seed=4)])],
                headers={"traceparent": f"00-{trace_id}-{parent}-01"}, parameters={"escalation": "never"})
        spans = [sp for sp in s.servicer.tracing.memory_exporter.get_finished_spans()
                 if sp.context.trace_id == int(trace_id, 16)]
    calls = [sp for sp in spans if sp.name == "catcascade.ModelInfer"]
    assert len(calls) == 1 and calls[0].parent.span_id == int(parent, 16)
    cnn = [sp for sp in spans if sp.name == "cnn"]
    assert len(cnn) == 2 and all(sp.parent.span_id == calls[0].context.span_id for sp in cnn)


# ------------------------------------------------------------------ perf_analyzer


def perf_analyzer_command() -> tuple[list[str], dict]:
    """perf_analyzer from the tritonclient wheel with the libraries the Makefile unpacks."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    libs = REPO / ".venv" / "perf-analyzer-libs"
    paths = [libs / "cudart" / "nvidia" / "cuda_runtime" / "lib", libs / "deb" / "usr" / "lib" / "x86_64-linux-gnu"]
    if not binary.exists():
        missing(f"perf_analyzer not found at {binary} (requirements/open-inference.txt: tritonclient==2.48.0)")
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([*map(str, paths), os.environ.get("LD_LIBRARY_PATH", "")]))
    probe = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"perf_analyzer does not start: {(probe.stderr or probe.stdout).strip()[:300]} "
                "(make setup unpacks libcudart.so.12 and libb64.so.0d into .venv/perf-analyzer-libs)")
    return [str(binary)], env


def perf_analyzer_data(photos: list[bytes], path: Path) -> Path:
    """--input-data: each photo as one BYTES element, base64 of Triton's length-prefixed form."""
    steps = [{"image": {"b64": base64.b64encode(struct.pack("<I", len(p)) + p).decode(), "shape": [1]}}
             for p in photos]
    path.write_text(json.dumps({"data": steps}))
    return path


@pytest.mark.integration
def test_perf_analyzer_drives_the_server_with_real_jpegs(server, photos, tmp_path):
    command, env = perf_analyzer_command()
    report, before = tmp_path / "perf.csv", _count(server, "OK")
    out = subprocess.run([*command, "-m", "catcascade", "-u", server.target, "-i", "grpc",
                          "--input-data", str(perf_analyzer_data(photos, tmp_path / "photos.json")),
                          "--concurrency-range", "2", "--measurement-interval", "1000", "--max-trials", "10",
                          # the test asks for answers, not a stable figure: a shared machine's
                          # windows can differ several-fold (benchmarks/peers.py measures)
                          "--stability-percentage", "1000", "-f", str(report)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "error" not in out.stdout.lower()
    row = next(csv.DictReader(report.open()))
    assert int(row["Concurrency"]) == 2 and float(row["Inferences/Second"]) > 0
    assert _count(server, "OK") - before >= float(row["Inferences/Second"])  # each was a real ModelInfer call
