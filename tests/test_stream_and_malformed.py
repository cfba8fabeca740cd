"""Messages that are not valid protobuf, through the real gRPC server (CNN-only): a unary
Classify is answered INVALID_ARGUMENT (not UNKNOWN) and counted; a ClassifyStream answers the
messages before the bad one, then ends with INVALID_ARGUMENT at once, not at its deadline."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.config import ServeConfig
from tests.conftest import GrpcServerThread, jpeg_bytes

pytestmark = pytest.mark.integration
CLASSIFY = "/catcascade.v1.CatClassifier/Classify"
CLASSIFY_STREAM = "/catcascade.v1.CatClassifier/ClassifyStream"
CORRUPT = b"\x0a\xff"  # field 1 (image), length 255, then nothing: DecodeError
IDENTITY = {"request_serializer": None, "response_deserializer": None}


@pytest.fixture(scope="module")
def cnn_server(demo_bundle):
    server = GrpcServerThread(ServeConfig(bundle=demo_bundle, port=0)).start()
    yield server
    server.stop()


def _valid(request_id: str) -> bytes:
    return pb.ClassifyRequest(image=jpeg_bytes(), escalation=pb.ESCALATION_MODE_NEVER,
                              request_id=request_id).SerializeToString()


def _count(server, method: str, code: str) -> float:
    registry = server.servicer.metrics.registry
    return registry.get_sample_value("catcascade_requests_total", {"method": method, "code": code}) or 0.0


def test_malformed_unary_classify_is_invalid_argument_and_counted(cnn_server):
    before = _count(cnn_server, "Classify", "INVALID_ARGUMENT")
    with grpc.insecure_channel(cnn_server.target) as channel:
        classify = channel.unary_unary(CLASSIFY, **IDENTITY)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                classify(CORRUPT, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
            assert "DecodeError" not in e.value.details()
        # the server still answers valid bytes on the same channel
        assert pb.ClassifyResponse.FromString(classify(_valid("after"), timeout=30)).labels
    assert _count(cnn_server, "Classify", "INVALID_ARGUMENT") - before == 3


async def _stream_with_bad_message(target: str, n_valid: int, deadline_s: float):
    """Sends ``n_valid`` good messages then a corrupt one and keeps the stream open (never
    half-closes); the answers received and the status the call ended with."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(CLASSIFY_STREAM, **IDENTITY)(timeout=deadline_s)
        for i in range(n_valid):
            await call.write(_valid(f"ok-{i}"))
        await call.write(CORRUPT)
        answers = []
        try:
            async for raw in call:
                answers.append(pb.ClassifyResponse.FromString(raw))
        except grpc.RpcError:
            pass
        return answers, await call.code()


def test_stream_answers_before_a_bad_message_then_ends_invalid_argument_promptly(cnn_server):
    before = _count(cnn_server, "ClassifyStream", "INVALID_ARGUMENT")
    t = time.monotonic()
    answers, code = asyncio.run(_stream_with_bad_message(cnn_server.target, 2, deadline_s=60))
    elapsed = time.monotonic() - t
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(a.request_id for a in answers) == ["ok-0", "ok-1"]
    assert all(a.labels and not a.error.code for a in answers)
    assert elapsed < 20, f"the stream ended after {elapsed:.1f} s: at its deadline, not at the bad message"
    assert _count(cnn_server, "ClassifyStream", "INVALID_ARGUMENT") - before == 1


def test_two_hundred_streams_with_a_bad_message_all_end(cnn_server):
    """Each stream, left open by its client, ends by itself with INVALID_ARGUMENT, well before
    the 120 s deadline; the server then answers normally."""
    async def all_streams():
        return await asyncio.gather(*(_stream_with_bad_message(cnn_server.target, 1, deadline_s=120)
                                      for _ in range(200)))

    t = time.monotonic()
    results = asyncio.run(all_streams())
    elapsed = time.monotonic() - t
    codes = [code for _, code in results]
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == 200, {c: codes.count(c) for c in set(codes)}
    assert sum(len(answers) for answers, _ in results) == 200
    assert elapsed < 90, f"200 streams took {elapsed:.1f} s"
    with grpc.insecure_channel(cnn_server.target) as channel:
        assert pb.ClassifyResponse.FromString(channel.unary_unary(CLASSIFY, **IDENTITY)(_valid("x"), timeout=30)).labels
