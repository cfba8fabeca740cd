"""Faults against the real servers: bad inputs, overload, VLM death, deadlines, auth, TLS,
metrics and graceful shutdown. Figures from the same scenarios: docs/reliability.md."""
from __future__ import annotations

import asyncio
import datetime
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.reliability import bad_inputs, random_jpegs, run_load, vllm_killed_mid_run
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.client import CatcascadeClient
from catcascade.serving.config import ServeConfig
from catcascade.serving.server import SERVICE_NAME, VLM_HEALTH_NAME
from tests.conftest import GrpcServerThread, jpeg_bytes

pytestmark = pytest.mark.integration


@pytest.fixture
def make_server(demo_bundle):
    started = []

    def make(**overrides) -> GrpcServerThread:
        server = GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0, **overrides)).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


def test_bad_input_corpus_gets_invalid_argument_and_server_keeps_serving(client):
    for name, payload in bad_inputs().items():
        with pytest.raises(grpc.RpcError) as err:
            client.classify(payload, mode="never")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert err.value.details(), name
    assert len(client.classify(jpeg_bytes(), mode="never").labels) == 3


def test_oversized_message_is_refused_before_decoding(make_server):
    server = make_server(limits={"max_message_bytes": 64 * 1024})
    with CatcascadeClient(server.target) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.classify(b"\xff\xd8" + b"\0" * 200_000, mode="never")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(c.classify(jpeg_bytes(), mode="never").labels) == 3


def test_the_servers_own_pixel_and_side_limits(make_server):
    """limits.max_pixels / max_side below Pillow's own bomb guard (89 Mpx): the project's
    checks are the ones that refuse, with their own messages."""
    server = make_server(limits={"max_pixels": 10_000, "max_side": 300})
    with CatcascadeClient(server.target) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.classify(jpeg_bytes((120, 100)), mode="never")  # 12,000 pixels
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "image has 12000 pixels; the limit is 10000"
        with pytest.raises(grpc.RpcError) as err:
            c.classify(jpeg_bytes((301, 20)), mode="never")
        assert err.value.details() == "image is 301x20; each side must be 1..300 px"
        assert len(c.classify(jpeg_bytes((100, 100)), mode="never").labels) == 3


