"""LoRA fine-tuning of a vision-language model for candidate verification (TRL + PEFT).

The adapter targets the language model's attention by default: vLLM applies LoRA to the
language model of a VLM and drops vision-tower adapters, so what is trained is what is served.
The loss covers the answer only: rows are TRL prompt/completion pairs (the prompt rendered
with the generation prompt, exactly as vLLM renders it; the completion is the answer letter),
which works with any model's chat template.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from catcascade.vlm_stage import families

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
TARGET_PARTS = families.TARGET_PARTS


def target_modules_regex(parts: tuple[str, ...] | list[str], base_model: str | None = None) -> str:
    """A PEFT ``target_modules`` regex for the named parts (attention, mlp: language model;
    vision: the tower of ``base_model``'s family, any family's when None)."""
    family = families.family_for(base_model) if base_model else families.GENERIC
    return family.target_modules(parts)


@dataclass
class VlmTrainConfig:
    base_model: str = DEFAULT_BASE_MODEL
    """Hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a local folder."""
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target: tuple[str, ...] = ("attention",)
    """Parts to adapt: attention and/or mlp of the language model; vision (not served by vLLM)."""
    target_modules: str | None = None
    """A PEFT regex overriding ``target``."""
    answer_only_loss: bool = True
    """Loss on the assistant's answer tokens only (prompt/completion rows); False: whole sequence."""
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    lr: float = 2e-4
    max_length: int = 1024
    gradient_checkpointing: bool = False
    qlora: bool = False
    bf16: bool | None = None
    """None: bf16 on CUDA, fp32 on CPU."""
    seed: int = 0
    extra: dict = field(default_factory=dict)
    """Further SFTConfig fields."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError(f"rank and alpha must be positive, got {self.rank}, {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"batch_size and lr must be positive, got {self.batch_size}, {self.lr}")
        self.target = tuple(self.target)
        if self.target_modules is None:
            target_modules_regex(self.target, self.base_model)  # validates the names
        if "vision" in self.target or (self.target_modules and "vision" in self.target_modules):
            log.warning("LoRA on the vision tower: vLLM serves LoRA on the language model only and drops (or "
                        "rejects) vision-tower adapter weights, so the served model will differ from the trained one")

    @property
    def target_regex(self) -> str:
        return self.target_modules or target_modules_regex(self.target, self.base_model)


def _conversation(example):
    """Accepts VerificationExample or Conversation."""
    return example.to_conversation() if hasattr(example, "to_conversation") else example


def _row(conv, answer_only: bool) -> dict:
    from PIL import Image

    msgs = conv.messages()
    row = {"images": [Image.open(conv.image_path).convert("RGB")]}
    if answer_only:
        row.update(prompt=msgs[:1], completion=msgs[1:])
    else:
        row["messages"] = msgs
    return row


@dataclass(frozen=True)
class LoadPlan:
    """How the base model is loaded for training: the weights' dtype, and 4-bit quantisation."""

    dtype: str
    """bfloat16 | float16 | float32: the unquantised weights, and QLoRA's compute dtype."""
    qlora: bool
    bf16_training: bool
    """SFTConfig(bf16=...): autocast to bf16 in the trainer."""

    def quantization(self) -> dict | None:
        """BitsAndBytesConfig fields for QLoRA (NF4, double quantisation), or None."""
        if not self.qlora:
            return None
        return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": self.dtype}


def load_plan(qlora: bool, bf16: bool | None, cuda: bool, bf16_supported: bool) -> LoadPlan:
    """The loading choices for a device (pure: the caller probes CUDA and bf16 support).

    bf16 None means bf16 on a GPU that has it (fp16 compute for QLoRA on older GPUs, fp32
    weights otherwise) and fp32 on a CPU. QLoRA needs CUDA: bitsandbytes' 4-bit kernels.
    """
    if qlora and not cuda:
        raise RuntimeError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); train with qlora=False on CPU")
    use_bf16 = (cuda and bf16_supported) if bf16 is None else bf16
    if use_bf16 and cuda and not bf16_supported:
        raise RuntimeError("bf16 requested but this GPU has no bf16 support; pass --no-bf16")
    if use_bf16:
        dtype = "bfloat16"
    else:
        dtype = "float16" if qlora else "float32"
    return LoadPlan(dtype=dtype, qlora=qlora, bf16_training=use_bf16)


