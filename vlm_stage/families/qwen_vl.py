"""Qwen2-VL and Qwen2.5-VL (the default base, Qwen/Qwen2.5-VL-3B-Instruct): dynamic resolution,
so an image's token count follows its area, bounded here by ``max_pixels``; a ChatML template;
the vision tower is ``visual`` (fused ``qkv`` attention, gated MLP in 2.5).

The tiny builds mirror the real models' layout with random weights: a byte-level BPE
tokenizer with Qwen's special tokens, a 2-layer decoder with head_dim 64 (vLLM's CPU attention)
and multimodal RoPE sections summing to head_dim / 2, a 2-block vision tower.
"""
from __future__ import annotations

from pathlib import Path

from catcascade.vlm_stage.families import VlmFamily

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448
"""At most (448 / 14)^2 = 1024 patches, 256 image tokens after the 2x2 merge; the VLM client
sends images at most 448 px on a side, so nothing it sends is shrunk again."""
# The real models' layout (<|im_start|>role ... <|im_end|>), without their default system
# prompt; {% generation %} marks the answer for TRL's assistant_only_loss.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}"
    "{% else %}{% for c in content %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}<|im_end|>{% endgeneration %}\n"
    "{% else %}{{ render(message['content']) }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_tiny(out_dir: str | Path, labels: list[str], seed: int, version: str) -> Path:
    import torch
    import transformers as tf

    from catcascade.vlm_stage.families._tokenizer import prompt_corpus, train_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = prompt_corpus(labels, "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")
    tok = train_bpe(corpus, SPECIAL_TOKENS)
    hf_tok = tf.Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    hf_tok.chat_template = CHAT_TEMPLATE
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor_cls = tf.Qwen2_5_VLProcessor if version == "2.5" else tf.Qwen2VLProcessor
    processor = processor_cls(image_processor=tf.Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                              tokenizer=hf_tok, video_processor=tf.Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    text = dict(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2.5":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
        config, model_cls = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens), \
            tf.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config, model_cls = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens), \
            tf.Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_qwen2_5_vl(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Writes a loadable tiny Qwen2.5-VL (model + processor) to ``out_dir`` and returns it."""
    return _build_tiny(out_dir, labels, seed, "2.5")


def build_tiny_qwen2_vl(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Writes a loadable tiny Qwen2-VL (model + processor) to ``out_dir`` and returns it."""
    return _build_tiny(out_dir, labels, seed, "2")


_VISION = r".*visual\.blocks\..*\.(qkv|proj|fc1|fc2|gate_proj|up_proj|down_proj)"
_COMMON = dict(vision_modules=_VISION, image_limits={"image": 1, "video": 0}, min_pixels=MIN_PIXELS,
               max_pixels=MAX_PIXELS)
QWEN2_5_VL = VlmFamily(name="qwen2_5_vl", model_types=("qwen2_5_vl",), hub_pattern=r"qwen2\.5-vl",
                       build_tiny=build_tiny_qwen2_5_vl, **_COMMON)
QWEN2_VL = VlmFamily(name="qwen2_vl", model_types=("qwen2_vl",), hub_pattern=r"qwen2-vl",
                     build_tiny=build_tiny_qwen2_vl, **_COMMON)
