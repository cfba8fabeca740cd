"""VLM stage: a vision-language model, served by vLLM, verifies the CNN's top candidates.

Only `vllm_client.py` knows vLLM's wire format and only `vllm_server.py` starts it; prompts
and the logprob parser are shared by every backend (vLLM and in-process transformers).
"""
from catcascade.vlm_stage.prompts import NONE_OPTION, ScoringMode, build_multiple_choice, build_yes_no, option_letters
from catcascade.vlm_stage.scoring import CandidateScores, ScoringError, scores_from_letter_logprobs, scores_from_yes_probs

__all__ = [
    "NONE_OPTION", "ScoringMode", "build_multiple_choice", "build_yes_no", "option_letters",
    "CandidateScores", "ScoringError", "scores_from_letter_logprobs", "scores_from_yes_probs",
]
