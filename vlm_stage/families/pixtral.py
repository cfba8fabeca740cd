"""Pixtral (mistral-community/pixtral-12b: the report's recommended verifier; Mistral-Small-3.1
and its successors, ``mistral3``, carry the same tower): a Pixtral vision encoder that keeps an
image's aspect ratio and turns every 16x16 patch into a token (with an ``[IMG_BREAK]`` after
each row and ``[IMG_END]`` after the last), 2-D RoPE, a Mistral decoder and Mistral's
``[INST] ... [/INST]`` turns.

On the hub Pixtral-12B is a ``llava`` whose ``vision_config`` is ``pixtral``; ``family_for``
tells it from a CLIP LLaVA by that. The tiny build has the Pixtral-12B layout with random
weights: a 2-layer Pixtral tower, a 2-layer Mistral decoder with head_dim 64 (vLLM's CPU
attention) and a byte-level BPE tokenizer with Mistral's special tokens.
"""
from __future__ import annotations

from pathlib import Path

from catcascade.vlm_stage.families import VlmFamily

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
LONGEST_EDGE = 448
"""Images are resized (aspect kept) to at most 448 px on a side: at most 28 x 28 patch tokens plus
28 row markers (the real models allow 1024 px, 4,096 tokens); the VLM client sends at most 448 px."""
# Pixtral-12B's template: bos, [INST]user content[/INST], the answer then eos; an image is [IMG],
# which the processor (and vLLM) expand to the patch rows. {% generation %} marks the answer for TRL.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}"
    "{% else %}{% for c in content %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}[IMG]"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
    "{% else %}[INST]{{ render(message['content']) }}[/INST]{% endif %}"
    "{% endfor %}"
)


def build_tiny_pixtral(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Writes a loadable tiny Pixtral (LLaVA layout with a Pixtral tower; model + processor)."""
    import torch
    import transformers as tf

    from catcascade.vlm_stage.families._tokenizer import prompt_corpus, train_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(prompt_corpus(labels, "<s>[INST]", "[/INST]", "</s>"), SPECIAL_TOKENS)
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    hf_tok.chat_template = CHAT_TEMPLATE
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = tf.PixtralImageProcessor(size={"longest_edge": LONGEST_EDGE}, patch_size=16)
    processor = tf.PixtralProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=16,
                                    chat_template=CHAT_TEMPLATE)
    config = tf.LlavaConfig(
        vision_config=tf.PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, head_dim=32, image_size=LONGEST_EDGE,
                                             patch_size=16),
        text_config=tf.MistralConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                     max_position_embeddings=2048, sliding_window=None, bos_token_id=ids["<s>"],
                                     eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        image_token_index=ids["[IMG]"], projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", multimodal_projector_bias=True,
    )
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


PIXTRAL = VlmFamily(
    name="pixtral",
    model_types=("llava", "mistral3"),
    vision_model_types=("pixtral",),
    hub_pattern=r"pixtral|mistral-small-3",
    # Pixtral tower layers: attention q/k/v/o_proj and a gated MLP (feed_forward.gate/up/down_proj)
    vision_modules=r".*vision_tower\.transformer\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    processor_args={"size": {"longest_edge": LONGEST_EDGE}},
    build_tiny=build_tiny_pixtral,
)
