"""Builds a tiny LLaVA (random weights) from a config, for tests and the offline demo.

No weights can be downloaded on the machines this project is tested on, so the demo and the
tests use a ~1M-parameter LLaVA that the project builds itself: a byte-level BPE tokenizer
trained on the prompt vocabulary, a 56 px CLIP vision tower and a 2-layer Llama (head_dim 64,
which vLLM's CPU attention supports). vLLM loads it from the folder like any hub model.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_SIZE = 56
# Renders OpenAI-style content lists in order (text, image, text), as vLLM and TRL pass them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tokenizer_corpus(labels: list[str]) -> list[str]:
    from vlm_stage.prompts import build_multiple_choice, build_yes_no

    texts = []
    for i in range(0, len(labels), 3):
        p = build_multiple_choice(labels[i:i + 3])
        texts.append(f"USER: {p.before_image} {p.after_image} ASSISTANT: A B C D")
    texts += [build_yes_no(label).after_image + " yes no" for label in labels]
    return texts * 20


def build_tiny_llava(out_dir: str | Path, labels: list[str], seed: int = 0) -> Path:
    """Writes a loadable tiny LLaVA (model + processor) to ``out_dir`` and returns it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(labels), trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    hf_tok.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, chat_template=CHAT_TEMPLATE,
                               patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=IMAGE_SIZE, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=hf_tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    to_hub_layout(out)
    return out


def to_hub_layout(model_dir: Path) -> None:
    """transformers 5.x saves the CLIP tower as ``vision_tower.*``; vLLM expects the hub's
    ``vision_tower.vision_model.*``. Rewrites the safetensors keys in place."""
    from safetensors.torch import load_file, save_file

    for path in Path(model_dir).glob("*.safetensors"):
        state = load_file(str(path))
        renamed = {}
        for k, v in state.items():
            for prefix in ("model.vision_tower.", "vision_tower."):
                if k.startswith(prefix) and not k.startswith(prefix + "vision_model."):
                    k = prefix + "vision_model." + k[len(prefix):]
                    break
            renamed[k] = v.contiguous()
        save_file(renamed, str(path), metadata={"format": "pt"})
