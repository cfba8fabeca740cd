"""The design documents' VLM families (Pixtral, Gemma 3, Qwen3-VL, Llama 3.2 Vision) built tiny
offline, scored by the in-process backend and LoRA-trained with the answer-only loss, each the
way LLaVA and Qwen2.5-VL are. vLLM serving and the gRPC cascade per family:
tests/test_integration_vlm_families.py."""
from __future__ import annotations

import json
import random
import re

import pytest
from PIL import Image

from catcascade.vlm_stage.families import family_for

FAMILIES = ["pixtral", "gemma3", "qwen3_vl", "mllama"]
LABELS = ["Abyssinian", "Bengal", "Birman", "Bombay", "Persian", "Siamese"]
CANDIDATES = ("Persian", "Bengal", "Siamese")
# Where each family's language model and vision tower live, and how many attention
# projections its 2-3 decoder layers have (Llama 3.2 Vision: the middle layer's are cross-attention).
LAYOUT = {
    "pixtral": (".language_model.layers.", ".vision_tower.transformer.layers.", 8),
    "gemma3": (".language_model.layers.", ".vision_tower.encoder.layers.", 8),
    "qwen3_vl": (".language_model.layers.", ".visual.", 8),
    "mllama": (".language_model.layers.", ".vision_model.", 12),
}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Synthetic images whose class is their colour, as verification examples."""
    from catcascade.training.synthetic_data import write_synthetic_dataset
    from catcascade.training.verification_data import make_example

    root = write_synthetic_dataset(tmp_path_factory.mktemp("family-data") / "img", LABELS, 3, size=64, seed=0,
                                   progress=False)
    rng = random.Random(0)
    return [make_example(str(p), label, LABELS, rng) for label in LABELS for p in sorted((root / label).iterdir())]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    from catcascade.training.synthetic_data import DEMO_LABELS
    from catcascade.vlm_stage.tiny_model import build_tiny_vlm

    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "base", DEMO_LABELS, request.param)


def test_tiny_build_is_offline_and_resolves_to_its_family(tiny):
    name, path = tiny
    config = json.loads((path / "config.json").read_text())
    assert family_for(path).name == name
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    text = config.get("text_config", {})
    assert text.get("head_dim", text.get("hidden_size", 0) // max(1, text.get("num_attention_heads", 1))) == 64


def test_lora_targets_the_language_model_and_optionally_the_vision_tower(tiny):
    from transformers import AutoModelForImageTextToText

    from catcascade.training.train_vlm import target_modules_regex

    name, path = tiny
    language, vision_path, n_attention = LAYOUT[name]
    modules = dict(AutoModelForImageTextToText.from_pretrained(path).named_modules())

    def hits(parts):
        rx = re.compile(target_modules_regex(parts, str(path)))
        return [n for n in modules if rx.fullmatch(n)]

    attention = hits(("attention",))
    assert len(attention) == n_attention and all(language in n for n in attention), attention
    mlp = hits(("mlp",))
    assert mlp and all(language in n and n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for n in mlp)
    vision = hits(("vision",))
    assert len(vision) >= 8 and all(vision_path in n for n in vision), vision
    assert all(type(modules[n]).__name__ == "Linear" for n in attention + mlp + vision)


def test_answer_letters_are_the_tokens_after_the_generation_prompt(tiny):
    """The multiple-choice scorer reads one token per option: each letter must be a token of its
    own right after the family's generation prompt, in the rendered prompt as in the answer."""
    from catcascade.vlm_stage.families import family_named
    from catcascade.vlm_stage.prompts import build_multiple_choice
    from catcascade.vlm_stage.transformers_backend import option_token_ids

    name, path = tiny
    processor = family_named(name).load_processor(str(path))
    prompt = build_multiple_choice(CANDIDATES)
    text = processor.apply_chat_template(prompt.messages({"type": "image"}), add_generation_prompt=True, tokenize=False)
    ids = option_token_ids(processor.tokenizer, prompt.choices)
    assert len(set(ids)) == len(prompt.choices) == 4
    for letter, letter_id in zip(prompt.choices, ids):
        joined = processor.tokenizer.encode(text + letter, add_special_tokens=False)
        assert joined[-1] == letter_id and joined[:-1] == processor.tokenizer.encode(text, add_special_tokens=False)


def test_in_process_backend_scores_each_family(tiny):
    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier

    name, path = tiny
    v = TransformersVerifier(TransformersBackendConfig(model=str(path)))
    small = v.score(Image.new("RGB", (90, 70), (180, 90, 30)), CANDIDATES)
    big = v.score(Image.new("RGB", (2000, 1500), (30, 90, 180)), CANDIDATES)
    for s in (small, big):
        assert s.candidates == CANDIDATES and s.mode == "multiple_choice"
        assert abs(sum(s.probabilities) + s.none_probability - 1) < 1e-6 and min(s.probabilities) > 0
    assert small.probabilities != big.probabilities
    if name in ("pixtral", "qwen3_vl"):  # dynamic resolution, bounded: 448x336 px at most
        per_image = {"pixtral": 28 * 21 + 21, "qwen3_vl": 14 * 10}[name]  # pixtral: a row marker per row
        assert 0 < big.prompt_tokens - small.prompt_tokens < per_image
    else:  # fixed-size image tokens (Gemma 3) or a single <|image|> (Llama 3.2 Vision)
        assert big.prompt_tokens == small.prompt_tokens
    yes_no = TransformersVerifier(TransformersBackendConfig(model=str(path), scoring_mode="yes_no"))
    assert yes_no.score(Image.new("RGB", (90, 70), (180, 90, 30)), CANDIDATES).requests == 3


