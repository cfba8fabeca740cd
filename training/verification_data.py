"""Verification examples for the VLM: an image, the CNN-style candidate list, the right letter.

Candidates are the true breed plus hard negatives (the CNN's confusions when given, else
random other breeds), shuffled per example to avoid position bias; sometimes the true breed
is left out and the answer is "None of these".
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from vlm_stage.prompts import Prompt, build_multiple_choice


@dataclass(frozen=True)
class VerificationExample:
    image_path: str
    label: str
    candidates: tuple[str, ...]
    answer: str
    """The letter of the right option (the "none" letter when the label is not a candidate)."""

    def prompt(self, include_none: bool = True) -> Prompt:
        return build_multiple_choice(self.candidates, include_none)


def make_example(image_path: str, label: str, all_labels: list[str], rng: random.Random, k: int = 3,
                 confusions: list[str] | None = None, p_none: float = 0.1) -> VerificationExample:
    others = [c for c in (confusions or []) if c != label]
    pool = [c for c in all_labels if c != label and c not in others]
    rng.shuffle(pool)
    negatives = (others + pool)[: k]
    include_true = rng.random() >= p_none
    cands = ([label] + negatives[: k - 1]) if include_true else negatives[:k]
    rng.shuffle(cands)
    letters = build_multiple_choice(cands).choices
    answer = letters[cands.index(label)] if include_true else letters[-1]
    return VerificationExample(image_path, label, tuple(cands), answer)
