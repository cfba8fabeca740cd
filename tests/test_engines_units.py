"""Units of serving/engines/ that need no Ray cluster: the engine interface, the pipeline's
path for engines that decode where the model runs, the Ray settings, and the fast failure on an
unreachable cluster address."""
from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from pydantic import ValidationError

from catcascade.cnn_stage.preprocessing import PreprocessConfig, load_and_preprocess
from catcascade.ensemble.blender_registry import make_blender
from catcascade.ensemble.config import BlendConfig
from catcascade.ensemble.escalation_policy import EscalationMode, EscalationPolicy
from catcascade.serving.batcher import DynamicBatcher
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.cnn_engine import CnnEngine, EncodedCnnEngine, EncodedResult, EngineUnavailableError
from catcascade.serving.engines.ray_config import AutoscalingSettings
from catcascade.serving.engines.ray_engine import check_reachable
from catcascade.serving.pipeline import CascadePipeline
from tests.conftest import jpeg_bytes
from catcascade.vlm_stage.scoring import CandidateScores

LABELS = ["a", "b", "c", "d"]


def test_local_batcher_is_a_cnn_engine():
    assert isinstance(DynamicBatcher(lambda x: x), CnnEngine)
    assert not isinstance(DynamicBatcher(lambda x: x), EncodedCnnEngine)


class DecodingEngine:
    """Stands in for a remote engine that decodes (what the pipeline calls, not what it is)."""

    decodes_images = True
    depth = running = 0

    def __init__(self, cfg: PreprocessConfig):
        self.cfg, self.seen = cfg, []

    async def submit(self, x):  # pragma: no cover - must not be called for a decoding engine
        raise AssertionError("the pipeline sent a tensor to an engine that decodes")

    async def submit_encoded(self, data: bytes) -> EncodedResult:
        x = load_and_preprocess(data, self.cfg)
        self.seen.append(x)
        logits = np.array([float(x.mean()), 0.0, -1.0, -2.0], dtype=np.float32)
        return EncodedResult(logits, 0.5, 2.0, 3, decode_ms=1.25)


class RecordingVerifier:
    def __init__(self):
        self.images = []

    async def verify(self, image, candidates):
        self.images.append(image)
        return CandidateScores(tuple(candidates), (0.7, 0.2, 0.1), 0.0, "m", "multiple_choice")


def test_pipeline_sends_bytes_to_an_engine_that_decodes():
    cfg = PreprocessConfig(image_size=32)
    engine, verifier = DecodingEngine(cfg), RecordingVerifier()
    pipe = CascadePipeline(LABELS, cfg, engine, EscalationPolicy(), make_blender(BlendConfig()), verifier=verifier)
    try:
        data = jpeg_bytes(seed=1)
        never = asyncio.run(pipe.classify(data, mode=EscalationMode.NEVER))
        assert never.timings.decode_ms == pytest.approx(1.25) and never.timings.cnn_batch_size == 3
        assert never.timings.cnn_queue_ms == 0.5 and never.timings.cnn_ms == 2.0
        assert verifier.images == []  # nothing decoded on this side for a CNN-only answer
        always = asyncio.run(pipe.classify(data, mode=EscalationMode.ALWAYS))
        assert always.escalated and always.vlm.probabilities == (0.7, 0.2, 0.1)
        local_copy, _ = pipe._decode(data, True)  # what the local engine would hand the VLM
        assert len(verifier.images) == 1 and verifier.images[0].tobytes() == local_copy.tobytes()
    finally:
        pipe.close()
    assert len(engine.seen) == 2 and engine.seen[0].shape == (3, 32, 32)


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
