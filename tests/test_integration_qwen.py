"""The default VLM family end to end: a tiny Qwen2.5-VL (the layout of the default base,
Qwen/Qwen2.5-VL-3B-Instruct) trained by `catcascade train-vlm`, served with its LoRA adapter
by the real vLLM, scored in both modes, and used by the cascade over the real gRPC server.

One vLLM server of its own for the module (the session's serves the LLaVA demo bundle and is
stopped meanwhile: one vLLM server at a time)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import shutil

import pytest
from PIL import Image

from tests.conftest import GrpcServerThread, jpeg_bytes

pytestmark = pytest.mark.integration
CANDIDATES = ("Persian", "British_Shorthair", "Siamese")
IMAGE = Image.new("RGB", (90, 70), (180, 90, 30))


@pytest.fixture(scope="module")
def qwen_bundle(demo_bundle, tmp_path_factory):
    """The demo bundle's CNN with a tiny Qwen2.5-VL as its VLM, the adapter trained by the
    documented commands: `vlm-data` (the CNN's confusions) then `train-vlm --attach`."""
    from catcascade.cli import main
    from catcascade.vlm_stage.tiny_model import build_tiny_vlm

    root = tmp_path_factory.mktemp("qwen") / "bundle"
    work = root.parent / "work"
    shutil.copytree(demo_bundle, root, ignore=shutil.ignore_patterns("vlm", "data"))
    labels = json.loads((root / "manifest.json").read_text())["labels"]
    build_tiny_vlm(root / "vlm" / "base", labels, family="qwen2_5_vl")
    assert main(["vlm-data", "--images", str(demo_bundle / "data"), "--bundle", str(demo_bundle),
                 "--out", str(work / "vd"), "--eval-fraction", "0.05"]) == 0
    assert main(["train-vlm", "--data", str(work / "vd" / "train.jsonl"), "--eval-data", str(work / "vd" / "eval.jsonl"),
                 "--base-model", str(root / "vlm" / "base"), "--out", str(root / "vlm" / "adapter"),
                 "--max-steps", "8", "--batch-size", "8", "--rank", "8", "--alpha", "16", "--lr", "5e-3",
                 "--dropout", "0", "--attach", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def qwen_vllm(qwen_bundle, tmp_path_factory, session_vllm_stopped):
    from catcascade.ensemble.bundle import load_bundle
    from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

    cfg = VllmServerConfig.for_bundle(load_bundle(qwen_bundle), max_num_seqs=4)
    server = VllmServer(cfg, log_path=tmp_path_factory.mktemp("logs") / "vllm-qwen.log").start()
    yield server
    server.stop()


def _verify(url: str, model: str, mode: str):
    from catcascade.vlm_stage.vllm_client import VlmClientConfig, VllmVerifier

    async def go():
        v = VllmVerifier(VlmClientConfig(urls=[url], model=model, scoring_mode=mode))
        try:
            return await v.verify(IMAGE, CANDIDATES)
        finally:
            await v.aclose()

    return asyncio.run(go())


def test_train_vlm_trained_a_language_model_adapter_for_qwen(qwen_bundle):
    adapter = qwen_bundle / "vlm" / "adapter"
    summary = json.loads((adapter / "train_summary.json").read_text())
    losses = summary["losses"]
    assert summary["steps"] == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert "language_model" in targets and "visual" not in targets
    vlm = json.loads((qwen_bundle / "manifest.json").read_text())["vlm"]  # written by --attach
    assert vlm["base_model"] == str((qwen_bundle / "vlm" / "base").resolve()) and vlm["adapter_dir"] == "vlm/adapter"
    assert vlm["max_model_len"] == 1024


@pytest.mark.parametrize("mode,requests", [("multiple_choice", 1), ("yes_no", 3)])
def test_qwen_adapter_scores_match_the_in_process_backend(qwen_bundle, qwen_vllm, mode, requests):
    """vLLM serves exactly what train-vlm trained: the adapter's scores and prompt token counts
    (the image's dynamic-resolution tokens included) equal the transformers backend's, and
    differ from the base model's."""
    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier
    from catcascade.vlm_stage.vllm_client import image_to_data_url

    served = _verify(qwen_vllm.url, "cats", mode)
    base = _verify(qwen_vllm.url, "catcascade-vlm", mode)
    assert served.mode == mode and served.requests == requests and served.candidates == CANDIDATES
    assert math.isclose(sum(served.probabilities) + served.none_probability, 1.0, abs_tol=1e-6)
    local = TransformersVerifier(TransformersBackendConfig(model=str(qwen_bundle / "vlm" / "base"), scoring_mode=mode,
                                                           adapter=str(qwen_bundle / "vlm" / "adapter")))
    sent = Image.open(io.BytesIO(base64.b64decode(image_to_data_url(IMAGE).split(",", 1)[1]))).convert("RGB")
    mine = local.score(sent, CANDIDATES)
    assert mine.prompt_tokens == served.prompt_tokens > 0
    assert mine.probabilities == pytest.approx(served.probabilities, abs=2e-3)
    assert mine.none_probability == pytest.approx(served.none_probability, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(served.probabilities + (served.none_probability,),
                                          base.probabilities + (base.none_probability,))) > 1e-3


@pytest.mark.parametrize("scoring_mode", ["multiple_choice", "yes_no"])
def test_cascade_over_grpc_uses_the_qwen_adapter(qwen_bundle, qwen_vllm, scoring_mode):
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.client import CatcascadeClient
    from catcascade.serving.config import ServeConfig

    cfg = ServeConfig(bundle=qwen_bundle, port=0, vlm={"urls": [qwen_vllm.url], "scoring_mode": scoring_mode})
    server = GrpcServerThread(cfg).start()
    try:
        with CatcascadeClient(server.target, timeout_s=60) as client:
            resp = client.classify(jpeg_bytes(seed=5), mode="always")
    finally:
        server.stop()
    assert resp.escalated and resp.escalation_reason == pb.ESCALATION_REASON_REQUESTED_ALWAYS
    assert resp.vlm.model == "cats" and resp.vlm.scoring_mode == scoring_mode
    assert [c.label for c in resp.vlm.candidates] == [s.label for s in resp.cnn_top_k]
    assert math.isclose(sum(c.probability for c in resp.vlm.candidates) + resp.vlm.none_probability, 1.0, abs_tol=1e-4)
    assert resp.timings.vlm_ms > 0 and len(resp.labels) == 3
