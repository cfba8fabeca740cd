"""HTTP/2 hygiene of the gRPC server (serving/server.py run_server with ServeConfig's
``connections``) over a real grpc.aio server, the pipeline's CNN and VLM faked: an idle
connection is closed, connections are bounded, and calls in flight at shutdown finish."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.serving.config import ConnectionsConfig, ServeConfig
from catcascade.serving.server import CatClassifierServicer, run_server
from tests.conftest import jpeg_bytes
from tests.fakes import FakeVerifier, fake_front_door, fake_pipeline, until

IMAGE = jpeg_bytes((40, 30), seed=1)
CNN_ONLY = pb.ClassifyRequest(image=IMAGE, escalation=pb.ESCALATION_MODE_NEVER)


def test_connection_settings_become_grpc_options():
    options = dict(ConnectionsConfig(max_connection_idle_s=1.5, keepalive_time_s=30, max_connections=7,
                                     max_streams_per_connection=9).grpc_options())
    assert options["grpc.max_connection_idle_ms"] == 1500
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.max_allowed_incoming_connections"] == 7
    assert options["grpc.max_concurrent_streams"] == 9
    defaults = ServeConfig(bundle="b").connections
    assert defaults.max_connection_idle_s == 300.0 and defaults.max_concurrent_rpcs == 512
    # no per-connection stream bound by default: gRPC's clients do not queue refused streams
    assert "grpc.max_concurrent_streams" not in dict(defaults.grpc_options())
    with pytest.raises(ValueError):
        ConnectionsConfig(max_connection_idle_s=0)


@contextlib.asynccontextmanager
async def serving(connections: ConnectionsConfig = ConnectionsConfig(), grace_s: float = 5.0, verifier=None):
    """run_server over the fake pipeline in a task; yields (target, servicer, stop event, task)."""
    pipeline = fake_pipeline(verifier)
    servicer = CatClassifierServicer(fake_front_door(pipeline))
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def serve():
        async with run_server(servicer, port=0, grace_s=grace_s, connections=connections) as (_, port, _health):
            ready.set_result(port)
            await stop.wait()

    task = asyncio.create_task(serve())
    try:
        yield f"127.0.0.1:{await ready}", servicer, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        pipeline.close()


def test_an_idle_connection_is_closed_after_max_idle():
    async def scenario():
        async with serving(ConnectionsConfig(max_connection_idle_s=0.5)) as (target, _, _, _):
            async with grpc.aio.insecure_channel(target) as channel:
                await pb_grpc.CatClassifierStub(channel).Classify(CNN_ONLY, timeout=30)
                assert channel.get_state() == grpc.ChannelConnectivity.READY
                # the server's GOAWAY after 0.5 s without a call takes the channel out of READY
                await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 20)
                assert channel.get_state() != grpc.ChannelConnectivity.READY
                # and a new call simply reconnects
                assert (await pb_grpc.CatClassifierStub(channel).Classify(CNN_ONLY, timeout=30)).labels

    asyncio.run(scenario())


def test_a_busy_connection_is_not_closed_as_idle():
    """Idle means no call: a connection with a call in flight stays open past max idle."""
    async def scenario():
        verifier = FakeVerifier(hold=True)
        async with serving(ConnectionsConfig(max_connection_idle_s=0.3), verifier=verifier) as (target, *_):
            async with grpc.aio.insecure_channel(target) as channel:
                call = pb_grpc.CatClassifierStub(channel).Classify(
                    pb.ClassifyRequest(image=IMAGE, escalation=pb.ESCALATION_MODE_ALWAYS), timeout=30)
                await until(lambda: verifier.waiting == 1, "the call waits on the VLM")
                await asyncio.sleep(1.5)
                verifier.release.set()
                assert (await call).escalated

    asyncio.run(scenario())


def test_connections_beyond_the_bound_are_refused():
    async def scenario():
        async with serving(ConnectionsConfig(max_connections=2)) as (target, *_):
            channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                        for _ in range(4)]
            codes = []
            for channel in channels:  # each opens and keeps its own connection (never idle-closed here)
                try:
                    await pb_grpc.CatClassifierStub(channel).Classify(CNN_ONLY, timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code())
            for channel in channels:
                await channel.close()
            return codes

    codes = asyncio.run(scenario())
    assert codes[:2] == [grpc.StatusCode.OK] * 2
    assert grpc.StatusCode.OK not in codes[2:], codes


def test_calls_beyond_max_concurrent_rpcs_are_refused_at_once():
    """Refusal at the door: with every allowed call in progress, one more is RESOURCE_EXHAUSTED
    before any handler runs (nothing is parsed, decoded or counted), in milliseconds, and the
    calls in progress are answered."""
    async def scenario():
        verifier = FakeVerifier(hold=True)
        async with serving(ConnectionsConfig(max_concurrent_rpcs=2), verifier=verifier) as (target, servicer, *_):
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.CatClassifierStub(channel)
                held = [asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(
                    image=IMAGE, escalation=pb.ESCALATION_MODE_ALWAYS), timeout=30)) for _ in range(2)]
                await until(lambda: verifier.waiting == 2, "both allowed calls wait on the VLM")
                t0 = asyncio.get_running_loop().time()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Classify(CNN_ONLY, timeout=10)
                elapsed = asyncio.get_running_loop().time() - t0
                assert servicer.front_door.inflight == 2  # the refused call never reached the front door
                verifier.release.set()
                return refused.value, elapsed, await asyncio.gather(*held)

    refused, elapsed, answers = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (refused.code(), refused.details())
    assert elapsed < 1.0 and all(a.escalated for a in answers)


def test_calls_in_flight_at_shutdown_finish():
    """16 unary calls and a stream, all held by the VLM when shutdown begins: every one is
    answered (the grace period outlasts them), none CANCELLED."""
    async def scenario():
        verifier = FakeVerifier(hold=True)
        async with serving(grace_s=30, verifier=verifier) as (target, servicer, stop, task):
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.CatClassifierStub(channel)
                always = [pb.ClassifyRequest(image=IMAGE, request_id=f"r{i}", escalation=pb.ESCALATION_MODE_ALWAYS)
                          for i in range(18)]
                calls = [asyncio.ensure_future(stub.Classify(r, timeout=60)) for r in always[:16]]

                async def stream():
                    return [a async for a in stub.ClassifyStream(iter(always[16:]), timeout=60)]

                streamed = asyncio.ensure_future(stream())
                await until(lambda: verifier.waiting == 18, "all 18 requests wait on the VLM")
                stop.set()  # shutdown begins with all of them in flight
                await asyncio.sleep(0.5)
                assert not task.done()  # draining, not gone
                verifier.release.set()
                answers = await asyncio.gather(*calls)
                stream_answers = await streamed
            return answers, stream_answers

    answers, stream_answers = asyncio.run(scenario())
    assert sorted(a.request_id for a in answers) == sorted(f"r{i}" for i in range(16))
    assert sorted(a.request_id for a in stream_answers) == ["r16", "r17"]
    assert all(a.escalated for a in answers + stream_answers)
