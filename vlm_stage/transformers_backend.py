"""The in-process transformers backend, for machines without a vLLM server (and for training).

Same prompts (prompts.py), same parser (scoring.py) and the same ``async verify(image,
candidates) -> CandidateScores`` as VllmVerifier, so serving and evaluation can use either.
The answer is one token: its logits are restricted to the options' tokens (the letters, or
yes/no) before the softmax, which is what VllmVerifier asks vLLM for (``allowed_token_ids``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Mapping

from PIL import Image

from catcascade.vlm_stage.prompts import Prompt, ScoringMode, build_multiple_choice, build_rationale, build_yes_no
from catcascade.vlm_stage.rationale import (DEFAULT_MAX_TOKENS, Rationale, RationaleError, check_max_tokens, clean_text,
                                 min_tokens)
from catcascade.vlm_stage.scoring import CandidateScores, first_token_ids, letter_distribution, scores_from_letter_logprobs, scores_from_yes_probs

log = logging.getLogger(__name__)


@dataclass
class TransformersBackendConfig:
    model: str
    """Local folder or hub id of the base VLM."""
    adapter: str | None = None
    """PEFT LoRA adapter folder applied on top of the base model (None: the base model)."""
    name: str = ""
    """Name reported in CandidateScores.model (default: the adapter's or the model's path)."""
    scoring_mode: ScoringMode = ScoringMode.MULTIPLE_CHOICE
    include_none: bool = True
    max_image_side: int = 448
    device: str | None = None
    """None: CUDA when present, else CPU."""
    dtype: str = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16 / float16."""

    def __post_init__(self) -> None:
        self.scoring_mode = ScoringMode(self.scoring_mode)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        self.name = self.name or self.adapter or self.model


def option_token_ids(tokenizer, choices: tuple[str, ...] | list[str]) -> list[int]:
    """The first token of each option as the model would emit it right after the generation prompt."""
    return first_token_ids(choices, [tokenizer.encode(c, add_special_tokens=False) for c in choices])


