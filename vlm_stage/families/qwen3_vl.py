"""Qwen3-VL (Qwen/Qwen3-VL-8B-Instruct and siblings): Qwen-VL's dynamic resolution with 16 px
patches (a 2x2 merge makes one token per 32x32 pixels), interleaved multimodal RoPE, and
"deepstack" (features of early vision blocks added to the first decoder layers). The template
and special tokens are Qwen2.5-VL's ChatML.

The tiny build mirrors that layout with random weights: a 2-layer decoder with head_dim 64
(vLLM's CPU attention) and mRoPE sections 12/10/10 (summing to head_dim / 2), a 2-block vision
tower whose first block feeds deepstack.
"""
from __future__ import annotations

from pathlib import Path

from catcascade.vlm_stage.families import VlmFamily
from catcascade.vlm_stage.families.qwen_vl import CHAT_TEMPLATE, SPECIAL_TOKENS

MIN_PIXELS = 64 * 64
MAX_PIXELS = 448 * 448
"""At most (448 / 16)^2 = 784 patches, 196 image tokens after the 2x2 merge (the real models'
default allows 16 Mpx); the VLM client sends images at most 448 px on a side."""


def build_tiny_qwen3_vl(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Writes a loadable tiny Qwen3-VL (model + processor) to ``out_dir`` and returns it."""
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
    image_processor = tf.Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = tf.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = tf.Qwen3VLProcessor(image_processor=image_processor, tokenizer=hf_tok,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    config = tf.Qwen3VLConfig(
        text_config=dict(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [12, 10, 10], "mrope_interleaved": True},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = tf.Qwen3VLForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


QWEN3_VL = VlmFamily(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    hub_pattern=r"qwen3-vl",
    # blocks' fused qkv, proj and MLP (linear_fc1/2), and the patch mergers' MLPs (deepstack included)
    vision_modules=r".*visual\.(blocks|merger|deepstack_merger_list)\..*\.?(qkv|proj|linear_fc1|linear_fc2)",
    image_limits={"image": 1, "video": 0},
    min_pixels=MIN_PIXELS,
    max_pixels=MAX_PIXELS,
    build_tiny=build_tiny_qwen3_vl,
)