def load_base_model(cfg: VlmTrainConfig):
    """Loads the VLM and its processor (the family's image bounds) as ``load_plan`` says."""
    import torch
    from transformers import AutoModelForImageTextToText

    cuda = torch.cuda.is_available()
    plan = load_plan(cfg.qlora, cfg.bf16, cuda, cuda and torch.cuda.is_bf16_supported())
    kwargs = {"dtype": getattr(torch, plan.dtype)}
    if plan.qlora:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:  # pragma: no cover
            raise ImportError("QLoRA needs bitsandbytes: `pip install bitsandbytes` (or `make setup`)") from e
        q = plan.quantization()
        kwargs["quantization_config"] = BitsAndBytesConfig(**{**q, "bnb_4bit_compute_dtype": getattr(torch, plan.dtype)})
    model = AutoModelForImageTextToText.from_pretrained(cfg.base_model, **kwargs)
    processor = families.family_for(cfg.base_model).load_processor(cfg.base_model)
    return model, processor


def answer_loss_rows(cfg: VlmTrainConfig, processor) -> tuple[bool, bool]:
    """(prompt/completion rows, assistant-marked loss): how the answer-only loss is obtained for
    the base model's family (``VlmFamily.answer_loss``); (False, False) for whole-sequence loss."""
    if not cfg.answer_only_loss:
        return False, False
    if families.family_for(cfg.base_model).answer_loss != "generation_markers":
        return True, False
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None) or ""
    if "generation" not in template:
        raise ValueError(f"{cfg.base_model}: the answer-only loss of this family needs a chat template that marks the "
                         "assistant turn with {% generation %} ... {% endgeneration %}; add the markers to the "
                         "model's template, or train with full-sequence loss")
    return False, True


def verification_accuracy(model, processor, conversations, progress: bool = False, batch_size: int = 16) -> dict:
    """Share of multiple-choice conversations whose most likely option (first answer token,
    restricted to the option letters: the served scoring) is the right one."""
    from tqdm import tqdm

    from catcascade.vlm_stage.transformers_backend import TransformersBackendConfig, TransformersVerifier
    from PIL import Image

    scorable = [c for c in map(_conversation, conversations) if c.prompt.choices and c.answer in c.prompt.choices]
    if not scorable:
        return {"accuracy": None, "n": 0}
    was_training = model.training
    model.eval()
    verifier = TransformersVerifier(TransformersBackendConfig(model="(in memory)"), model=model, processor=processor)
    right = 0
    for i in tqdm(range(0, len(scorable), batch_size), desc="evaluating", disable=not progress, unit="batch"):
        part = scorable[i:i + batch_size]
        images = []
        for conv in part:
            with Image.open(conv.image_path) as img:
                images.append(img.convert("RGB"))
        answers = verifier.answer_logprobs_batch([c.prompt for c in part], images)
        right += sum(max(top, key=lambda t: t[1])[0] == c.answer for top, c in zip(answers, part))
    model.train(was_training)
    return {"accuracy": right / len(scorable), "n": len(scorable)}


def train_lora(cfg: VlmTrainConfig, examples, out_dir: str | Path, work_dir: str | Path | None = None,
               eval_examples=None, progress: bool = True) -> dict:
    """Trains a LoRA adapter on verification examples and saves it (PEFT format) to ``out_dir``.

    ``examples`` are VerificationExample or Conversation objects. With ``eval_examples`` the
    held-out verification accuracy is measured before and after training. Returns a summary
    (logged losses, steps, accuracies), also written to ``out_dir/train_summary.json`` beside
    the resolved config (``train_config.json``).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    convs = [_conversation(e) for e in examples]
    if not convs:
        raise ValueError("no training examples")
    model, processor = load_base_model(cfg)
    summary: dict = {}
    if eval_examples:
        summary["accuracy_before"] = verification_accuracy(model, processor, eval_examples, progress)
    split, marked = answer_loss_rows(cfg, processor)
    rows = [_row(c, split) for c in convs]
    cuda = torch.cuda.is_available()
    bf16 = load_plan(cfg.qlora, cfg.bf16, cuda, cuda and torch.cuda.is_bf16_supported()).bf16_training
    extra = dict(cfg.extra)
    if cfg.gradient_checkpointing:
        extra.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    args = SFTConfig(
        output_dir=str(work_dir or Path(out_dir).parent / "sft-work"), per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.lr, logging_steps=1,
        save_strategy="no", report_to=[], max_length=cfg.max_length, use_cpu=not cuda, bf16=bf16,
        gradient_checkpointing=cfg.gradient_checkpointing, dataloader_num_workers=0, seed=cfg.seed,
        completion_only_loss=True if split else None, assistant_only_loss=marked, disable_tqdm=not progress, **extra,
    )
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_regex)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         peft_config=peft_cfg)
    trainer.train()
    out = Path(out_dir)
    trainer.model.save_pretrained(str(out))
    summary.update(losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                   steps=trainer.state.global_step, examples=len(rows),
                   trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    if eval_examples:
        summary["accuracy_after"] = verification_accuracy(trainer.model, processor, eval_examples, progress)
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "target_modules": cfg.target_regex}, indent=1))
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