def test_escalations_are_shed_before_requests_are_refused(make_server, vllm_server):
    server = make_server(vlm={"urls": [vllm_server.url]}, limits={"max_concurrent_escalations": 1})
    moderate = run_load(server.target, random_jpegs(8), n_requests=40, concurrency=6, mode="always")
    assert moderate.codes == {"OK": 40}, moderate.details
    assert moderate.reasons["SHED"] > 0 and moderate.reasons["REQUESTED_ALWAYS"] > 0

    tight = make_server(vlm={"urls": [vllm_server.url]},
                        limits={"max_concurrent_escalations": 1, "max_inflight_requests": 2},
                        batching={"max_queue_size": 2})
    heavy = run_load(tight.target, random_jpegs(8), n_requests=120, concurrency=24, mode="always")
    assert heavy.codes["RESOURCE_EXHAUSTED"] > 0 and heavy.codes["OK"] > 0
    assert set(heavy.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, heavy.details
    assert any("overloaded" in d for d in heavy.details)


def test_deadline_too_short_for_vlm_answers_cnn_only(make_server, vllm_server):
    server = make_server(vlm={"urls": [vllm_server.url]}, limits={"vlm_min_budget_ms": 5000})
    with CatcascadeClient(server.target, timeout_s=3.0) as c:
        r = c.classify(jpeg_bytes(seed=2), mode="always")
    assert not r.escalated and r.escalation_reason == pb.ESCALATION_REASON_DEADLINE
    assert "deadline" in r.escalation_detail and len(r.labels) == 3


def test_vlm_killed_mid_run_every_request_still_answered(make_server, vllm_server):
    from catcascade.serving.engine_builder import warm_up
    from catcascade.vlm_stage.vllm_client import VlmClientConfig, VllmVerifier

    server = make_server(vlm={"urls": [vllm_server.url], "timeout_s": 5, "max_retries": 1},
                         breaker={"failure_threshold": 2, "cooldown_s": 1.0})
    try:
        outcome = vllm_killed_mid_run(server.target, vllm_server, n_requests=80, concurrency=4, kill_after=20)
        assert outcome.codes == {"OK": 80}, outcome.details
        assert outcome.reasons["REQUESTED_ALWAYS"] >= 20, outcome.reasons
        assert outcome.reasons["VLM_UNAVAILABLE"] > 0, outcome.reasons
        # While vLLM is down the breaker stays open or half-open (its probes fail), so the VLM's
        # health name reads NOT_SERVING until vLLM is back: a stable state, polled with room.
        assert _vlm_health_becomes(server, health_pb2.HealthCheckResponse.NOT_SERVING, within_s=60)
        with grpc.insecure_channel(server.target) as ch:  # degraded, shown separately: the CNN path is up
            main = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
        assert main == health_pb2.HealthCheckResponse.SERVING
    finally:
        vllm_server.start()  # later tests share this server
        verifier = VllmVerifier(VlmClientConfig(urls=[vllm_server.url], model="cats"))
        assert asyncio.run(warm_up(verifier, ("Persian", "Bengal", "Siamese")))
        asyncio.run(verifier.aclose())
    # The breaker's probe finds the restarted server: the health name says so, and escalations resume.
    assert _vlm_health_becomes(server, health_pb2.HealthCheckResponse.SERVING, within_s=120)
    with CatcascadeClient(server.target) as c:
        reasons = [c.classify(jpeg_bytes(seed=i), mode="always").escalation_reason for i in range(3)]
    assert reasons == [pb.ESCALATION_REASON_REQUESTED_ALWAYS] * 3


def _vlm_health_becomes(server, status, within_s: float) -> bool:
    """Polls the VLM's health name until it reads ``status`` (a generous deadline, not a sleep)."""
    with grpc.insecure_channel(server.target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if h.Check(health_pb2.HealthCheckRequest(service=VLM_HEALTH_NAME), timeout=10).status == status:
                return True
            time.sleep(0.2)
    return False


def test_bearer_token_auth(make_server):
    server = make_server(auth={"bearer_tokens": ["s3cret"]})
    with CatcascadeClient(server.target) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.classify(jpeg_bytes(), mode="never")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with CatcascadeClient(server.target, token="wrong") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.classify(jpeg_bytes(), mode="never")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with CatcascadeClient(server.target, token="s3cret") as c:
        assert len(c.classify(jpeg_bytes(), mode="never").labels) == 3
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    good = (("authorization", "Bearer s3cret"),)

    def stream(ch, metadata=None):
        reqs = [pb.ClassifyRequest(image=jpeg_bytes(), request_id="s1", escalation=pb.ESCALATION_MODE_NEVER)]
        return list(pb_grpc.CatClassifierStub(ch).ClassifyStream(iter(reqs), metadata=metadata, timeout=60))

    def services(ch, metadata=None):
        answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=60)
        return {s.name for a in answers for s in a.list_services_response.service}

    # GetModelInfo, streams and reflection are guarded like Classify; health is open
    with grpc.insecure_channel(server.target) as ch:
        for call in (lambda: pb_grpc.CatClassifierStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=60),
                     lambda: stream(ch), lambda: services(ch),
                     lambda: stream(ch, (("authorization", "Bearer wrong"),)),
                     lambda: services(ch, (("authorization", "s3cret"),))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in err.value.details()
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert pb_grpc.CatClassifierStub(ch).GetModelInfo(pb.GetModelInfoRequest(), metadata=good).labels
        assert [r.request_id for r in stream(ch, good)] == ["s1"]
        assert SERVICE_NAME in services(ch, good)


def _write_pki(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca=False, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def save(name, obj):
        path = tmp_path / name
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "catcascade test CA")])
    ca = cert("catcascade test CA", ca_key, ca_name, ca_key, ca=True)
    srv_key, cli_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    return {
        "ca": save("ca.pem", ca),
        "server_cert": save("server.pem", cert("localhost", srv_key, ca_name, ca_key, san="localhost")),
        "server_key": save("server.key", srv_key),
        "client_cert": save("client.pem", cert("client", cli_key, ca_name, ca_key)),
        "client_key": save("client.key", cli_key),
    }


