"""The Ray Serve replica classes (serving/engines/ray_deployments.py) run in-process, without a
cluster: the CNN replica's decode, batch and refusal paths on the real ONNX model, and the VLM
replica's mapping of errors to values (the front door turns them back into the local engine's
exception types). The cluster itself is exercised by tests/test_ray_engine.py, where these
classes run inside Ray actors that coverage does not follow."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from PIL import Image

from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
from catcascade.cnn_stage.preprocessing import load_and_preprocess
from catcascade.cnn_stage.topk import softmax
from catcascade.ensemble.bundle import load_bundle
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.ray_deployments import (CNN_DEPLOYMENT, ReplicaAnswer, VlmStage, _CnnReplica, _deployment_options,
                                             vlm_client_config)
from tests.conftest import jpeg_bytes
from catcascade.vlm_stage.vllm_client import VllmVerifier

IMAGE = Image.new("RGB", (90, 70), (180, 90, 30))


class InlineCnnReplica(_CnnReplica):
    """The replica with ``_run_batch`` calling ``_run_many`` at once (what @serve.batch wraps)
    and a fixed replica name (Serve's replica context exists only inside a cluster)."""

    batches: list[int]

    async def _run_batch(self, item):
        self.batches = getattr(self, "batches", []) + [1]
        return (await self._run_many([item]))[0]

    def _replica_name(self) -> str:
        return "CnnStage#test"


def _config(bundle, **over) -> dict:
    return ServeConfig(bundle=bundle, port=0, **over).model_dump(mode="json")


def test_cnn_replica_answers_with_the_bundles_model(demo_bundle):
    replica = InlineCnnReplica(_config(demo_bundle, vlm={"urls": []}))
    bundle = load_bundle(demo_bundle)
    data = jpeg_bytes(seed=4)
    x = load_and_preprocess(data, bundle.preprocess)
    expected = OnnxClassifier(bundle.cnn_path).run(x[None])[0]

    encoded = asyncio.run(replica.classify_encoded(data))
    tensor = asyncio.run(replica.classify_tensor(x))
    for answer in (encoded, tensor):
        assert answer.error is None and answer.batch_size == 1 and answer.replica == "CnnStage#test"
        np.testing.assert_allclose(answer.output, expected, rtol=1e-4, atol=1e-5)
        assert answer.compute_ms > 0 and answer.queue_ms >= 0
    assert encoded.decode_ms > 0 and tensor.decode_ms == 0.0
    assert replica.describe() == {"bundle": bundle.version_string, "labels": list(bundle.manifest.labels),
                                  "has_vlm": False, "precision": "fp32", "providers": ["CPUExecutionProvider"],
                                  "replica": "CnnStage#test"}
    assert int(np.argmax(softmax(encoded.output))) == int(np.argmax(expected))


def test_cnn_replica_refuses_bad_bytes_as_a_value(demo_bundle):
    replica = InlineCnnReplica(_config(demo_bundle, vlm={"urls": []}))
    answer = asyncio.run(replica.classify_encoded(b"not an image"))
    assert isinstance(answer, ReplicaAnswer) and answer.output is None
    assert "image" in answer.error.lower() and not getattr(replica, "batches", [])  # never reached the model


def test_cnn_replica_without_an_int8_model_says_so(demo_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy)
    if load_bundle(copy).cnn_int8_path is not None:
        pytest.skip("the demo bundle carries an INT8 model")
    with pytest.raises(ValueError, match="no INT8 model"):
        InlineCnnReplica(_config(copy, vlm={"urls": []}, cnn_precision="int8"))


def test_deployment_options_follow_the_settings(demo_bundle):
    cfg = ServeConfig(bundle=demo_bundle, port=0, batching={"max_batch_size": 8, "instances": 2},
                      ray={"cnn": {"num_replicas": 3, "max_ongoing_requests": 4}})
    opts = _deployment_options(cfg.ray.cnn, cfg.batching)
    assert opts["name"] == CNN_DEPLOYMENT and opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["max_ongoing_requests"] == 16  # room for two full batches in flight
    auto = _deployment_options(ServeConfig(bundle=demo_bundle, port=0).ray.cnn, cfg.batching)
    assert "num_replicas" not in auto and auto["autoscaling_config"]["min_replicas"] >= 1


def _vlm_stage(demo_bundle, handler) -> VlmStage:
    cfg = ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": ["http://vlm.test"], "max_retries": 0})
    stage = VlmStage(cfg.model_dump(mode="json"))
    stage.verifier = VllmVerifier(vlm_client_config(cfg, load_bundle(demo_bundle)),
                                  transport=httpx.MockTransport(handler))
    return stage


def test_vlm_replica_returns_errors_as_values(demo_bundle):
    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    stage = _vlm_stage(demo_bundle, refused)
    kind, message = asyncio.run(stage.verify(IMAGE, ("Persian", "Siamese")))
    assert kind == "unavailable" and message
    kind, message = asyncio.run(stage.explain(IMAGE, "Persian", 16))
    assert kind == "unavailable" and message

    def malformed(request):  # HTTP 200 with no logprobs: a scoring error, not a crash
        return httpx.Response(200, json={"choices": [{"message": {"content": "A"}, "logprobs": None}],
                                         "usage": {"prompt_tokens": 5}})

    kind, message = asyncio.run(_vlm_stage(demo_bundle, malformed).verify(IMAGE, ("Persian", "Siamese")))
    assert kind == "scoring" and message


def test_vlm_replica_warm_up_reports_failure_as_text(demo_bundle):
    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    stage = VlmStage(ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": ["http://127.0.0.1:9"]}
                                 ).model_dump(mode="json"))
    report = asyncio.run(stage.warm_up(("Persian", "Siamese"), timeout_s=5.0))
    assert report is not None and ":" in report


def test_vlm_client_config_needs_a_model(demo_bundle):
    from catcascade.ensemble.bundle import Bundle

    cfg = ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": ["http://vlm.test"], "model": "other-adapter"})
    bundle = load_bundle(demo_bundle)
    assert vlm_client_config(cfg, bundle).model == "other-adapter"
    assert vlm_client_config(ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": ["http://vlm.test"]}),
                             bundle).model == bundle.manifest.vlm.adapter_name
    no_vlm = Bundle(bundle.root, bundle.manifest.model_copy(update={"vlm": None}))
    with pytest.raises(ValueError, match="no vlm section"):
        vlm_client_config(ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": ["http://vlm.test"]}), no_vlm)
