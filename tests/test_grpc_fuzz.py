"""A structure-aware fuzzer of the gRPC API through the real grpc.aio server and front door
(serving/server.py, serving/front_door/), with hypothesis: ClassifyRequests with any field
values (images valid, mutated, truncated or random; enum values out of range; request ids of
any text), raw messages mutated at the byte level (often not protobuf at all), and streams
mixing both. Only the CNN and VLM are faked (tests/fakes.py): decoding, validation, admission
and status mapping are the server's own.

Every call must end with a status the API promises (never UNKNOWN, INTERNAL or UNAVAILABLE),
and the server must keep serving. ``FUZZ_EXAMPLES`` sets the examples per test (``make fuzz``
runs thousands)."""
from __future__ import annotations

import asyncio
import os
import threading

import grpc
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements/dev.txt)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from catcascade.serving.api import cascade_pb2 as pb  # noqa: E402
from catcascade.serving.server import CatClassifierServicer, run_server  # noqa: E402
from tests.conftest import jpeg_bytes  # noqa: E402
from tests.fakes import FakeVerifier, fake_front_door, fake_pipeline  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLASSIFY = "/catcascade.v1.CatClassifier/Classify"
CLASSIFY_STREAM = "/catcascade.v1.CatClassifier/ClassifyStream"
IDENTITY = {"request_serializer": None, "response_deserializer": None}
PROMISED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED}
SEEDS = [jpeg_bytes((48, 36), seed=1), jpeg_bytes((40, 30), fmt="PNG", seed=2), jpeg_bytes((32, 32), fmt="WEBP"),
         jpeg_bytes((64, 16))]


@pytest.fixture(scope="module")
def target():
    """run_server over the fake CNN and VLM, on its own event loop in a background thread."""
    ready, stop, failed = threading.Event(), None, []
    box: dict = {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        pipeline = fake_pipeline(FakeVerifier(), threshold=0.6)
        try:
            async with run_server(CatClassifierServicer(fake_front_door(pipeline)), port=0) as (_, port, _health):
                box["target"], box["loop"] = f"127.0.0.1:{port}", asyncio.get_running_loop()
                ready.set()
                await stop.wait()
        except BaseException as e:  # pragma: no cover - reported below
            failed.append(e)
            ready.set()
        finally:
            pipeline.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(60) and not failed, failed
    yield box["target"]
    box["loop"].call_soon_threadsafe(stop.set)
    thread.join(30)


def _mutated(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Applies (kind, position, byte) edits: 0 flips a byte, 1 inserts one, 2 deletes one,
    3 truncates there."""
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            break
        i = pos % len(out)
        if kind == 0:
            out[i] ^= value or 1
        elif kind == 1:
            out.insert(i, value)
        elif kind == 2:
            del out[i]
        else:
            del out[i:]
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)
images = st.one_of(
    st.sampled_from(SEEDS),
    st.builds(_mutated, st.sampled_from(SEEDS), edits),
    st.binary(max_size=512),
    st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"GIF89a"]),
)
requests = st.builds(
    pb.ClassifyRequest, image=images, top_k=st.integers(0, 2**32 - 1),
    escalation=st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 2, 3]),
    request_id=st.text(max_size=80) | st.text(alphabet="ab\n\r\x00\x1b", max_size=8),
    explain=st.booleans(), priority=st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1]))
messages = st.one_of(requests.map(lambda r: r.SerializeToString()),
                     st.builds(_mutated, requests.map(lambda r: r.SerializeToString()), edits),
                     st.binary(max_size=64))


def _check_status(code: grpc.StatusCode, details: str) -> None:
    assert code in PROMISED, (code, details)
    assert "Traceback" not in (details or "") and "<class " not in (details or ""), details


@FUZZ
@given(message=messages)
def test_any_classify_message_gets_a_promised_status(target, message):
    with grpc.insecure_channel(target) as channel:
        classify = channel.unary_unary(CLASSIFY, **IDENTITY)
        try:
            answer = pb.ClassifyResponse.FromString(classify(message, timeout=30))
        except grpc.RpcError as e:
            _check_status(e.code(), e.details())
        else:
            assert answer.labels and answer.request_id


@FUZZ
@given(stream=st.lists(messages, min_size=1, max_size=5))
def test_any_classify_stream_gets_answers_then_a_promised_status(target, stream):
    """Every message before the first undecodable one is answered (a result or an error in the
    stream); the call ends OK, or INVALID_ARGUMENT after the bad message although the client
    keeps its side open (it writes nothing after it: gRPC's client reports a write to a call
    the server ended as its own INTERNAL error)."""
    first_bad = next((i for i, m in enumerate(stream) if not _parses(m)), None)

    async def call():
        async with grpc.aio.insecure_channel(target) as channel:
            rpc = channel.stream_stream(CLASSIFY_STREAM, **IDENTITY)(timeout=30)
            for message in stream[: None if first_bad is None else first_bad + 1]:
                await rpc.write(message)
            if first_bad is None:
                await rpc.done_writing()
            answers = []
            try:
                async for raw in rpc:
                    answers.append(pb.ClassifyResponse.FromString(raw))
            except grpc.RpcError:
                pass
            return answers, await rpc.code(), await rpc.details()

    answers, code, details = asyncio.run(call())
    _check_status(code, details)
    if first_bad is None:
        assert len(answers) == len(stream) and code == grpc.StatusCode.OK, (code, details)
    else:
        assert len(answers) == first_bad and code == grpc.StatusCode.INVALID_ARGUMENT, (len(answers), code, details)
    assert all(a.labels or a.error.code for a in answers)


def _parses(message: bytes) -> bool:
    from google.protobuf.message import DecodeError

    try:
        pb.ClassifyRequest.FromString(message)
        return True
    except DecodeError:
        return False


def test_the_server_still_serves_after_the_fuzzing(target):
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(CLASSIFY, **IDENTITY)(
            pb.ClassifyRequest(image=SEEDS[0], escalation=pb.ESCALATION_MODE_NEVER).SerializeToString(), timeout=30)
    assert len(pb.ClassifyResponse.FromString(raw).labels) == 3
