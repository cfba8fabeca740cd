"""Units of serving/engines/ that need no Ray cluster: the engine interface, the pipeline's
path for engines that decode where the model runs, the Ray settings, the fast failure on an
unreachable cluster address, and the front door's Ray engine and verifier over a fake Serve
handle (priority order, deadlines, retries, message size, errors across the boundary)."""
from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from catcascade.cnn_stage.preprocessing import PreprocessConfig, load_and_preprocess
from catcascade.ensemble.blender_registry import make_blender
from catcascade.ensemble.config import BlendConfig
from catcascade.ensemble.escalation_policy import EscalationMode, EscalationPolicy
from catcascade.serving.batcher import DeadlineUnmeetableError, DynamicBatcher, QueueFullError
from catcascade.serving.cascade_engine import ClassifyRequest
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.cnn_engine import CnnEngine, EncodedResult, EngineUnavailableError
from catcascade.serving.engines.ray_config import AutoscalingSettings
from catcascade.serving.engines.ray_deployments import ReplicaAnswer
from catcascade.serving.engines.ray_engine import RayCnnEngine, RayVerifier, check_reachable
from catcascade.serving.traffic.priorities import Priority
from catcascade.serving.pipeline import CascadePipeline
from tests.conftest import jpeg_bytes
from tests.fakes import until
from catcascade.vlm_stage.scoring import CandidateScores

LABELS = ["a", "b", "c", "d"]


def test_local_batcher_is_a_cnn_engine_that_takes_tensors():
    batcher = DynamicBatcher(lambda x: x)
    assert isinstance(batcher, CnnEngine) and batcher.decodes_images is False
    with pytest.raises(NotImplementedError, match="decodes_images"):
        asyncio.run(batcher.submit_encoded(b"jpeg"))


class DecodingEngine:
    """Stands in for a remote engine that decodes (what the pipeline calls, not what it is)."""

    decodes_images = True
    depth = running = 0

    def __init__(self, cfg: PreprocessConfig):
        self.cfg, self.seen, self.submitted = cfg, [], []

    async def submit(self, x, priority: int = 0, deadline: float | None = None):  # pragma: no cover
        raise AssertionError("the pipeline sent a tensor to an engine that decodes")

    async def submit_encoded(self, data: bytes, priority: int = 0, deadline: float | None = None) -> EncodedResult:
        x = load_and_preprocess(data, self.cfg)
        self.seen.append(x)
        self.submitted.append((priority, deadline))
        logits = np.array([float(x.mean()), 0.0, -1.0, -2.0], dtype=np.float32)
        return EncodedResult(logits, 0.5, 2.0, 3, decode_ms=1.25)


class RecordingVerifier:
    def __init__(self):
        self.images = []

    async def verify(self, image, candidates, *, priority: int = 0, headers=None):
        self.images.append(image)
        return CandidateScores(tuple(candidates), (0.7, 0.2, 0.1), 0.0, "m", "multiple_choice")


def test_pipeline_sends_bytes_to_an_engine_that_decodes():
    cfg = PreprocessConfig(image_size=32)
    engine, verifier = DecodingEngine(cfg), RecordingVerifier()
    pipe = CascadePipeline(LABELS, cfg, engine, EscalationPolicy(), make_blender(BlendConfig()), verifier=verifier)
    try:
        data = jpeg_bytes(seed=1)
        deadline = time.monotonic() + 60
        never = asyncio.run(pipe.classify(ClassifyRequest(data, mode=EscalationMode.NEVER, priority=Priority.BATCH,
                                                          deadline=deadline)))
        assert never.timings.decode_ms == pytest.approx(1.25) and never.timings.cnn_batch_size == 3
        assert never.timings.cnn_queue_ms == 0.5 and never.timings.cnn_ms == 2.0
        assert verifier.images == []  # nothing decoded on this side for a CNN-only answer
        always = asyncio.run(pipe.classify(ClassifyRequest(data, mode=EscalationMode.ALWAYS)))
        assert always.escalated and always.vlm.probabilities == (0.7, 0.2, 0.1)
        local_copy, _ = pipe._decode(data, True)  # what the local engine would hand the VLM
        assert len(verifier.images) == 1 and verifier.images[0].tobytes() == local_copy.tobytes()
    finally:
        pipe.close()
    assert len(engine.seen) == 2 and engine.seen[0].shape == (3, 32, 32)
    assert engine.submitted == [(Priority.BATCH, deadline), (Priority.INTERACTIVE, None)]


def test_ray_settings_validate():
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)
    cfg = ServeConfig.model_validate({"bundle": "b", "engine": "ray",
                                      "ray": {"address": "10.0.0.1:6379", "cnn": {"num_gpus": 0.25}}})
    assert cfg.ray.cnn.num_gpus == 0.25 and cfg.ray.decode == "front_door"
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"bundle": "b", "engine": "spark"})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"bundle": "b", "ray": {"cnn": {"num_cpus": -1}}})


def test_unreachable_address_is_a_clear_error_in_seconds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailableError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=5)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ValueError, match="host:port"):
        check_reachable("no-port-here", timeout_s=5)


