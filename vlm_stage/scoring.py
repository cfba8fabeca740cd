"""Turns answer-token logprobs into one probability per candidate (plus "none")."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from catcascade.errors import CatcascadeError


class ScoringError(CatcascadeError, RuntimeError):
    """The model's answer carried no usable scores for the options."""


@dataclass(frozen=True)
class CandidateScores:
    """The VLM's probabilities for each candidate (CNN rank order) and for "none of these"."""

    candidates: tuple[str, ...]
    probabilities: tuple[float, ...]
    none_probability: float
    model: str
    mode: str
    latency_ms: float = 0.0
    requests: int = 1
    prompt_tokens: int = 0
    """Prompt tokens the backend processed for this image (vLLM's ``usage`` field)."""


def _normalise_token(token: str) -> str:
    return token.strip().lstrip("Ġ▁").strip()


def _probability(logprob) -> float:
    """exp(logprob); 0 for a missing or -inf logprob. Anything that is not a log-probability
    (a string, a positive number) is a ScoringError: the answer cannot be trusted."""
    if logprob is None:
        return 0.0
    if not isinstance(logprob, numbers.Real) or logprob > 1e-3:
        raise ScoringError(f"{logprob!r} is not a log-probability")
    return math.exp(logprob) if math.isfinite(logprob) else 0.0


def letter_distribution(top_logprobs: list[tuple[str, float]], letters: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Renormalises the probabilities of the allowed letters found among the top logprobs.

    Letters absent from the list get probability 0; several tokens that normalise to one
    letter (" A" and "A") are summed. Raises ScoringError when no letter is present.
    """
    allowed = {letter.lower(): letter for letter in letters}
    mass = {letter: 0.0 for letter in letters}
    for token, logprob in top_logprobs:
        key = _normalise_token(token).lower()
        if key in allowed:
            mass[allowed[key]] += _probability(logprob)
    total = sum(mass.values())
    if total <= 0.0:
        seen = [t for t, _ in top_logprobs][:10]
        raise ScoringError(f"none of the options {list(letters)} among the answer's top logprobs {seen}")
    return {k: v / total for k, v in mass.items()}


def first_token_ids(choices: tuple[str, ...] | list[str], encodings: list[list[int]]) -> list[int]:
    """The first token of each option's encoding (the token the model emits right after the
    generation prompt); options must differ in it, or one token could not tell them apart."""
    ids = []
    for choice, tokens in zip(choices, encodings, strict=True):
        if not tokens:
            raise ValueError(f"option {choice!r} encodes to no token")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"options {list(choices)} share a first token ({ids}); they cannot be scored by one token")
    return ids


def check_constrained(top_logprobs: list[tuple[str, float]], letters, tolerance: float = 1e-3) -> None:
    """Raises ScoringError unless the options carry all the probability mass, which is what a
    server that restricts the answer to the options' tokens returns."""
    wanted = {x.lower() for x in letters}
    mass = sum(_probability(lp) for t, lp in top_logprobs if _normalise_token(t).lower() in wanted)
    if abs(mass - 1.0) > tolerance:
        raise ScoringError(
            f"the options {list(letters)} carry {mass:.4f} of the answer's probability, not 1: the vLLM server "
            "returns unconstrained logprobs. Start it with --logprobs-mode processed_logprobs (catcascade serve-vlm "
            "does), or set the client's constraint to 'grammar'")


def scores_from_letter_logprobs(top_logprobs, candidates, letters, include_none: bool, model: str) -> CandidateScores:
    dist = letter_distribution(top_logprobs, letters)
    probs = tuple(dist[letter] for letter in letters[: len(candidates)])
    none = dist[letters[len(candidates)]] if include_none else 0.0
    return CandidateScores(tuple(candidates), probs, none, model, "multiple_choice")


def scores_from_yes_probs(yes_probs: list[float], candidates, model: str) -> CandidateScores:
    """Independent yes/no verdicts -> one distribution: candidate c gets P(yes_c), "none"
    gets prod(1 - P(yes_c)), then everything is renormalised."""
    if len(yes_probs) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(yes_probs)} yes/no answers")
    if not all(0.0 <= p <= 1.0 for p in yes_probs):  # then total >= 1 - max(p) + max(p) > 0
        raise ScoringError(f"yes/no probabilities must lie in [0, 1], got {list(yes_probs)}")
    none = math.prod(1.0 - p for p in yes_probs)
    total = sum(yes_probs) + none
    return CandidateScores(tuple(candidates), tuple(p / total for p in yes_probs), none / total, model, "yes_no")
