"""Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision-Instruct, model_type ``mllama``): unlike the
other families the image never enters the token stream as soft tokens. A tiled vision encoder
(up to 4 tiles of 560 px) feeds cross-attention layers interleaved with the Llama 3 decoder;
the prompt holds a single ``<|image|>`` token that marks where the image's cross-attention begins.

vLLM dropped this architecture (an encoder-decoder model) with its V0 engine: from v0.10.2 on
it refuses to load it, so the family is served by the in-process transformers backend
(``vllm_removed_in``). The tiny build: a 56 px tower with 2 tiles, a 3-layer Llama decoder whose
middle layer cross-attends to the image (head_dim 64), a byte-level BPE tokenizer with
Llama 3's special tokens and its header-style template.
"""
from __future__ import annotations

from pathlib import Path

from catcascade.vlm_stage.families import VlmFamily

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|image|>", "<|finetune_right_pad_id|>", "<|python_tag|>"]
TILE_SIZE = 56
MAX_TILES = 2
# Llama 3.2 Vision's layout: <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, the
# image as <|image|> inside the user turn. {% generation %} marks the answer for TRL.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}"
    "{% else %}{% for c in content %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<|image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{{ bos_token }}"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_mllama(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Writes a loadable tiny Llama 3.2 Vision (model + processor) to ``out_dir`` and returns it."""
    import torch
    import transformers as tf

    from catcascade.vlm_stage.families._tokenizer import prompt_corpus, train_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = prompt_corpus(labels, "<|start_header_id|>user<|end_header_id|>\n\n",
                           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
    tok = train_bpe(corpus, SPECIAL_TOKENS)
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>",
                                        extra_special_tokens={"image_token": "<|image|>"})
    hf_tok.chat_template = CHAT_TEMPLATE
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = tf.MllamaImageProcessor(size={"height": TILE_SIZE, "width": TILE_SIZE}, max_image_tiles=MAX_TILES)
    processor = tf.MllamaProcessor(image_processor=image_processor, tokenizer=hf_tok, chat_template=CHAT_TEMPLATE)
    config = tf.MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=TILE_SIZE, patch_size=14, max_num_tiles=MAX_TILES,
                           intermediate_layers_indices=[0], vision_output_dim=64,
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1],
                         max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                         pad_token_id=ids["<|finetune_right_pad_id|>"]),
        image_token_index=ids["<|image|>"],
    )
    torch.manual_seed(seed)
    model = tf.MllamaForConditionalGeneration(config)
    # transformers initialises the cross-attention gates to zero (tanh(0) = 0): the image would
    # not reach the text at all. Open them, as training does for the real model.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


MLLAMA = VlmFamily(
    name="mllama",
    model_types=("mllama",),
    hub_pattern=r"llama-3\.2-\d+b-vision|llama-3\.2-vision",
    # the tiled encoder's local and global transformers (self_attn.q/k/v/o_proj, mlp.fc1/fc2)
    vision_modules=r".*vision_model\.(transformer|global_transformer)\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)",
    image_limits={"image": 1},
    build_tiny=build_tiny_mllama,
    # TRL's prompt/completion collator joins token ids but not the cross-attention mask
    answer_loss="generation_markers",
    vllm_removed_in="0.10.2",
    vllm_failure=("vLLM 0.32 falls back to its generic Transformers backend for it, which fails at start-up with "
                  "\"AttributeError: 'MllamaProcessor' object has no attribute '_get_num_multimodal_tokens'\"."),
)
