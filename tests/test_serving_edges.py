"""The service's input and edge behaviour through the real gRPC server (CNN-only: none of it
needs the VLM): hostile images, decode work for calls that are gone, EXIF orientation,
request ids that could forge log lines, bearer-token edges and the metrics endpoint."""
from __future__ import annotations

import io
import ssl
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from benchmarks.hostile_images import hostile_corpus, png
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.client import CatcascadeClient
from catcascade.serving.config import ServeConfig
from tests.conftest import GrpcServerThread, jpeg_bytes
from tests.fakes import FakeBatcher, request_for

pytestmark = pytest.mark.integration
CLASSIFY = "/catcascade.v1.CatClassifier/Classify"


@pytest.fixture(scope="module")
def cnn_server(demo_bundle):
    server = GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0)).start()
    yield server
    server.stop()


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


def _sample(registry, name: str, labels: dict | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


# ------------------------------------------------------------------------------ hostile inputs


def test_hostile_corpus_over_grpc(cnn_server):
    """Every hostile input is answered (refused with INVALID_ARGUMENT and a reason, or
    classified); each refusal is counted by reason; the server then answers normally."""
    registry = cnn_server.servicer.metrics.registry
    before = {r: _sample(registry, "catcascade_images_refused_total", {"reason": r})
              for r in ("aspect", "memory", "scans", "segments", "dimensions", "format")}
    codes = {}
    with CatcascadeClient(cnn_server.target, timeout_s=60) as c:
        for name, data in hostile_corpus().items():
            try:
                c.classify(data, mode="never", request_id=f"hostile-{len(codes)}")
                codes[name] = "OK"
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.code(), e.details())
                assert e.details(), name
                codes[name] = e.details()
        assert len(c.classify(jpeg_bytes(), mode="never").labels) == 3
    assert "aspect ratio" in codes["PNG 1x12000"]
    assert "more than 100 scans" in codes["JPEG 4000x4000, 20000 empty scans"]
    assert codes["JPEG 4000x4000, 99 empty scans"] == "OK"
    after = {r: _sample(registry, "catcascade_images_refused_total", {"reason": r}) for r in before}
    assert after["aspect"] - before["aspect"] == sum("aspect ratio" in v for v in codes.values())
    assert after["scans"] - before["scans"] == sum("scans" in v and v != "OK" for v in codes.values())
    assert all(after[r] > before[r] for r in ("memory", "segments", "dimensions", "format"))


def test_decode_work_for_calls_that_are_gone_is_skipped(make_server):
    """Many heavy (but admitted) images with deadlines far shorter than the decode queue: the
    calls end with DEADLINE_EXCEEDED and the decode pool drops their unstarted jobs instead
    of decoding images nobody waits for; a normal call is then answered. (Queue-delay
    admission, serving/traffic/admission.py, would refuse most of them before they queue: it
    is off here, to exercise the decode pool's own defence.)"""
    cnn_server = make_server(admission={"enabled": False})
    pipeline = cnn_server.servicer.front_door.router.live_engine()
    registry = cnn_server.servicer.metrics.registry
    heavy = png(5600, 5600)  # ~0.4 s of decode each on this machine
    n = 32
    started0 = pipeline.decodes_started
    skipped0 = sum(_sample(registry, "catcascade_decodes_skipped_total", {"why": w}) for w in ("cancelled", "deadline"))
    with grpc.insecure_channel(cnn_server.target) as ch:
        stub = pb_grpc.CatClassifierStub(ch)
        calls = [stub.Classify.future(pb.ClassifyRequest(image=heavy, escalation=pb.ESCALATION_MODE_NEVER),
                                      timeout=0.3) for _ in range(n)]
        codes = [c.exception().code() if c.exception() else grpc.StatusCode.OK for c in calls]
    # each call ends with its deadline or is refused by admission (which knows the queue cannot
    # meet a 0.3 s deadline); either way no answer is computed for a caller who is gone
    gone = codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) + codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert gone >= n - 4, codes
    deadline = time.monotonic() + 60
    while pipeline.decode_waiting and time.monotonic() < deadline:  # let started decodes finish
        time.sleep(0.05)
    decoded = pipeline.decodes_started - started0
    skipped = sum(_sample(registry, "catcascade_decodes_skipped_total", {"why": w})
                  for w in ("cancelled", "deadline")) - skipped0
    # The rest were dropped unstarted (counted) or never reached the pool before their deadline.
    assert decoded <= n // 4, f"{decoded} of {n} abandoned images were decoded anyway ({skipped} dropped)"
    assert decoded + skipped <= n
    with CatcascadeClient(cnn_server.target, timeout_s=60) as c:
        assert len(c.classify(jpeg_bytes(), mode="never").labels) == 3


