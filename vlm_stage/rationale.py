"""A short explanation from the VLM, asked for on request and never used for scoring.

Generated as its own chat completion after the candidates were scored (so a request without it
pays nothing, and the scores cannot depend on it), with a token cap; free text, so it is only
as good as the model (the tiny test model writes gibberish).
"""
from __future__ import annotations

from dataclasses import dataclass

from catcascade.errors import CatcascadeError

DEFAULT_MAX_TOKENS = 48
MIN_TOKENS = 8
"""End-of-sequence is held back for this many tokens (vLLM's ``min_tokens``, transformers'
``min_new_tokens``): a rationale is at least a phrase, and an untrained model that would stop at
once still says something."""


@dataclass(frozen=True)
class Rationale:
    """What the VLM said about ``label`` (the breed it favours), and what it cost."""

    text: str
    label: str
    tokens: int
    """Generated tokens (at most the cap the request ran with)."""
    model: str
    latency_ms: float = 0.0


class RationaleError(CatcascadeError, RuntimeError):
    """The VLM produced no usable explanation."""


def clean_text(text: str) -> str:
    """Whitespace collapsed to single spaces, ends stripped."""
    return " ".join((text or "").split())


def check_max_tokens(max_tokens: int) -> int:
    if not 1 <= int(max_tokens) <= 512:
        raise ValueError(f"rationale max_tokens must be in 1..512, got {max_tokens}")
    return int(max_tokens)


def min_tokens(max_tokens: int) -> int:
    return min(MIN_TOKENS, max_tokens)
