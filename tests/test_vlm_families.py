"""VLM families: what differs between LLaVA and Qwen-VL lives in vlm_stage/families/, and
each consumer (training targets, processor bounds, vLLM flags, tiny builds) gets it from there."""
from __future__ import annotations

import json
import re

import pytest

from catcascade.vlm_stage.families import GENERIC, family_for, family_named


@pytest.mark.parametrize("model,family", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl"), ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
    ("llava-hf/llava-1.5-7b-hf", "llava"), ("some/other-vlm", "generic"),
])
def test_family_of_a_hub_id(model, family):
    assert family_for(model).name == family


def test_family_of_a_local_folder_comes_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert family_for(tmp_path) is family_named("qwen2_5_vl")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    assert family_for(tmp_path) is GENERIC
    with pytest.raises(ValueError, match="unknown VLM family 'gemma'"):
        family_named("gemma")


def test_image_bounds_and_vllm_flags_per_family():
    qwen, llava = family_named("qwen2_5_vl"), family_named("llava")
    assert qwen.processor_kwargs() == {"size": {"shortest_edge": 3136, "longest_edge": 448 * 448}}
    args = qwen.vllm_args()
    assert json.loads(args[args.index("--mm-processor-kwargs") + 1]) == qwen.processor_kwargs()
    assert json.loads(args[args.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    assert llava.processor_kwargs() == {} and llava.vllm_args() == ["--limit-mm-per-prompt", '{"image": 1}']


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def tiny_qwen(request, tmp_path_factory):
    from catcascade.training.synthetic_data import DEMO_LABELS
    from catcascade.vlm_stage.tiny_model import build_tiny_vlm

    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "base", DEMO_LABELS, request.param)


def test_tiny_qwen_targets_the_language_model_and_optionally_visual(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    from catcascade.training.train_vlm import target_modules_regex

    name, path = tiny_qwen
    assert family_for(path).name == name
    names = [n for n, _ in AutoModelForImageTextToText.from_pretrained(path).named_modules()]

    def hits(parts):
        rx = re.compile(target_modules_regex(parts, str(path)))
        return [n for n in names if rx.fullmatch(n)]

    attention = hits(("attention",))
    assert len(attention) == 2 * 4 and all(".language_model.layers." in n for n in attention)
    vision = hits(("vision",))
    assert vision and all(".visual.blocks." in n for n in vision)
    assert {n.rsplit(".", 1)[-1] for n in vision} >= {"qkv", "proj"}


def test_tiny_qwen_scores_through_the_in_process_backend(tiny_qwen):
    """Same prompts, parser and interface as the LLaVA: the answer tokens exist after the
    ChatML assistant marker, and the image becomes a bounded number of tokens."""
    from PIL import Image

    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier

    _, path = tiny_qwen
    v = TransformersVerifier(TransformersBackendConfig(model=str(path)))
    small = v.score(Image.new("RGB", (90, 70), (180, 90, 30)), ("Persian", "Bengal", "Siamese"))
    assert len(small.probabilities) == 3 and abs(sum(small.probabilities) + small.none_probability - 1) < 1e-6
    big = v.score(Image.new("RGB", (2000, 1500), (180, 90, 30)), ("Persian", "Bengal", "Siamese"))
    # The backend bounds the longer side to 448 px and the family's max_pixels to 448x448:
    # 448x336 is 32x24 patches, 192 tokens after the 2x2 merge (the small image: 6).
    assert small.prompt_tokens < big.prompt_tokens <= small.prompt_tokens + 256