class _Method:
    def __init__(self, handle: "FakeHandle", name: str):
        self.handle, self.name = handle, name

    def remote(self, *args, **kwargs):
        return self.handle.call(self.name, args, kwargs)


class FakeHandle:
    """Stands in for a Serve deployment handle: ``<method>.remote(...)`` records the call,
    waits for ``gate`` when one is set, then raises the next of ``errors`` or answers."""

    def __init__(self, errors=(), answer=None):
        self.sent: list[tuple[str, tuple, dict]] = []
        self.errors = list(errors)
        self.gate: asyncio.Event | None = None
        self.answer = answer or (lambda name, args, kwargs: ReplicaAnswer(np.arange(4, dtype=np.float32),
                                                                            compute_ms=1.0, batch_size=2))
        for name in ("classify_tensor", "classify_encoded", "verify", "explain", "warm_up"):
            setattr(self, name, _Method(self, name))

    def options(self, **_):
        return self

    async def call(self, name, args, kwargs):
        self.sent.append((name, args, kwargs))
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        return self.answer(name, args, kwargs)


def _rpc_error(code):
    import grpc

    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{code.name} (test)")


def _task_error(cause):
    from ray.exceptions import RayTaskError

    return RayTaskError("a replica method", "Traceback (test)", cause)


def _tensor(mark: float) -> np.ndarray:
    return np.full((3, 4, 4), mark, dtype=np.float32)


def test_ray_engine_sends_waiting_calls_interactive_first():
    """Beyond ``max_calls_in_flight`` callers wait on the front door; a freed slot goes to the
    lowest priority value first, then to the earliest caller (Ray Serve's own queue is FIFO)."""
    async def go():
        handle = FakeHandle()
        handle.gate = asyncio.Event()
        engine = RayCnnEngine(handle, decodes_images=False, max_calls_in_flight=1)
        tasks = [asyncio.create_task(engine.submit(_tensor(i), priority=Priority.BATCH)) for i in range(4)]
        await until(lambda: engine.slots.waiting == 3, "three batch calls wait")
        tasks += [asyncio.create_task(engine.submit(_tensor(10 + i), priority=Priority.INTERACTIVE)) for i in range(2)]
        await until(lambda: engine.slots.waiting == 5, "two interactive calls wait too")
        depth, running = engine.depth, engine.running
        handle.gate.set()
        results = await asyncio.gather(*tasks)
        return handle, depth, running, results

    handle, depth, running, results = asyncio.run(go())
    assert [int(args[0][0, 0, 0]) for _, args, _ in handle.sent] == [0, 10, 11, 1, 2, 3]
    assert depth == 6 and running == 1
    assert all(r.batch_size == 2 and r.compute_ms == 1.0 for r in results)


def test_ray_engine_never_sends_a_call_whose_deadline_passed():
    async def go():
        handle = FakeHandle()
        engine = RayCnnEngine(handle, decodes_images=True, max_calls_in_flight=1)
        with pytest.raises(DeadlineUnmeetableError, match="before the CNN call was sent"):
            await engine.submit_encoded(b"jpeg", deadline=time.monotonic() - 0.001)
        handle.gate = asyncio.Event()
        first = asyncio.create_task(engine.submit_encoded(b"first", priority=1))
        await until(lambda: engine.running == 1, "the first call is on the replica")
        t0 = time.monotonic()
        with pytest.raises(DeadlineUnmeetableError, match="waiting for a CNN replica"):
            await engine.submit_encoded(b"late", priority=0, deadline=time.monotonic() + 0.05)
        waited = time.monotonic() - t0
        handle.gate.set()
        await first
        return handle, waited, engine

    handle, waited, engine = asyncio.run(go())
    assert [args[0] for _, args, _ in handle.sent] == [b"first"]
    assert 0.04 <= waited < 1.0
    assert engine.slots.in_use == 0 and engine.slots.waiting == 0  # every slot given back


def test_ray_engine_refuses_callers_beyond_its_waiting_room():
    async def go():
        handle = FakeHandle()
        handle.gate = asyncio.Event()
        engine = RayCnnEngine(handle, decodes_images=False, max_calls_in_flight=1, max_waiting=1)
        held = [asyncio.create_task(engine.submit(_tensor(i))) for i in range(2)]
        await until(lambda: engine.slots.waiting == 1, "one call waits")
        with pytest.raises(QueueFullError, match="wait for the Ray replicas"):
            await engine.submit(_tensor(9))
        handle.gate.set()
        await asyncio.gather(*held)
        return handle

    assert len(asyncio.run(go()).sent) == 2