class TransformersVerifier:
    """Scores candidates with a Hugging Face VLM (optionally + a PEFT adapter) in this process.

    One forward pass per prompt, serialised by a lock: this is the baseline a vLLM server is
    measured against, and the fallback where none runs.
    """

    def __init__(self, config: TransformersBackendConfig, model=None, processor=None):
        """``model``/``processor`` may be passed already loaded (training evaluates the model it
        is training); otherwise they are loaded from ``config``."""
        self.config = config
        if model is None or processor is None:
            model, processor = load_model(config)
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._lock = threading.Lock()
        self._token_ids: dict[tuple[str, ...], list[int]] = {}
        self.requests_sent = 0
        self.prompt_tokens = 0

    @property
    def model_name(self) -> str:
        return self.config.name

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _ids_for(self, choices: tuple[str, ...]) -> list[int]:
        if choices not in self._token_ids:
            self._token_ids[choices] = option_token_ids(self.tokenizer, choices)
        return self._token_ids[choices]

    def answer_logprobs(self, prompt: Prompt, image: Image.Image) -> list[tuple[str, float]]:
        """(option, logprob) of the first answer token, renormalised over the options only:
        the same list shape vLLM's top_logprobs gives to scoring.py."""
        return self.answer_logprobs_batch([prompt], [image])[0]

    def answer_logprobs_batch(self, prompts: list[Prompt], images: list[Image.Image]) -> list[list[tuple[str, float]]]:
        """``answer_logprobs`` for several (prompt, image) pairs in one left-padded forward pass."""
        return self._forward(prompts, images)[0]

    def _forward(self, prompts: list[Prompt], images: list[Image.Image]) -> tuple[list[list[tuple[str, float]]], int]:
        """Option logprobs per prompt, and the number of prompt tokens processed."""
        import torch

        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        side = self.config.max_image_side
        images = [img.convert("RGB") if max(img.size) <= side else _bounded(img, side) for img in images]
        texts = [self.processor.apply_chat_template(p.messages({"type": "image"}), add_generation_prompt=True,
                                                    tokenize=False) for p in prompts]
        # One list of images per prompt: Gemma 3's and Llama 3.2 Vision's processors need the nesting
        # to pair images with prompts in a batch; the other families' give the same tensors either way.
        inputs = self.processor(images=[[img] for img in images], text=texts, return_tensors="pt", padding=True,
                                padding_side="left", add_special_tokens=False)
        ids = [self._ids_for(p.choices) for p in prompts]
        with self._lock, torch.inference_mode():
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            logits = self.model(**inputs).logits[:, -1].float()
        n_tokens = int(inputs["attention_mask"].sum())
        self.requests_sent += len(prompts)
        self.prompt_tokens += n_tokens
        out = []
        for row, option_ids, prompt in zip(logits, ids, prompts):
            restricted = torch.log_softmax(row[option_ids], dim=-1)
            out.append([(choice, float(lp)) for choice, lp in zip(prompt.choices, restricted)])
        return out, n_tokens

    def score(self, image: Image.Image, candidates: list[str] | tuple[str, ...]) -> CandidateScores:
        """Synchronous scoring; ``verify`` runs this in a worker thread."""
        t0 = time.perf_counter()
        name = self.config.name
        if self.config.scoring_mode == ScoringMode.MULTIPLE_CHOICE:
            prompt = build_multiple_choice(candidates, self.config.include_none)
            (top,), n_tokens = self._forward([prompt], [image])
            scores = scores_from_letter_logprobs(top, candidates, prompt.choices, self.config.include_none, name)
            n_requests = 1
        else:  # one prompt per candidate, as vLLM receives them (not batched: the same work per request)
            prompts = [build_yes_no(c) for c in candidates]
            yes, n_tokens = [], 0
            for p in prompts:
                (top,), n = self._forward([p], [image])
                yes.append(letter_distribution(top, p.choices)[p.choices[0]])
                n_tokens += n
            scores = scores_from_yes_probs(yes, candidates, name)
            n_requests = len(prompts)
        return CandidateScores(scores.candidates, scores.probabilities, scores.none_probability, name, scores.mode,
                               (time.perf_counter() - t0) * 1000.0, n_requests, n_tokens)

    async def verify(self, image: Image.Image, candidates: list[str] | tuple[str, ...], *,
                     priority: int = 0, headers: Mapping[str, str] | None = None) -> CandidateScores:
        """Probabilities for each candidate (in the given order) and for "none of these".
        ``priority`` and ``headers`` are accepted for interface parity with vLLM and ignored
        (one model in-process, no HTTP call to trace)."""
        return await asyncio.to_thread(self.score, image, candidates)

    def rationale(self, image: Image.Image, breed: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> Rationale:
        """Synchronous ``explain``: greedy generation of at most ``max_tokens`` new tokens."""
        import torch

        t0 = time.perf_counter()
        max_tokens = check_max_tokens(max_tokens)
        side = self.config.max_image_side
        img = image.convert("RGB") if max(image.size) <= side else _bounded(image, side)
        text = self.processor.apply_chat_template(build_rationale(breed).messages({"type": "image"}),
                                                  add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=[[img]], text=[text], return_tensors="pt", add_special_tokens=False)
        with self._lock, torch.inference_mode():
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                      min_new_tokens=min_tokens(max_tokens),
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        self.requests_sent += 1
        self.prompt_tokens += int(inputs["attention_mask"].sum())
        answer = clean_text(self.tokenizer.decode(new, skip_special_tokens=True))
        if not answer:
            raise RationaleError("the VLM generated no text for the rationale")
        return Rationale(answer, breed, int(len(new)), self.config.name, (time.perf_counter() - t0) * 1000.0)

    async def explain(self, image: Image.Image, breed: str, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                      priority: int = 0, headers: Mapping[str, str] | None = None) -> Rationale:
        """A sentence or two on why the photo suggests ``breed`` (see ``rationale``); ``priority``
        and ``headers`` as for ``verify``."""
        return await asyncio.to_thread(self.rationale, image, breed, max_tokens)

    async def warm_up(self, candidates: tuple[str, ...]) -> None:
        await self.verify(Image.new("RGB", (64, 64), (128, 128, 128)), candidates)

    async def aclose(self) -> None:
        """Nothing to release (the model is freed with the object); kept for interface parity."""


def _bounded(img: Image.Image, side: int) -> Image.Image:
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    return img


def load_model(config: TransformersBackendConfig):
    """Loads the base VLM, its processor and (if configured) the PEFT adapter, in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText

    from catcascade.vlm_stage.families import family_for

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}[config.dtype]
    model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype)
    if config.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.adapter)
    model.to(device).eval()
    processor = family_for(config.model).load_processor(config.model)  # the family's image bounds
    return model, processor
