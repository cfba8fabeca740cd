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
    ("mistral-community/pixtral-12b", "pixtral"), ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", "pixtral"),
    ("google/gemma-3-4b-it", "gemma3"), ("google/gemma-3n-E4B-it", "generic"),
    ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"), ("meta-llama/Llama-3.2-11B-Vision-Instruct", "mllama"),
])
def test_family_of_a_hub_id(model, family):
    assert family_for(model).name == family


# The fields of the real models' config.json that tell the families apart (shapes as published
# on the hub, trimmed by hand: no weights or configs can be downloaded here).
REAL_CONFIGS = {
    "pixtral-12b": ("pixtral", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 10,
        "projector_hidden_act": "gelu", "vision_feature_layer": -1,
        "text_config": {"model_type": "mistral", "hidden_size": 5120, "head_dim": 128, "vocab_size": 131072},
        "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "image_size": 1024, "patch_size": 16,
                          "head_dim": 64, "num_attention_heads": 16, "rope_theta": 10000.0}}),
    "Mistral-Small-3.1-24B-Instruct-2503": ("pixtral", {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
        "spatial_merge_size": 2, "multimodal_projector_bias": False,
        "text_config": {"model_type": "mistral", "hidden_size": 5120, "num_hidden_layers": 40},
        "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "image_size": 1540, "patch_size": 14}}),
    "gemma-3-4b-it": ("gemma3", {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
        "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "head_dim": 256, "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model", "image_size": 896, "patch_size": 14,
                          "vision_use_head": False}}),
    "Qwen3-VL-8B-Instruct": ("qwen3_vl", {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
        "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 4096, "head_dim": 128,
                        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                         "rope_type": "default"}},
        "vision_config": {"model_type": "qwen3_vl", "depth": 27, "deepstack_visual_indexes": [8, 16, 24],
                          "patch_size": 16, "spatial_merge_size": 2}}),
    "Llama-3.2-11B-Vision-Instruct": ("mllama", {
        "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama", "image_token_index": 128256,
        "text_config": {"model_type": "mllama_text_model", "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]},
        "vision_config": {"model_type": "mllama_vision_model", "image_size": 560, "max_num_tiles": 4}}),
    "llava-1.5-7b-hf": ("llava", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "text_config": {"model_type": "llama"},
        "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}}),
}


@pytest.mark.parametrize("folder", sorted(REAL_CONFIGS))
def test_family_of_a_local_copy_of_a_real_model_comes_from_its_config(folder, tmp_path):
    """A downloaded model folder (any name) resolves by its config.json: Pixtral-12B is a
    ``llava`` told from a CLIP LLaVA by its ``pixtral`` vision tower."""
    family, config = REAL_CONFIGS[folder]
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text(json.dumps(config))
    assert family_for(tmp_path / "weights").name == family
    assert family_for(f"someone/{folder}").name == family  # and the hub id, by name


def test_family_of_a_local_folder_comes_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert family_for(tmp_path) is family_named("qwen2_5_vl")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    assert family_for(tmp_path) is GENERIC
    with pytest.raises(ValueError, match="unknown VLM family 'gemma'"):
        family_named("gemma")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral3"}))  # no vision_config
    assert family_for(tmp_path) is GENERIC


def test_image_bounds_and_vllm_flags_per_family():
    qwen, llava = family_named("qwen2_5_vl"), family_named("llava")
    assert qwen.processor_kwargs() == {"size": {"shortest_edge": 3136, "longest_edge": 448 * 448}}
    args = qwen.vllm_args()
    assert json.loads(args[args.index("--mm-processor-kwargs") + 1]) == qwen.processor_kwargs()
    assert json.loads(args[args.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    assert llava.processor_kwargs() == {} and llava.vllm_args() == ["--limit-mm-per-prompt", '{"image": 1}']


def test_image_bounds_of_the_design_documents_families():
    """Qwen3-VL's bounds are pixel areas (16 px patches, one token per 32x32 px); Pixtral keeps
    the aspect ratio under a longest edge; Gemma 3 resizes to its fixed square, without pan-and-scan
    crops (each crop would add 256 tokens on the real models). vLLM gets the same arguments."""
    qwen3, pixtral, gemma = family_named("qwen3_vl"), family_named("pixtral"), family_named("gemma3")
    assert qwen3.processor_kwargs() == {"size": {"shortest_edge": 64 * 64, "longest_edge": 448 * 448}}
    assert pixtral.processor_kwargs() == {"size": {"longest_edge": 448}}
    assert gemma.processor_kwargs() == {"do_pan_and_scan": False}
    for fam in (qwen3, pixtral, gemma):
        args = fam.vllm_args()
        assert json.loads(args[args.index("--mm-processor-kwargs") + 1]) == fam.processor_kwargs()
    assert json.loads(qwen3.vllm_args()[1]) == {"image": 1, "video": 0}


def test_llama_3_2_vision_is_refused_by_vllm_from_0_10_2_before_a_server_starts(tmp_path):
    from catcascade.errors import CatcascadeError
    from catcascade.vlm_stage.families import VllmUnsupportedError
    from catcascade.vlm_stage.vllm_server import VllmServerConfig

    mllama = family_named("mllama")
    mllama.check_vllm("0.10.1")  # the last versions that served it
    with pytest.raises(VllmUnsupportedError, match=r"vLLM 0\.32\.0\+cpu cannot serve the mllama family.*"
                                                   r"until v0\.10\.2.*_get_num_multimodal_tokens.*--vlm-backend "
                                                   r"transformers"):
        mllama.check_vllm("0.32.0+cpu")
    for name in ("llava", "qwen2_5_vl", "qwen3_vl", "pixtral", "gemma3"):
        family_named(name).check_vllm("0.32.0")
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS["Llama-3.2-11B-Vision-Instruct"][1]))
    with pytest.raises(CatcascadeError, match="cannot serve the mllama family") as refused:
        VllmServerConfig(model=str(tmp_path))  # the installed vLLM (0.32): refused before any server exists
    assert isinstance(refused.value, ValueError)  # a configuration error: `serve-vlm` prints it, exit code 2


def test_serve_vlm_refuses_a_llama_3_2_vision_bundle_with_the_reason(demo_bundle, tmp_path, capsys):
    import shutil

    from catcascade.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle, ignore=shutil.ignore_patterns("data"))
    base = bundle / "vlm" / "base"
    (base / "config.json").write_text(json.dumps(REAL_CONFIGS["Llama-3.2-11B-Vision-Instruct"][1]))
    assert main(["serve-vlm", "--bundle", str(bundle), "--log", str(tmp_path / "vllm.log")]) == 2
    err = capsys.readouterr().err
    assert "cannot serve the mllama family" in err and "--vlm-backend transformers" in err
    assert not (tmp_path / "vllm.log").exists()


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
