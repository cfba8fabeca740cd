"""Prompt templates for verifying the CNN's candidates, shared by training and serving.

Fixed instructions come first, then the image, then the per-image candidate list, so that
escalated requests share the instruction prefix in vLLM's prefix cache.
"""
from __future__ import annotations

import enum
import string
from dataclasses import dataclass


class ScoringMode(str, enum.Enum):
    MULTIPLE_CHOICE = "multiple_choice"
    YES_NO = "yes_no"


MC_INSTRUCTIONS = (
    "You are an expert in cat breeds. Look at the photo and pick the breed of the cat "
    "from the options below."
)
MC_QUESTION = "Options:\n{options}\nAnswer with the letter only."
YES_NO_INSTRUCTIONS = "You are an expert in cat breeds. Look at the photo of a cat."
YES_NO_QUESTION = "Is this cat a {breed}? Answer yes or no."
RATIONALE_INSTRUCTIONS = "You are an expert in cat breeds. Look at the photo of a cat."
RATIONALE_QUESTION = ("In one or two short sentences, say what in the photo suggests that this cat is a {breed} "
                      "(coat, colour, face, ears, build).")
NONE_OPTION = "None of these"
YES, NO = "yes", "no"


def option_letters(n: int) -> list[str]:
    if not 1 <= n <= 20:  # vLLM returns at most 20 top logprobs by default
        raise ValueError(f"between 1 and 20 options are supported, got {n}")
    return list(string.ascii_uppercase[:n])


@dataclass(frozen=True)
class Prompt:
    """One chat turn: text before the image, text after it, and the allowed answers."""

    before_image: str
    after_image: str
    choices: tuple[str, ...]

    def messages(self, image_part: dict) -> list[dict]:
        """OpenAI-style chat messages with ``image_part`` placed between the two texts."""
        return [{"role": "user", "content": [
            {"type": "text", "text": self.before_image},
            image_part,
            {"type": "text", "text": self.after_image},
        ]}]


def display_name(label: str) -> str:
    """Dataset labels use Oxford's spelling (``British_Shorthair``); prompts use plain words."""
    return label.replace("_", " ")


def build_multiple_choice(candidates: list[str] | tuple[str, ...], include_none: bool = True) -> Prompt:
    options = [display_name(c) for c in candidates] + ([NONE_OPTION] if include_none else [])
    letters = option_letters(len(options))
    listing = "\n".join(f"{letter}. {name}" for letter, name in zip(letters, options))
    return Prompt(MC_INSTRUCTIONS, MC_QUESTION.format(options=listing), tuple(letters))


def build_rationale(breed: str) -> Prompt:
    """A free-text question (no constrained answer): why the photo suggests ``breed``."""
    return Prompt(RATIONALE_INSTRUCTIONS, RATIONALE_QUESTION.format(breed=display_name(breed)), ())


def build_yes_no(breed: str) -> Prompt:
    return Prompt(YES_NO_INSTRUCTIONS, YES_NO_QUESTION.format(breed=display_name(breed)), (YES, NO))
