"""Issue 15 against the real servers (gRPC, ONNX Runtime, vLLM): the client's retries across a
restart, tracing into vLLM's HTTP requests, the response cache and single-flight, priorities
under a saturated VLM, per-tenant VLM budgets and the drift index."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from prometheus_client import generate_latest

from benchmarks.reliability import random_jpegs
from catcascade.client import AsyncCatcascadeClient, CatcascadeClient, CatcascadeRpcError, EscalationReason, RetryPolicy
from catcascade.serving.config import ServeConfig
from tests.conftest import GrpcServerThread, jpeg_bytes

pytestmark = pytest.mark.integration
TOKENS = {"alice": "tok-alice", "bob": "tok-bob"}
BOB = TOKENS["bob"]


@pytest.fixture(scope="module")
def features_server(demo_bundle, vllm_server):
    """Every feature of issue 15 on: cache, in-memory tracing, tenants (alice may escalate twice,
    bob without limit), a 30-answer drift window, and one VLM slot with a queue behind it."""
    cfg = ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": [vllm_server.url], "call_budget_s": 60},
                      auth={"tenants": TOKENS},
                      tenant_budgets={"tenants": {"alice": {"rate_per_s": 0.0001, "burst": 2}}},
                      cache={"enabled": True}, tracing={"exporter": "memory"}, drift={"window": 30},
                      limits={"max_concurrent_escalations": 1, "escalation_queue_size": 64})
    server = GrpcServerThread(cfg).start()
    yield server
    server.stop()


def _metrics(server) -> str:
    return generate_latest(server.servicer.metrics.registry).decode()


def _labels(r):
    return [(s.label, round(s.probability, 6)) for s in r.labels]


def test_async_client_retries_across_a_server_restart_and_gives_up_at_the_deadline(demo_bundle):
    from catcascade.vlm_stage.vllm_server import free_port

    cfg = ServeConfig(bundle=demo_bundle, port=free_port())
    target = f"127.0.0.1:{cfg.port}"
    image = jpeg_bytes(seed=31)
    retried: list = []
    policy = RetryPolicy(max_attempts=None, initial_backoff_s=0.05, max_backoff_s=0.5)

    async def scenario():
        first = GrpcServerThread(cfg).start()
        async with AsyncCatcascadeClient(target, timeout_s=120, retry=policy,
                                         on_retry=lambda n, code, wait: retried.append(code)) as client:
            before = await client.classify(image, mode="never")
            await asyncio.to_thread(first.stop)
            call = asyncio.create_task(client.classify(image, mode="never"))
            deadline = time.monotonic() + 60
            while len(retried) < 3 and not call.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the server is down: the call is retrying
            assert len(retried) >= 3 and not call.done()
            second = await asyncio.to_thread(GrpcServerThread(cfg).start)
            try:
                after = await call
            finally:
                await asyncio.to_thread(second.stop)
            t0 = time.monotonic()
            with pytest.raises(CatcascadeRpcError) as err:
                await client.classify(image, mode="never", timeout_s=3.0)
            return before, after, err.value, time.monotonic() - t0

    before, after, error, elapsed = asyncio.run(scenario())
    assert _labels(after) == _labels(before) and after.attempts >= 4
    assert {c.name for c in retried} == {"UNAVAILABLE"}
    # Given up at the deadline: not before the last backoff window, not long after it.
    assert error.code().name == "UNAVAILABLE" and error.attempts > 3
    assert 3.0 - policy.max_backoff_s - 0.3 <= elapsed <= 3.0 + 2.0, elapsed


def test_a_new_client_is_not_refused_because_another_saw_the_port_closed():
    """A client that called while nothing listened keeps its connection in reconnect backoff
    (100 ms at least). A client created after the server came up must connect on its own, not
    share that failed connection: gRPC's process-wide connection pool made it fail with
    "Connection refused" from a live server."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from catcascade.vlm_stage.vllm_server import free_port

    target = f"127.0.0.1:{free_port()}"

    def check(client) -> int:
        stub = health_pb2_grpc.HealthStub(client.channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status

    with CatcascadeClient(target) as early:
        with pytest.raises(grpc.RpcError) as err:
            check(early)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        server = grpc.server(futures.ThreadPoolExecutor(1))  # starts in milliseconds: inside the backoff
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        server.add_insecure_port(target)
        server.start()
        try:
            with CatcascadeClient(target) as late:
                assert check(late) == health_pb2.HealthCheckResponse.SERVING
        finally:
            server.stop(None)


def test_stage_spans_carry_the_callers_trace_id_and_vllm_gets_the_traceparent(features_server):
    from opentelemetry.sdk.trace import TracerProvider

    verifier = features_server.servicer.front_door.router.live_engine().verifier
    sent: list[dict] = []

    async def record(request):
        if request.url.path.endswith("/chat/completions"):
            sent.append(dict(request.headers))

    verifier._client.event_hooks["request"].append(record)  # what goes out on the wire, per request
    try:
        tracer = TracerProvider().get_tracer("caller")
        with tracer.start_as_current_span("caller") as caller:
            with CatcascadeClient(features_server.target, token=BOB, propagate_trace=True) as client:
                r = client.classify(jpeg_bytes(seed=41), mode="always")
    finally:
        verifier._client.event_hooks["request"].remove(record)
    assert r.escalated and not r.cached
    trace_id = caller.get_span_context().trace_id
    spans = {s.name: s for s in features_server.servicer.tracing.memory_exporter.get_finished_spans()
             if s.context.trace_id == trace_id}
    assert {"catcascade.Classify", "decode", "cnn_queue", "cnn", "vlm", "blend"} <= set(spans)
    request = spans["catcascade.Classify"]
    assert request.parent.span_id == caller.get_span_context().span_id
    assert all(spans[n].parent.span_id == request.context.span_id for n in ("decode", "cnn_queue", "cnn", "vlm", "blend"))
    assert request.attributes["catcascade.escalation_reason"] == "ESCALATION_REASON_REQUESTED_ALWAYS"
    assert request.attributes["catcascade.version.bundle"] == r.versions.bundle
    assert request.attributes["catcascade.version.vlm"] == r.versions.vlm != ""
    assert spans["cnn"].attributes["catcascade.cnn.batch_size"] >= 1
    # The HTTP request to vLLM continued the same trace, as a child of the vlm span.
    assert len(sent) == 1
    version, header_trace, header_parent, flags = sent[0]["traceparent"].split("-")
    assert int(header_trace, 16) == trace_id and int(header_parent, 16) == spans["vlm"].context.span_id


def test_second_identical_request_is_a_cache_hit(features_server):
    image = jpeg_bytes(seed=51)
    cache = features_server.servicer.front_door.cache
    hits = cache.hits
    with CatcascadeClient(features_server.target, token=BOB) as client:
        first = client.classify(image, mode="never")
        second = client.classify(image, mode="never")
        other_k = client.classify(image, mode="never", top_k=5)
    assert not first.cached and second.cached and not other_k.cached
    assert _labels(second) == _labels(first) and second.escalation_reason == first.escalation_reason
    assert second.request_id != first.request_id and second.raw.cached
    assert second.timings.cnn_ms == 0 and second.timings.total_ms > 0
    assert cache.hits == hits + 1
    assert f'catcascade_response_cache_lookups_total{{result="hit"}} {float(cache.hits)}' in _metrics(features_server)


def test_100_concurrent_identical_requests_run_the_models_once(features_server):
    pipeline = features_server.servicer.front_door.router.live_engine()
    images_before, vlm_before = sum(pipeline.cnn.batch_sizes), pipeline.vlm_calls
    image = jpeg_bytes(seed=52)

    async def burst():
        async with AsyncCatcascadeClient(features_server.target, token=BOB) as client:
            return await client.classify_many([image] * 100, concurrency=100, mode="always")

    results = asyncio.run(burst())
    assert all(not isinstance(r, Exception) for r in results), [r for r in results if isinstance(r, Exception)][:2]
    assert sum(pipeline.cnn.batch_sizes) - images_before == 1  # one image through the CNN
    assert pipeline.vlm_calls - vlm_before == 1  # and one VLM call
    assert sum(not r.cached for r in results) == 1
    assert all(r.escalated and _labels(r) == _labels(results[0]) for r in results)


def test_interactive_escalations_overtake_batch_ones_queued_earlier(features_server):
    """One VLM slot and a queue behind it: 16 batch escalations queue up, then 3 interactive
    ones arrive; they are answered before most of the batch requests that were already waiting.
    Every answer comes from the real vLLM, and batch escalations carry vLLM's priority field."""
    pipeline = features_server.servicer.front_door.router.live_engine()
    bodies: list[dict] = []

    async def record(request):
        if request.url.path.endswith("/chat/completions"):
            bodies.append(json.loads(request.content))

    # The VLM slot is held (the first request to vLLM waits on this gate, off the server's event
    # loop) until every escalation is queued: how fast vLLM answers cannot change the order.
    gate = threading.Event()

    async def hold(request):
        if request.url.path.endswith("/chat/completions"):
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 120)

    hooks = pipeline.verifier._client.event_hooks["request"]
    hooks.extend([record, hold])

    async def queued(n: int) -> int:
        deadline = time.monotonic() + 120
        while pipeline.waiting_escalations < n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return pipeline.waiting_escalations

    async def scenario():
        finished: list[str] = []
        async with AsyncCatcascadeClient(features_server.target, token=BOB, timeout_s=120) as client:
            async def one(tag, image, priority):
                r = await client.classify(image, mode="always", priority=priority)
                finished.append(tag)
                return r

            batch = [asyncio.create_task(one(f"b{i}", jpeg_bytes(seed=600 + i), "batch")) for i in range(16)]
            waiting = await queued(15)  # one holds the VLM slot, fifteen wait behind it
            interactive = [asyncio.create_task(one(f"i{i}", jpeg_bytes(seed=700 + i), "interactive"))
                           for i in range(3)]
            all_queued = await queued(18)
            gate.set()
            results = await asyncio.gather(*batch, *interactive)
        return finished, results, waiting, all_queued

    try:
        finished, results, waiting, all_queued = asyncio.run(scenario())
    finally:
        gate.set()
        hooks.remove(record)
        hooks.remove(hold)
    assert waiting == 15 and all_queued == 18
    assert all(r.escalation_reason == EscalationReason.REQUESTED_ALWAYS and r.vlm is not None for r in results)
    last_interactive = max(finished.index(f"i{i}") for i in range(3))
    batch_after = [t for t in finished[last_interactive:] if t.startswith("b")]
    # First come, first served would put all three interactive requests last.
    assert len(batch_after) >= max(3, waiting // 2), (waiting, finished)
    assert sorted(b.get("priority", 0) for b in bodies) == [0] * 3 + [1] * 16


def test_tenant_over_budget_gets_cnn_only_answers_while_another_still_escalates(features_server):
    with CatcascadeClient(features_server.target, token=TOKENS["alice"]) as alice, \
            CatcascadeClient(features_server.target, token=BOB) as bob:
        spent = [alice.classify(jpeg_bytes(seed=800 + i), mode="always") for i in range(4)]
        other = [bob.classify(jpeg_bytes(seed=810 + i), mode="always") for i in range(2)]
    assert [r.escalation_reason for r in spent] == [EscalationReason.REQUESTED_ALWAYS] * 2 + \
        [EscalationReason.TENANT_BUDGET] * 2
    assert all(not r.escalated and r.vlm is None and len(r.labels) == 3 for r in spent[2:])
    assert "'alice'" in spent[2].escalation_detail and "budget" in spent[2].escalation_detail
    assert all(r.escalated and r.vlm is not None for r in other)
    text = _metrics(features_server)
    assert 'catcascade_tenant_escalations_total{outcome="over_budget",tenant="alice"} 2.0' in text
    assert 'catcascade_tenant_escalations_total{outcome="allowed",tenant="alice"} 2.0' in text
    assert 'catcascade_escalation_decisions_total{reason="TENANT_BUDGET"} 2.0' in text
    with CatcascadeClient(features_server.target, retry=RetryPolicy.never()) as nobody:
        with pytest.raises(CatcascadeRpcError) as err:
            nobody.classify(jpeg_bytes(seed=820), mode="never")
    assert err.value.code().name == "UNAUTHENTICATED"


def test_drift_index_rises_when_the_confidence_distribution_shifts(features_server, demo_bundle):
    from catcascade.ensemble.bundle import load_bundle
    from catcascade.training.datasets import load_split

    bundle = load_bundle(demo_bundle)
    assert sum(bundle.manifest.cnn.confidence_histogram.counts) > 0  # the bundle carries its reference
    drift = features_server.servicer.front_door.observer.drift(features_server.servicer.front_door.router.live_engine())
    held_out = [s.path for s in load_split(demo_bundle / "data" / "split.json", demo_bundle / "data").test][:30]
    with CatcascadeClient(features_server.target, token=BOB) as client:
        assert not any(r.cached for r in client.classify_many(held_out, concurrency=4, mode="never"))
        like_validation = drift.psi()
        assert not any(r.cached for r in client.classify_many(random_jpegs(30, size=(96, 96), seed=9),
                                                               concurrency=4, mode="never"))
        noise = drift.psi()
    assert noise > 0.25 and noise > like_validation + 0.5, (like_validation, noise)
    text = _metrics(features_server)
    version = bundle.version_string
    assert f'catcascade_drift_confidence_psi{{version="{version}"}} {noise}' in text
    assert f'catcascade_cnn_top1_confidence_bucket{{le="0.5",version="{version}"}}' in text
    assert f'catcascade_drift_escalation_rate{{version="{version}"}}' in text
    assert f'catcascade_drift_vlm_cnn_agreement{{version="{version}"}}' in text


def test_classify_command_uses_the_client(features_server, tmp_path, capsys):
    from catcascade.cli import main

    paths = []
    for i, data in enumerate(random_jpegs(3, seed=11)):
        paths.append(tmp_path / f"cat{i}.jpg")
        paths[-1].write_bytes(data)
    argv = ["classify", "--target", features_server.target, "--token", BOB, "--json", "--mode", "never",
            "--priority", "batch", "--concurrency", "2", *map(str, paths)]
    assert main(argv) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["image"] for o in first] == [str(p) for p in paths] and all(len(o["labels"]) == 3 for o in first)
    assert main(argv) == 0
    assert all(json.loads(line).get("cached") for line in capsys.readouterr().out.splitlines())


def test_unknown_priority_is_invalid_argument(features_server):
    import grpc

    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.serving.api import cascade_pb2_grpc as pb_grpc

    with grpc.insecure_channel(features_server.target) as channel:
        stub = pb_grpc.CatClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(image=jpeg_bytes(seed=90), priority=7), timeout=30,
                          metadata=(("authorization", f"Bearer {BOB}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown priority 7" in err.value.details()
