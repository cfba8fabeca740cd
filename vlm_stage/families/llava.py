"""LLaVA: a CLIP vision tower resized to a fixed square, a Llama decoder, and the tiny one the
demo and the tests build (56 px CLIP, 2-layer Llama with head_dim 64 for vLLM's CPU attention)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catcascade.vlm_stage.families import VlmFamily

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_SIZE = 56
# Renders OpenAI-style content lists in order (text, image, text), as vLLM and TRL pass them.
# The assistant turn starts after "ASSISTANT:\n" in the generation prompt and in training alike,
# so the answer letter is its own token in both (a leading space would make BPE emit " A"
# in training while the constrained server samples "A"). The {% generation %} markers let
# TRL's assistant_only_loss find the answer tokens; vLLM renders them as plain text.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}"
    "{% else %}{% for c in content %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "ASSISTANT:\n{% generation %}{{ render(message['content']) }}</s>{% endgeneration %}\n"
    "{% else %}USER: {{ render(message['content']) }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSize:
    """Dimensions of the random LLaVA; head_dim = hidden / heads must be 64 for vLLM's CPU attention."""

    hidden: int = 128
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 256
    vision_hidden: int = 32
    vision_layers: int = 2

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.hidden // self.heads != 64:
            raise ValueError(f"hidden / heads must be 64 (vLLM CPU attention), got {self.hidden} / {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


SIZES = {
    "tiny": TinyLlavaSize(),
    # ~40M parameters: enough compute per token for batching to matter in speed comparisons.
    "small": TinyLlavaSize(hidden=768, layers=6, heads=12, kv_heads=4, intermediate=2048, vision_hidden=128,
                           vision_layers=4),
    # ~200M parameters: closer to where a real VLM's compute per token puts the comparison.
    "medium": TinyLlavaSize(hidden=1024, layers=12, heads=16, kv_heads=4, intermediate=4096, vision_hidden=256,
                            vision_layers=4),
}


def build_tiny_llava(out_dir: str | Path, labels: list[str], seed: int = 0, size: TinyLlavaSize = SIZES["tiny"]) -> Path:
    """Writes a loadable tiny LLaVA (model + processor) to ``out_dir`` and returns it."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    from catcascade.vlm_stage.families._tokenizer import prompt_corpus, train_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(prompt_corpus(labels, "USER: ", "\nASSISTANT:\n", "</s>"), SPECIAL_TOKENS)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    hf_tok.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, chat_template=CHAT_TEMPLATE,
                               patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
                                       num_hidden_layers=size.vision_layers, num_attention_heads=2,
                                       image_size=IMAGE_SIZE, patch_size=14, projection_dim=size.vision_hidden),
        text_config=LlamaConfig(vocab_size=len(hf_tok), hidden_size=size.hidden, intermediate_size=size.intermediate,
                                num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                num_key_value_heads=size.kv_heads, max_position_embeddings=1024,
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


LLAVA = VlmFamily(
    name="llava",
    model_types=("llava",),
    hub_pattern=r"llava",
    vision_modules=r".*vision_tower\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    build_tiny=build_tiny_llava,
)