def test_a_batch_scores_each_image_as_alone(tiny):
    """Training's held-out accuracy scores prompts in left-padded batches: each row must be what
    the image scores alone (Gemma 3 and Llama 3.2 Vision pair images with prompts only when the
    images come one list per prompt)."""
    from catcascade.vlm_stage.prompts import build_multiple_choice
    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier

    _, path = tiny
    v = TransformersVerifier(TransformersBackendConfig(model=str(path)))
    prompts = [build_multiple_choice(CANDIDATES), build_multiple_choice(CANDIDATES[:2])]
    images = [Image.new("RGB", (90, 70), (180, 90, 30)), Image.new("RGB", (64, 120), (20, 160, 90))]
    batch = v.answer_logprobs_batch(prompts, images)
    for (prompt, image), row in zip(zip(prompts, images), batch):
        alone = v.answer_logprobs(prompt, image)
        assert [c for c, _ in row] == list(prompt.choices)
        assert [lp for _, lp in row] == pytest.approx([lp for _, lp in alone], abs=1e-4)
    assert batch[0] != batch[1]


def test_loss_covers_the_answer_only(tiny, examples):
    """Each family's training rows put labels on the answer letter and the end of the turn only;
    Llama 3.2 Vision through its template's {% generation %} markers (its cross-attention mask
    cannot be cut into prompt and completion), the others as prompt/completion pairs."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from catcascade.training.train_vlm import VlmTrainConfig, _row, answer_loss_rows
    from catcascade.vlm_stage.families import family_named
    from catcascade.vlm_stage.transformers_backend import option_token_ids

    name, path = tiny
    processor = family_named(name).load_processor(str(path))
    split, marked = answer_loss_rows(VlmTrainConfig(base_model=str(path)), processor)
    assert (split, marked) == ((False, True) if name == "mllama" else (True, False))
    assert answer_loss_rows(VlmTrainConfig(base_model=str(path), answer_only_loss=False), processor) == (False, False)
    convs = [e.to_conversation() for e in examples[:3]]
    collate = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=split or None,
                                                    assistant_only_loss=marked)
    batch = collate([_row(c, split) for c in convs])
    for labels, conv in zip(batch["labels"], convs):
        kept = labels[labels != -100].tolist()
        letter = option_token_ids(processor.tokenizer, conv.prompt.choices)[conv.prompt.choices.index(conv.answer)]
        assert kept[0] == letter and processor.tokenizer.eos_token_id in kept[1:] and len(kept) <= 3, kept


def test_train_lora_on_each_family(tiny, examples, tmp_path):
    from catcascade.training.train_vlm import VlmTrainConfig, train_lora
    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier

    name, path = tiny
    cfg = VlmTrainConfig(base_model=str(path), rank=4, alpha=8, max_steps=4, batch_size=6, lr=5e-3)
    summary = train_lora(cfg, examples, tmp_path / "adapter", eval_examples=examples[:5], progress=False)
    losses = summary["losses"]
    assert summary["steps"] == 4 and losses[-1] < losses[0], losses
    assert summary["accuracy_before"]["n"] == summary["accuracy_after"]["n"] == 5
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "language_model" in adapter["target_modules"] and "vision" not in adapter["target_modules"]
    img = Image.open(examples[0].image_path).convert("RGB")
    base = TransformersVerifier(TransformersBackendConfig(model=str(path))).score(img, examples[0].candidates)
    tuned = TransformersVerifier(TransformersBackendConfig(model=str(path), adapter=str(tmp_path / "adapter")))
    after = tuned.score(img, examples[0].candidates)
    assert max(abs(a - b) for a, b in zip(base.probabilities, after.probabilities)) > 1e-3


def test_qlora_configuration_path_without_cuda(tiny):
    """QLoRA (4-bit NF4 base, GPU users) goes through the same loader for every family; without
    CUDA it is a clear refusal before anything is loaded."""
    import torch

    from catcascade.training.train_vlm import VlmTrainConfig, load_base_model, load_plan

    if torch.cuda.is_available():
        pytest.skip("CUDA present: QLoRA is allowed here")
    _, path = tiny
    with pytest.raises(RuntimeError, match="QLoRA needs a CUDA GPU"):
        load_base_model(VlmTrainConfig(base_model=str(path), qlora=True))
    plan = load_plan(qlora=True, bf16=None, cuda=True, bf16_supported=True)  # what a GPU would get
    assert plan.quantization()["bnb_4bit_quant_type"] == "nf4" and plan.dtype == "bfloat16"