def test_decode_jobs_of_cancelled_requests_are_dropped_unstarted():
    """With both decode threads busy, requests that are cancelled while their job waits give
    their queue slot back and are never decoded."""
    import asyncio
    import threading

    from catcascade.cnn_stage.preprocessing import PreprocessConfig
    from catcascade.serving.metrics import ServiceMetrics
    from catcascade.serving.pipeline import CascadePipeline

    metrics = ServiceMetrics()
    pipe = CascadePipeline(["a"], PreprocessConfig(), cnn=FakeBatcher(), policy=None, blender=None, metrics=metrics)
    release = threading.Event()
    busy = [pipe._decode_pool.submit(release.wait) for _ in range(pipe.decode_threads)]

    async def scenario():
        tasks = [asyncio.create_task(pipe.classify(request_for(jpeg_bytes(seed=i)))) for i in range(5)]
        while pipe.decode_waiting < 5:
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        release.set()
        for f in busy:
            f.result(timeout=60)
        pipe.close()
    assert pipe.decode_waiting == 0 and pipe.decodes_started == 0
    assert metrics.registry.get_sample_value("catcascade_decodes_skipped_total", {"why": "cancelled"}) == 5.0


def test_decode_that_would_start_after_its_deadline_is_skipped():
    """A job a decode thread picks up after the request's deadline returns at once, counted,
    without decoding (callers whose cancellation does not reach the pool: in-process, streams)."""
    import asyncio

    from catcascade.cnn_stage.preprocessing import PreprocessConfig
    from catcascade.serving.metrics import ServiceMetrics
    from catcascade.serving.pipeline import CascadePipeline, DeadlineExceededError

    metrics = ServiceMetrics()
    pipe = CascadePipeline(["a"], PreprocessConfig(), cnn=FakeBatcher(), policy=None, blender=None, metrics=metrics)
    try:
        with pytest.raises(DeadlineExceededError, match="deadline passed while the image waited"):
            asyncio.run(pipe.classify(request_for(jpeg_bytes(), deadline=time.monotonic() - 0.001)))
    finally:
        pipe.close()
    assert pipe.decodes_started == 0 and pipe.decode_waiting == 0
    assert metrics.registry.get_sample_value("catcascade_decodes_skipped_total", {"why": "deadline"}) == 1.0


def test_decode_queue_is_bounded(make_server):
    """With the decode threads busy and limits.max_decode_queue images waiting, further
    requests are refused at once with RESOURCE_EXHAUSTED; the waiting ones are answered."""
    import threading

    server = make_server(limits={"max_decode_queue": 2})
    pipeline = server.servicer.front_door.router.live_engine()
    release = threading.Event()
    busy = [pipeline._decode_pool.submit(release.wait) for _ in range(pipeline.decode_threads)]
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.CatClassifierStub(ch)

            def call(i):
                req = pb.ClassifyRequest(image=jpeg_bytes(seed=i), escalation=pb.ESCALATION_MODE_NEVER)
                return stub.Classify.future(req, timeout=120)

            waiting = [call(0), call(1)]
            deadline = time.monotonic() + 60
            while pipeline.decode_waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = [call(i) for i in range(2, 6)]
            for f in refused:
                assert f.exception() is not None and f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "decode queue is full (2 images waiting)" in f.exception().details()
            release.set()
            assert all(len(f.result().labels) == 3 for f in waiting)
    finally:
        release.set()
        for f in busy:
            f.result(timeout=60)


