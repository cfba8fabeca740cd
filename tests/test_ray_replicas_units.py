"""The Ray Serve replica classes (serving/engines/ray_deployments.py) run in-process, without a
cluster: the CNN replica's decode, batch and refusal paths on the real ONNX model under the
configured decode limits, and the VLM replica passing priority and trace headers to vLLM and
raising the client's own errors (the front door raises them again as they are). The cluster itself is exercised by tests/test_ray_engine.py, where these
classes run inside Ray actors that coverage does not follow."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
from catcascade.cnn_stage.preprocessing import load_and_preprocess
from catcascade.cnn_stage.topk import softmax
from catcascade.ensemble.bundle import load_bundle
from catcascade.serving.config import ServeConfig
from catcascade.serving.engines.ray_config import GRPC_LIMIT_ENV
from catcascade.serving.engines.ray_deployments import (CNN_DEPLOYMENT, REPLICA_ENV, ReplicaAnswer, VlmStage, _CnnReplica,
                                                        _deployment_options, replica_env)
from catcascade.serving.vlm_backend import vlm_client_config
from catcascade.vlm_stage.vllm_client import VllmVerifier, VlmUnavailableError
from tests.conftest import jpeg_bytes

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


# Every decode limit set away from its default, so a limit the replica ignored would show.
LIMITS = {"max_message_bytes": 6 << 20, "max_pixels": 30_000_000, "max_side": 9000, "max_aspect_ratio": 2.5,
          "max_decode_mb": 96.0, "max_jpeg_scans": 50, "max_jpeg_scan_blocks": 30_000_000, "max_segments": 10_000}


def test_cnn_replica_applies_every_configured_decode_limit(demo_bundle):
    """The replica decodes under the same limits as the local engine (all eight, from
    LimitsConfig.decode_limits): a 3:1 image and a 60-scan JPEG are refused there as here,
    with their reasons, before the model sees them."""
    from benchmarks.hostile_images import jpeg_many_scans

    cfg = ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": []}, limits=LIMITS)
    replica = InlineCnnReplica(cfg.model_dump(mode="json"))
    limits = replica.preprocess_config.limits
    assert limits == cfg.limits.decode_limits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_side, limits.max_aspect_ratio, limits.max_decode_mb,
            limits.max_jpeg_scans, limits.max_jpeg_scan_blocks, limits.max_segments) == tuple(LIMITS.values())
    wide = asyncio.run(replica.classify_encoded(jpeg_bytes(size=(300, 100))))
    scans = asyncio.run(replica.classify_encoded(jpeg_many_scans(64, 60)))
    assert wide.output is None and wide.error_reason == "aspect" and "2.5:1" in wide.error
    assert scans.output is None and scans.error_reason == "scans" and "50" in scans.error
    assert not getattr(replica, "batches", [])  # refused before the model
    default = InlineCnnReplica(_config(demo_bundle, vlm={"urls": []}))  # the defaults take both
    for data in (jpeg_bytes(size=(300, 100)), jpeg_many_scans(64, 60)):
        assert asyncio.run(default.classify_encoded(data)).error is None


def test_replicas_take_messages_as_large_as_the_front_door_does(demo_bundle):
    """Serve's replica gRPC refuses messages over 4 MiB unless told otherwise; every replica's
    environment raises that to the front door's limits.max_message_bytes plus framing."""
    cfg = ServeConfig(bundle=demo_bundle, port=0, limits={"max_message_bytes": 20 << 20})
    env = replica_env(cfg)
    assert REPLICA_ENV.items() <= env.items()
    assert 20 << 20 < int(env[GRPC_LIMIT_ENV]) < 32 << 20
    opts = _deployment_options(cfg.ray.cnn, cfg.batching, env)
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"] == env


def test_classifier_choice_is_one_function_for_every_engine(demo_bundle):
    """make_classifier decides alike for the local engine and the replicas: on a CPU with several
    instances and no thread count, the overlap-aware pair; else one session, its threads given or
    the cores split between the instances."""
    from catcascade.cnn_stage.onnx_runtime import OverlapAwareClassifier, make_classifier

    path = load_bundle(demo_bundle).cnn_path

    def threads(clf) -> int:
        return clf.session.get_session_options().intra_op_num_threads

    assert isinstance(make_classifier(path, instances=2), OverlapAwareClassifier)
    one = make_classifier(path, instances=2, threads=1)
    assert isinstance(one, OnnxClassifier) and threads(one) == 1
    import os

    assert threads(make_classifier(path, instances=1)) == (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="instances"):
        make_classifier(path, instances=0)
    replica = InlineCnnReplica(_config(demo_bundle, vlm={"urls": []}, batching={"instances": 2},
                                       ray={"cnn": {"threads": 1}}))
    assert isinstance(replica.model, OnnxClassifier) and threads(replica.model) == 1
    assert isinstance(InlineCnnReplica(_config(demo_bundle, vlm={"urls": []}, batching={"instances": 2})).model,
                      OverlapAwareClassifier)


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


def test_vlm_replica_raises_the_clients_own_errors(demo_bundle):
    from catcascade.vlm_stage.rationale import RationaleError
    from catcascade.vlm_stage.scoring import ScoringError

    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    stage = _vlm_stage(demo_bundle, refused)
    with pytest.raises(VlmUnavailableError, match="unavailable after 1 attempts"):
        asyncio.run(stage.verify(IMAGE, ("Persian", "Siamese")))
    with pytest.raises(VlmUnavailableError):
        asyncio.run(stage.explain(IMAGE, "Persian", 16))

    def malformed(request):  # HTTP 200 with no logprobs: a scoring error, not a crash
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [ord(json.loads(request.content)["prompt"][0])]})
        return httpx.Response(200, json={"choices": [{"message": {"content": ""}, "logprobs": None}],
                                         "usage": {"prompt_tokens": 5}})

    with pytest.raises(ScoringError):
        asyncio.run(_vlm_stage(demo_bundle, malformed).verify(IMAGE, ("Persian", "Siamese")))
    with pytest.raises(RationaleError, match="no text"):
        asyncio.run(_vlm_stage(demo_bundle, malformed).explain(IMAGE, "Persian", 16))


def test_vlm_replica_passes_priority_and_trace_headers_to_vllm(demo_bundle):
    seen = []

    def handler(request):
        body = json.loads(request.content)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [100 + len(seen)]})
        seen.append((request.headers.get("traceparent"), body.get("priority")))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Fluffy."}, "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

    stage = _vlm_stage(demo_bundle, handler)
    why = asyncio.run(stage.explain(IMAGE, "Persian", 16, priority=1, headers={"traceparent": "00-abc-def-01"}))
    assert why.text == "Fluffy." and seen == [("00-abc-def-01", 1)]


def test_vlm_replica_warm_up_raises_what_failed(demo_bundle):
    stage = VlmStage(ServeConfig(bundle=demo_bundle, port=0, vlm={"urls": ["http://127.0.0.1:9"]}
                                 ).model_dump(mode="json"))
    with pytest.raises(VlmUnavailableError, match="127.0.0.1:9|unavailable"):
        asyncio.run(stage.warm_up(("Persian", "Siamese"), timeout_s=5.0))


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
