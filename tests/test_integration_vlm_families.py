"""The design documents' VLM families end to end, each the way the default family is tested in
test_integration_qwen.py: a tiny Pixtral, Gemma 3, Qwen3-VL and Llama 3.2 Vision attached to the
demo bundle by `catcascade train-vlm --attach`, served with their LoRA adapter by the real vLLM
(scores equal to the in-process backend's), and escalated to through the real gRPC server with
``mode="always"``, the answer blended by the bundle's blender.

vLLM 0.32 cannot serve Llama 3.2 Vision (see docs/vlm.md): its start is refused at once, and the
family is served in the cascade by the in-process transformers backend instead.

One vLLM server at a time: the family fixture is module-scoped and parametrized, so pytest runs
a family's tests together and stops its server before the next family's starts; the session's
own server (the LLaVA demo bundle) is stopped meanwhile. About 1.5 minutes per family here.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import GrpcServerThread, jpeg_bytes

pytestmark = [pytest.mark.integration, pytest.mark.vlm_families]
FAMILIES = ["pixtral", "gemma3", "qwen3_vl", "mllama"]
CANDIDATES = ("Persian", "British_Shorthair", "Siamese")
IMAGE = Image.new("RGB", (90, 70), (180, 90, 30))


@pytest.fixture(scope="module")
def verification_data(demo_bundle, tmp_path_factory):
    """`catcascade vlm-data` once: the demo CNN's confusions as hard negatives, for every family."""
    from catcascade.cli import main

    out = tmp_path_factory.mktemp("family-vd")
    assert main(["vlm-data", "--images", str(demo_bundle / "data"), "--bundle", str(demo_bundle),
                 "--out", str(out), "--eval-fraction", "0.05"]) == 0
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_bundle(request, demo_bundle, verification_data, tmp_path_factory):
    """The demo bundle's CNN with a tiny VLM of the family, its adapter trained and attached by
    `train-vlm --attach`."""
    from catcascade.cli import main
    from catcascade.vlm_stage.tiny_model import build_tiny_vlm

    family = request.param
    root = tmp_path_factory.mktemp(family) / "bundle"
    shutil.copytree(demo_bundle, root, ignore=shutil.ignore_patterns("vlm", "data"))
    build_tiny_vlm(root / "vlm" / "base", json.loads((root / "manifest.json").read_text())["labels"], family=family)
    assert main(["train-vlm", "--data", str(verification_data / "train.jsonl"),
                 "--eval-data", str(verification_data / "eval.jsonl"), "--base-model", str(root / "vlm" / "base"),
                 "--out", str(root / "vlm" / "adapter"), "--max-steps", "6", "--batch-size", "8", "--rank", "8",
                 "--alpha", "16", "--lr", "5e-3", "--dropout", "0", "--attach", str(root)]) == 0
    return family, root


@pytest.fixture(scope="module")
def family_vllm(family_bundle, tmp_path_factory, session_vllm_stopped):
    """vLLM serving the family's base with its adapter as "cats"; None for a family this vLLM
    refuses (checked: refused before any process starts, with the documented reason)."""
    from catcascade.ensemble.bundle import load_bundle
    from catcascade.vlm_stage.families import VllmUnsupportedError
    from catcascade.vlm_stage.vllm_server import VllmServer, VllmServerConfig

    family, root = family_bundle
    if family == "mllama":
        with pytest.raises(VllmUnsupportedError, match="until v0.10.2"):
            VllmServerConfig.for_bundle(load_bundle(root), max_num_seqs=4)
        yield None
        return
    cfg = VllmServerConfig.for_bundle(load_bundle(root), max_num_seqs=4)
    server = VllmServer(cfg, log_path=tmp_path_factory.mktemp("logs") / f"vllm-{family}.log").start()
    yield server
    server.stop()


def _verify(url: str, model: str):
    from catcascade.vlm_stage.vllm_client import VlmClientConfig, VllmVerifier

    async def go():
        v = VllmVerifier(VlmClientConfig(urls=[url], model=model, timeout_s=60))
        try:
            return await v.verify(IMAGE, CANDIDATES)
        finally:
            await v.aclose()

    return asyncio.run(go())