def test_photo_tagged_rotate_90_is_classified_upright(cnn_server, sample_data):
    """A real photo stored sideways with EXIF orientation 6 gets exactly the upright photo's
    CNN scores (PNG: lossless); without the tag, different ones."""
    upright = Image.open(sorted(sample_data.rglob("*.jpg"))[1]).convert("RGB")

    def encoded(img, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG", **kw)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    with CatcascadeClient(cnn_server.target, timeout_s=60) as c:
        ref = c.classify(encoded(upright), top_k=5, mode="never")
        tagged = c.classify(encoded(sideways, exif=exif.tobytes()), top_k=5, mode="never")
        untagged = c.classify(encoded(sideways), top_k=5, mode="never")

    def scores(r):
        return [(s.label, s.probability) for s in r.cnn_top_k]

    assert scores(tagged) == scores(ref)
    assert scores(untagged) != scores(ref)


# ----------------------------------------------------------------------------- ports


def test_second_server_on_a_busy_port_is_refused_and_the_first_keeps_its_traffic(cnn_server, demo_bundle, capsys):
    """gRPC's default SO_REUSEPORT let a second server bind the same port and take part of the
    connections (an old version left running would keep answering some clients)."""
    from catcascade.cli import main

    port = int(cnn_server.target.rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"cannot bind the gRPC server to 127.0.0.1:{port}: the port is in use"):
        GrpcServerThread(ServeConfig(bundle=demo_bundle, port=port)).start()
    assert main(["serve", "--bundle", str(demo_bundle), "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert f"cannot bind the gRPC server to 127.0.0.1:{port}" in capsys.readouterr().err
    served_before = cnn_server.servicer.metrics.registry.get_sample_value(
        "catcascade_requests_total", {"method": "Classify", "code": "OK"}) or 0
    for i in range(8):  # new connections each time: none may land on a half-started second server
        with CatcascadeClient(cnn_server.target, timeout_s=30) as c:
            c.classify(jpeg_bytes(seed=i), mode="never")
    assert cnn_server.servicer.metrics.registry.get_sample_value(
        "catcascade_requests_total", {"method": "Classify", "code": "OK"}) == served_before + 8


# ----------------------------------------------------------------------------- request ids


@pytest.mark.parametrize("request_id", ["a\nINFO forged line", "tab\there", "esc\x1b[31m", "ls\u2028x", "rlo\u202e"])
def test_request_id_with_control_characters_is_refused(cnn_server, request_id):
    with CatcascadeClient(cnn_server.target) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.classify(jpeg_bytes(), mode="never", request_id=request_id)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id must be printable" in err.value.details()
        assert c.classify(jpeg_bytes(), mode="never", request_id="ok id-1 ünïcode").request_id == "ok id-1 ünïcode"


def test_text_log_format_keeps_each_record_on_one_line():
    import logging

    from catcascade.serving.log_format import OneLineFormatter

    fmt = OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    forged = "r1\n2026-01-01 00:00:00 INFO serving.server: classified request_id=admin"
    rec = logging.LogRecord("catcascade.serving.server", logging.INFO, __file__, 1, "invalid image request_id=%s: %s",
                            (forged, "bad\u2028bytes\x1b"), None)
    line = fmt.format(rec)
    assert "\n" not in line and "\u2028" not in line and "\x1b" not in line
    assert line == ("INFO catcascade.serving.server: invalid image request_id=r1\\n2026-01-01 00:00:00 INFO serving.server: "
                    "classified request_id=admin: bad\\u2028bytes\\x1b")
    try:
        raise ValueError("boom\nINFO forged")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = fmt.format(rec).splitlines()
    assert lines[0] == "ERROR x: failed" and all(line.startswith("    | ") for line in lines[1:])


# ------------------------------------------------------------------------------------ auth


def test_bearer_token_edges(make_server, monkeypatch):
    """Tokens from the environment are trimmed; the scheme is case-insensitive; every
    refused call is counted in catcascade_unauthenticated_total."""
    monkeypatch.setenv("CATS_EDGE_TOKENS", " tok-a ,  tok-b,, ")
    cfg_tokens = ServeConfig(bundle="/b", auth={"bearer_tokens_env": "CATS_EDGE_TOKENS"}).auth.tokens()
    assert cfg_tokens == ["tok-a", "tok-b"]
    server = make_server(auth={"bearer_tokens_env": "CATS_EDGE_TOKENS"})
    registry = server.servicer.metrics.registry
    req = pb.ClassifyRequest(image=jpeg_bytes(), escalation=pb.ESCALATION_MODE_NEVER)
    accepted = ["Bearer tok-b", "bearer tok-a", "BEARER tok-b", "Bearer  tok-b"]
    refused = ["Bearer  tok-b ,", "Bearer tok-a ,  tok-b", "Bearer ", "Basic tok-a", "Bearertok-a", "tok-a",
               "Bearer tok-c", "Bearer tok-a x"]
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.CatClassifierStub(ch)
        for value in accepted:
            assert len(stub.Classify(req, metadata=(("authorization", value),), timeout=60).labels) == 3, value
        for value in refused:
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(req, metadata=(("authorization", value),), timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
        with pytest.raises(grpc.RpcError):
            stub.Classify(req, timeout=60)
    assert _sample(registry, "catcascade_unauthenticated_total", {"method": CLASSIFY}) == len(refused) + 1


def test_config_refuses_tokens_with_whitespace_or_control_characters(monkeypatch):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="whitespace, control or non-ASCII"):
        ServeConfig(bundle="/b", auth={"bearer_tokens": ["with space"]})
    monkeypatch.setenv("CATS_BAD", "ok,bad\x07bell")
    with pytest.raises(ValueError, match=r"\$CATS_BAD contains whitespace, control"):
        ServeConfig(bundle="/b", auth={"bearer_tokens_env": "CATS_BAD"}).auth.tokens()


# --------------------------------------------------------------------------- metrics endpoint


def _get(url: str, token: str | None = None, context=None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_endpoint_binds_loopback_apart_from_grpc_and_takes_a_token(make_server):
    assert ServeConfig(bundle="/b", host="0.0.0.0").metrics_host == "127.0.0.1"
    server = make_server(host="localhost", metrics_port=0, metrics_auth={"bearer_tokens": ["scrape-me"]},
                         auth={"bearer_tokens": ["grpc-token"]})
    http = server.servicer.metrics.http_server
    assert http.server_address[0] == "127.0.0.1"
    url = f"http://127.0.0.1:{http.server_port}/metrics"
    with CatcascadeClient(server.target) as c, pytest.raises(grpc.RpcError):
        c.classify(jpeg_bytes(), mode="never")  # no gRPC token: counted
    assert _get(url)[0] == 401
    assert _get(url, token="grpc-token")[0] == 401  # the gRPC token is not the scrape token
    status, text = _get(url, token="scrape-me")
    assert status == 200
    assert f'catcascade_unauthenticated_total{{method="{CLASSIFY}"}} 1.0' in text


def test_metrics_endpoint_over_tls_and_mutual_tls(make_server, tmp_path):
    from tests.test_serving_reliability import _write_pki

    pki = _write_pki(tmp_path)
    tls = {"cert_file": pki["server_cert"], "key_file": pki["server_key"]}
    server = make_server(metrics_port=0, metrics_tls=tls)
    port = server.servicer.metrics.http_server.server_port
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    status, text = _get(f"https://localhost:{port}/metrics", context=ctx)
    assert status == 200 and "catcascade_inflight_requests" in text
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the TLS port
        _get(f"http://localhost:{port}/metrics")

    mtls = make_server(metrics_port=0, metrics_tls={**tls, "client_ca_file": pki["ca"]})
    port = mtls.servicer.metrics.http_server.server_port
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _get(f"https://localhost:{port}/metrics", context=ctx)  # no client certificate
    with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with_cert.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    assert _get(f"https://localhost:{port}/metrics", context=with_cert)[0] == 200
