"""Gemma 3 (google/gemma-3-4b-it and larger; the design documents' edge pick): a SigLIP tower
resized to a fixed square whose patches are average-pooled to a fixed number of soft tokens
(256 for the real models at 896 px), a Gemma 3 decoder with sliding-window and global layers,
and Gemma's turn markers (``<start_of_turn>user`` ... ``<start_of_turn>model``).

The tiny build keeps that layout with random weights: a 64 px SigLIP tower of 8 px patches
pooled to 16 soft tokens, a 2-layer decoder (one sliding, one global layer; head_dim 64 for
vLLM's CPU attention), and a byte-level BPE tokenizer with Gemma's special tokens.
"""
from __future__ import annotations

from pathlib import Path

from catcascade.vlm_stage.families import VlmFamily
from catcascade.vlm_stage.families.llava import to_hub_layout

SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]
IMAGE_SIZE = 64
TOKENS_PER_IMAGE = 16
# The real template's layout (bos, then <start_of_turn>role\n ... <end_of_turn>\n, the assistant
# called "model"), without its system-prompt folding; an image is <start_of_image>, which the
# processor (and vLLM) expand to the soft tokens. {% generation %} marks the answer for TRL.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}"
    "{% else %}{% for c in content %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<start_of_turn>model\n{% generation %}{{ render(message['content']) }}<end_of_turn>{% endgeneration %}\n"
    "{% else %}<start_of_turn>{{ message['role'] }}\n{{ render(message['content']) }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_gemma3(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Writes a loadable tiny Gemma 3 (model + processor) to ``out_dir`` and returns it."""
    import torch
    import transformers as tf
    from tokenizers import AddedToken

    from catcascade.vlm_stage.families._tokenizer import prompt_corpus, train_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = prompt_corpus(labels, "<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n",
                           "<end_of_turn>")
    tok = train_bpe(corpus, SPECIAL_TOKENS)
    # Gemma's vocabulary has runs of 1-4 newlines as tokens of their own; vLLM merges the
    # newlines around an image's soft tokens into them, as the real tokenizer would.
    tok.add_tokens([AddedToken("\n" * n, normalized=False, special=False) for n in (1, 2, 3, 4)])
    hf_tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})
    hf_tok.chat_template = CHAT_TEMPLATE
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = tf.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=hf_tok, chat_template=CHAT_TEMPLATE,
                                   image_seq_length=TOKENS_PER_IMAGE)
    config = tf.Gemma3Config(
        text_config=dict(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                         max_position_embeddings=2048, sliding_window=256,
                         layer_types=["sliding_attention", "full_attention"],
                         bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                         pad_token_id=ids["<pad>"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], pad_token_id=ids["<pad>"],
    )
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(config)
    # transformers initialises the projector's weight to zeros: every image would look the same
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 32 ** -0.5)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    to_hub_layout(out)  # SigLIP tower keys as on the hub (vision_tower.vision_model.*), which vLLM expects
    return out


GEMMA3 = VlmFamily(
    name="gemma3",
    model_types=("gemma3",),
    hub_pattern=r"gemma-?3(?!n)",
    # SigLIP encoder layers (vision_tower.vision_model.encoder.layers.N.self_attn.q_proj, mlp.fc1, ...)
    vision_modules=r".*vision_tower\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    processor_args={"do_pan_and_scan": False},
    build_tiny=build_tiny_gemma3,
)
