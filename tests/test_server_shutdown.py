"""Graceful shutdown of the gRPC server (serving/server.py run_server) over a real grpc.aio
server, with the pipeline's CNN and VLM faked so that requests stay in flight exactly as
long as the test wants: every request accepted before shutdown is answered, new ones are
refused. Synchronised on events, never on sleeps."""
from __future__ import annotations

import asyncio

import grpc

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.api import cascade_pb2_grpc as pb_grpc
from catcascade.serving.server import CatClassifierServicer, run_server
from tests.conftest import jpeg_bytes
from tests.fakes import FakeVerifier, fake_front_door, fake_pipeline, until


def test_shutdown_drains_requests_in_flight_and_refuses_new_ones():
    async def scenario():
        verifier = FakeVerifier(hold=True)
        pipeline = fake_pipeline(verifier)
        servicer = CatClassifierServicer(fake_front_door(pipeline))
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()

        async def serve():
            async with run_server(servicer, port=0, grace_s=60) as (_, port, _health):
                ready.set_result(port)
                await stop.wait()
            # leaving the block is the graceful shutdown under test

        server_task = asyncio.create_task(serve())
        target = f"127.0.0.1:{await ready}"
        image = jpeg_bytes((40, 30), seed=1)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CatClassifierStub(channel)
            calls = [asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(
                image=image, request_id=f"r{i}", escalation=pb.ESCALATION_MODE_ALWAYS), timeout=120))
                for i in range(4)]
            await until(lambda: verifier.waiting == 4, "all four requests wait on the VLM")
            assert servicer.front_door.inflight == 4 and pipeline.inflight_escalations == 4
            stop.set()

            refused = []

            async def new_call_refused() -> bool:
                async with grpc.aio.insecure_channel(target) as fresh:
                    try:
                        await pb_grpc.CatClassifierStub(fresh).Classify(pb.ClassifyRequest(
                            image=image, escalation=pb.ESCALATION_MODE_NEVER), timeout=10)
                    except grpc.aio.AioRpcError as e:
                        refused.append(e.code())
                        return True
                return False

            deadline = asyncio.get_running_loop().time() + 60
            while not await new_call_refused():  # answered normally until shutdown begins
                assert asyncio.get_running_loop().time() < deadline, "the server never began shutting down"
            assert not any(c.done() for c in calls)  # still held by the VLM while new calls are refused
            verifier.release.set()
            answers = await asyncio.gather(*calls)
        await asyncio.wait_for(server_task, 60)
        pipeline.close()
        return answers, refused

    answers, refused = asyncio.run(scenario())
    # A fresh connection to a server that has stopped listening is UNAVAILABLE; one that gRPC's
    # core accepted just before the listener closed has its call CANCELLED by the shutdown
    # (seen once in ten runs beside a CPU-heavy job). Either way it is refused, not answered.
    assert len(refused) == 1 and refused[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), refused
    assert sorted(a.request_id for a in answers) == ["r0", "r1", "r2", "r3"]
    assert all(a.escalated and a.vlm.model == "fake" and a.escalation_reason == pb.ESCALATION_REASON_REQUESTED_ALWAYS
               for a in answers)