def test_ray_engine_retries_an_unreachable_replica_but_not_a_message_too_large():
    import grpc

    from catcascade.cnn_stage.preprocessing import InvalidImageError

    flaky = FakeHandle(errors=[_rpc_error(grpc.StatusCode.UNAVAILABLE)])
    engine = RayCnnEngine(flaky, decodes_images=True, retries=1)
    assert asyncio.run(engine.submit_encoded(b"x")).batch_size == 2 and engine.retried == 1
    down = FakeHandle(errors=[_rpc_error(grpc.StatusCode.UNAVAILABLE)] * 3)
    with pytest.raises(EngineUnavailableError, match="CNN stage unavailable"):
        asyncio.run(RayCnnEngine(down, decodes_images=True, retries=1).submit_encoded(b"x"))
    assert len(down.sent) == 2
    big = FakeHandle(errors=[_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)] * 3)
    with pytest.raises(InvalidImageError, match="larger than the CNN replicas accept") as e:
        asyncio.run(RayCnnEngine(big, decodes_images=True, retries=2).submit_encoded(b"x" * 5000))
    assert len(big.sent) == 1 and e.value.reason == "bytes"  # refused at once: INVALID_ARGUMENT, not retried


def test_ray_engine_raises_replica_errors_as_themselves_and_bugs_as_bugs():
    from catcascade.cnn_stage.preprocessing import InvalidImageError

    refused = FakeHandle(answer=lambda *_: ReplicaAnswer(None, error="image is 300x100; aspect over 2",
                                                          error_reason="aspect"))
    with pytest.raises(InvalidImageError, match="aspect over 2") as e:
        asyncio.run(RayCnnEngine(refused, decodes_images=True).submit_encoded(b"x"))
    assert e.value.reason == "aspect"  # the metrics label survives the trip
    wrapped = FakeHandle(errors=[_task_error(EngineUnavailableError("replica lost its model"))])
    with pytest.raises(EngineUnavailableError, match="lost its model") as e:
        asyncio.run(RayCnnEngine(wrapped, decodes_images=False, retries=3).submit(_tensor(0)))
    assert type(e.value) is EngineUnavailableError and len(wrapped.sent) == 1
    bug = FakeHandle(errors=[_task_error(KeyError("oops"))])
    from ray.exceptions import RayTaskError

    with pytest.raises(RayTaskError):
        asyncio.run(RayCnnEngine(bug, decodes_images=False, retries=3).submit(_tensor(0)))
    assert len(bug.sent) == 1  # a bug is not an outage: not retried, and INTERNAL to the client
    raw_bug = FakeHandle(errors=[ZeroDivisionError("raw")])  # Serve's gRPC transport sends errors as they are
    with pytest.raises(ZeroDivisionError):
        asyncio.run(RayCnnEngine(raw_bug, decodes_images=False, retries=3).submit(_tensor(0)))


def test_ray_verifier_passes_priority_trace_headers_and_a_bounded_image():
    from PIL import Image

    from catcascade.vlm_stage.vllm_client import VlmClientConfig

    handle = FakeHandle(answer=lambda name, args, kwargs: f"{name} answered")
    verifier = RayVerifier(handle, VlmClientConfig(urls=["http://vlm"], model="cats-lora"),
                           request_headers=lambda: {"traceparent": "00-front-door-01", "x-client": "1"})
    big = Image.new("RGB", (1000, 500), (10, 20, 30))
    assert asyncio.run(verifier.verify(big, ["Persian", "Bengal"], priority=1)) == "verify answered"
    asyncio.run(verifier.explain(big, "Persian", 16, priority=1, headers={"traceparent": "00-call-01"}))
    (_, (image, candidates), kwargs), (_, explain_args, explain_kwargs) = handle.sent
    assert image.size == (448, 224) and candidates == ("Persian", "Bengal")
    assert kwargs == {"priority": 1, "headers": {"traceparent": "00-front-door-01", "x-client": "1"}}
    assert explain_args[1:] == ("Persian", 16)
    assert explain_kwargs == {"priority": 1, "headers": {"traceparent": "00-call-01", "x-client": "1"}}
    assert verifier.model_name == "cats-lora"


def test_ray_verifier_raises_the_vlm_clients_own_errors():
    from ray.exceptions import ActorUnavailableError, RayTaskError

    from catcascade.vlm_stage.scoring import ScoringError
    from catcascade.vlm_stage.vllm_client import VlmClientConfig, VlmUnavailableError

    def verifier(*errors):
        return RayVerifier(FakeHandle(errors=errors), VlmClientConfig(urls=["http://vlm"]))

    image = Image.new("RGB", (60, 40))
    with pytest.raises(VlmUnavailableError, match="vLLM unavailable after 3") as e:
        asyncio.run(verifier(_task_error(VlmUnavailableError("vLLM unavailable after 3 attempts"))).verify(
            image, ("a", "b")))
    assert type(e.value) is VlmUnavailableError  # the error itself, not Ray's wrapper around it
    with pytest.raises(ScoringError, match="no logprobs"):
        asyncio.run(verifier(ScoringError("no logprobs")).verify(image, ("a", "b")))
    with pytest.raises(VlmUnavailableError, match="VLM deployment unreachable"):
        asyncio.run(verifier(ActorUnavailableError("replica gone", None)).explain(image, "a", 8))
    with pytest.raises(VlmUnavailableError, match="warm"):
        asyncio.run(verifier(_task_error(VlmUnavailableError("warm-up failed"))).warm_up(("a", "b")))
    with pytest.raises(RayTaskError):  # a bug in the replica stays an internal error
        asyncio.run(verifier(_task_error(KeyError("bug"))).verify(image, ("a", "b")))