def test_tls_and_mutual_tls(make_server, tmp_path):
    pki = _write_pki(tmp_path)
    tls = make_server(host="localhost", tls={"cert_file": pki["server_cert"], "key_file": pki["server_key"]})
    with CatcascadeClient(f"localhost:{tls.port}", tls_ca=pki["ca"]) as c:
        assert len(c.classify(jpeg_bytes(), mode="never").labels) == 3
    with CatcascadeClient(f"localhost:{tls.port}", timeout_s=5) as plain:
        with pytest.raises(grpc.RpcError) as err:
            plain.classify(jpeg_bytes(), mode="never")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    mtls = make_server(host="localhost", tls={"cert_file": pki["server_cert"], "key_file": pki["server_key"],
                                              "client_ca_file": pki["ca"]})
    with CatcascadeClient(f"localhost:{mtls.port}", tls_ca=pki["ca"], timeout_s=5) as no_cert:
        with pytest.raises(grpc.RpcError) as err:
            no_cert.classify(jpeg_bytes(), mode="never")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with CatcascadeClient(f"localhost:{mtls.port}", tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                          tls_key=pki["client_key"]) as c:
        assert len(c.classify(jpeg_bytes(), mode="never").labels) == 3


def test_prometheus_metrics(grpc_server, client):
    client.classify(jpeg_bytes(seed=9), mode="always")
    with pytest.raises(grpc.RpcError):
        client.classify(b"nope", mode="never")
    http_server, _ = grpc_server.servicer.metrics.serve_http(0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_server.server_port}/metrics", timeout=5).read().decode()
    finally:
        http_server.shutdown()
    for needle in ('catcascade_requests_total{code="OK",method="Classify"}',
                   'catcascade_requests_total{code="INVALID_ARGUMENT",method="Classify"}',
                   'catcascade_stage_milliseconds_bucket{le="5.0",stage="cnn"}',
                   'catcascade_escalation_decisions_total{reason="REQUESTED_ALWAYS"}',
                   "catcascade_cnn_batch_size_count", "catcascade_cnn_queue_depth", "catcascade_vlm_breaker_state",
                   "catcascade_cnn_batches_running 0.0"):
        assert needle in text, needle


def test_in_process_transformers_backend_when_no_vllm_server(make_server):
    """Machines without a vLLM server can still escalate, to the bundle's VLM in-process."""
    server = make_server(vlm={"backend": "transformers"})
    with CatcascadeClient(server.target) as c:
        r = c.classify(jpeg_bytes(seed=4), mode="always")
        info = c.model_info()
    assert r.escalated and r.escalation_reason == pb.ESCALATION_REASON_REQUESTED_ALWAYS
    assert r.vlm.model == "cats" and len(r.vlm.candidates) == 3
    assert info.vlm_enabled and "+cats" in info.versions.vlm


def test_two_cnn_instances_answer_like_one(make_server, client):
    """batching.instances=2 runs two ONNX Runtime batches at once on one session: the answers
    under concurrent load are the ones the single-instance server gives."""
    from concurrent.futures import ThreadPoolExecutor

    server = make_server(batching={"instances": 2, "max_batch_size": 2}, cnn_threads=1)
    images = random_jpegs(8)
    expected = [client.classify(img, mode="never") for img in images]
    with CatcascadeClient(server.target) as c, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda img: c.classify(img, mode="never"), images * 3))
    for i, r in enumerate(got):
        want = expected[i % len(images)]
        assert [x.label for x in r.labels] == [x.label for x in want.labels]
        assert [x.probability for x in r.labels] == pytest.approx([x.probability for x in want.labels], abs=1e-5)
