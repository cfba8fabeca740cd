"""LoRA fine-tuning of a vision-language model for candidate verification (TRL + PEFT).

The adapter targets the language model's attention only by default: vLLM applies LoRA to the
language model of a VLM and drops vision-tower adapters, so what is trained is what is served.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
LANGUAGE_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass
class VlmTrainConfig:
    base_model: str
    """Hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a local folder."""
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = LANGUAGE_ATTENTION
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    lr: float = 2e-3
    max_length: int = 512
    gradient_checkpointing: bool = False
    qlora: bool = False
    bf16: bool | None = None
    """None: bf16 on CUDA, fp32 on CPU."""
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError(f"rank and alpha must be positive, got {self.rank}, {self.alpha}")


def _messages(example) -> list[dict]:
    p = example.prompt()
    return [
        {"role": "user", "content": [{"type": "text", "text": p.before_image}, {"type": "image"},
                                     {"type": "text", "text": p.after_image}]},
        {"role": "assistant", "content": [{"type": "text", "text": example.answer}]},
    ]


def load_base_model(cfg: VlmTrainConfig):
    """Loads the VLM and its processor; QLoRA (4-bit NF4) only on CUDA, with a clear error otherwise."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cuda = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if (cfg.bf16 if cfg.bf16 is not None else cuda) else torch.float32}
    if cfg.qlora:
        if not cuda:
            raise RuntimeError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); train with qlora=False on CPU")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as e:  # pragma: no cover
            raise ImportError("QLoRA needs bitsandbytes: `make setup` installs it") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(cfg.base_model, **kwargs)
    processor = AutoProcessor.from_pretrained(cfg.base_model)
    return model, processor


def train_lora(cfg: VlmTrainConfig, examples, out_dir: str | Path, work_dir: str | Path | None = None) -> dict:
    """Trains a LoRA adapter on verification examples and saves it (PEFT format) to ``out_dir``.

    Returns a summary with the logged training losses.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    model, processor = load_base_model(cfg)
    rows = [{"images": [Image.open(e.image_path).convert("RGB")], "messages": _messages(e)} for e in examples]
    if not rows:
        raise ValueError("no training examples")
    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda
    args = SFTConfig(
        output_dir=str(work_dir or Path(out_dir).parent / "sft-work"), per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.lr, logging_steps=1,
        save_strategy="no", report_to=[], max_length=cfg.max_length, use_cpu=not cuda, bf16=bf16,
        gradient_checkpointing=cfg.gradient_checkpointing, dataloader_num_workers=0, seed=cfg.seed,
        disable_tqdm=False, **cfg.extra,
    )
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         peft_config=peft_cfg)
    trainer.train()
    trainer.model.save_pretrained(str(out_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "steps": trainer.state.global_step, "examples": len(rows)}