def test_train_vlm_trained_a_language_model_adapter(family_bundle):
    family, root = family_bundle
    adapter = root / "vlm" / "adapter"
    summary = json.loads((adapter / "train_summary.json").read_text())
    losses = summary["losses"]
    assert summary["steps"] == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert summary["accuracy_after"]["n"] > 0
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert "language_model" in targets and "vision" not in targets and "visual" not in targets
    vlm = json.loads((root / "manifest.json").read_text())["vlm"]
    assert vlm["base_model"] == str((root / "vlm" / "base").resolve()) and vlm["adapter_dir"] == "vlm/adapter"


def test_vllm_serves_the_adapter_with_the_in_process_backends_scores(family_bundle, family_vllm):
    """vLLM serves exactly what train-vlm trained: the adapter's multiple-choice scores and
    prompt token counts equal the transformers backend's, and differ from the base model's."""
    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier
    from catcascade.vlm_stage.vllm_client import image_to_data_url

    family, root = family_bundle
    if family_vllm is None:
        pytest.skip(f"vLLM cannot serve {family}: refused at start-up (family_vllm); the cascade test serves it "
                    "in-process")
    served, base = _verify(family_vllm.url, "cats"), _verify(family_vllm.url, "catcascade-vlm")
    assert served.candidates == CANDIDATES and served.model == "cats"
    assert math.isclose(sum(served.probabilities) + served.none_probability, 1.0, abs_tol=1e-6)
    local = TransformersVerifier(TransformersBackendConfig(model=str(root / "vlm" / "base"),
                                                           adapter=str(root / "vlm" / "adapter")))
    sent = Image.open(io.BytesIO(base64.b64decode(image_to_data_url(IMAGE).split(",", 1)[1]))).convert("RGB")
    mine = local.score(sent, CANDIDATES)
    assert mine.prompt_tokens == served.prompt_tokens > 0
    assert mine.probabilities == pytest.approx(served.probabilities, abs=2e-3)
    assert mine.none_probability == pytest.approx(served.none_probability, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(served.probabilities + (served.none_probability,),
                                          base.probabilities + (base.none_probability,))) > 1e-3


def test_cascade_over_grpc_escalates_to_the_family_and_blends(family_bundle, family_vllm):
    from catcascade.ensemble.blender_registry import make_blender
    from catcascade.ensemble.bundle import load_bundle
    from catcascade.serving.api import cascade_pb2 as pb
    from catcascade.client import CatcascadeClient
    from catcascade.serving.config import ServeConfig

    family, root = family_bundle
    vlm = {"urls": [family_vllm.url]} if family_vllm else {"backend": "transformers"}
    bundle = load_bundle(root)
    n = len(bundle.labels)
    server = GrpcServerThread(ServeConfig(bundle=root, port=0, vlm={**vlm, "timeout_s": 60, "call_budget_s": 60})).start()
    try:
        with CatcascadeClient(server.target, timeout_s=120) as client:
            resp = client.classify(jpeg_bytes(seed=5), mode="always", top_k=n)
    finally:
        server.stop()
    assert resp.escalated and resp.escalation_reason == pb.ESCALATION_REASON_REQUESTED_ALWAYS
    assert resp.vlm.model == "cats" and resp.vlm.scoring_mode == "multiple_choice"
    assert [c.label for c in resp.vlm.candidates] == [s.label for s in resp.cnn_top_k[:3]]
    assert math.isclose(sum(c.probability for c in resp.vlm.candidates) + resp.vlm.none_probability, 1.0,
                        abs_tol=1e-4)
    cnn = np.array([{s.label: s.probability for s in resp.cnn_top_k}[name] for name in bundle.labels])
    final = np.array([{s.label: s.probability for s in resp.labels}[name] for name in bundle.labels])
    candidates = [bundle.labels.index(c.label) for c in resp.vlm.candidates]
    expected = make_blender(bundle.manifest.cascade.blend).blend(cnn, candidates,
                                                                 np.array([c.probability for c in resp.vlm.candidates]))
    assert final == pytest.approx(expected, abs=2e-6)
    assert np.abs(final - cnn).max() > 1e-4  # the blend moved something
