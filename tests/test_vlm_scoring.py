from __future__ import annotations

import math
import re

import pytest

from catcascade.vlm_stage.prompts import NONE_OPTION, build_multiple_choice, build_yes_no, option_letters
from catcascade.vlm_stage.scoring import (CandidateScores, ScoringError, check_constrained, first_token_ids, letter_distribution,
                               scores_from_letter_logprobs, scores_from_yes_probs)


def test_multiple_choice_prompt_lists_candidates_under_letters_with_none_last():
    p = build_multiple_choice(["Persian", "British_Shorthair", "Siamese"])
    assert p.choices == ("A", "B", "C", "D")
    assert "A. Persian" in p.after_image and "B. British Shorthair" in p.after_image
    assert f"D. {NONE_OPTION}" in p.after_image
    # Shared instructions come before the image (prefix caching); candidates after it.
    assert "Persian" not in p.before_image
    msgs = p.messages({"type": "image_url", "image_url": {"url": "x"}})
    assert [c["type"] for c in msgs[0]["content"]] == ["text", "image_url", "text"]


def test_option_letters_bounds():
    assert option_letters(3) == ["A", "B", "C"]
    with pytest.raises(ValueError):
        option_letters(21)


def test_letter_distribution_renormalises_and_merges_spaced_tokens():
    top = [("A", math.log(0.4)), (" B", math.log(0.2)), ("B", math.log(0.1)), ("zz", math.log(0.2))]
    d = letter_distribution(top, ["A", "B", "C"])
    assert d["A"] == pytest.approx(0.4 / 0.7) and d["B"] == pytest.approx(0.3 / 0.7) and d["C"] == 0.0


def test_no_option_in_logprobs_is_a_scoring_error():
    with pytest.raises(ScoringError, match="none of the options"):
        letter_distribution([("x", -0.1)], ["A", "B"])


def test_scores_from_letters_split_candidates_and_none():
    top = [("A", math.log(0.5)), ("B", math.log(0.2)), ("C", math.log(0.2)), ("D", math.log(0.1))]
    s = scores_from_letter_logprobs(top, ("x", "y", "z"), ("A", "B", "C", "D"), True, "cats")
    assert s.probabilities == pytest.approx((0.5, 0.2, 0.2)) and s.none_probability == pytest.approx(0.1)


def test_yes_no_scores_sum_to_one():
    s = scores_from_yes_probs([0.9, 0.2, 0.1], ("x", "y", "z"), "cats")
    assert sum(s.probabilities) + s.none_probability == pytest.approx(1.0)
    assert s.probabilities[0] > s.probabilities[1] > s.probabilities[2]
    assert build_yes_no("Maine_Coon").after_image.startswith("Is this cat a Maine Coon?")


def test_tokenizer_space_markers_are_stripped_but_nothing_else():
    """GPT-2 style "ĠA" and SentencePiece "▁B" are the letters A and B; "XA" is not A."""
    top = [("ĠA", math.log(0.2)), ("▁B", math.log(0.3)), (" C ", math.log(0.5)), ("XA", math.log(0.4)),
           ("ġC", math.log(0.3)), ("AĠ", math.log(0.3))]
    assert letter_distribution(top, ["A", "B", "C"]) == pytest.approx({"A": 0.2, "B": 0.3, "C": 0.5}, abs=1e-12)


def test_missing_and_impossible_logprobs_carry_no_mass():
    top = [("A", None), ("B", float("-inf")), ("C", math.log(0.5)), ("D", float("nan"))]
    assert letter_distribution(top, ["A", "B", "C", "D"]) == {"A": 0.0, "B": 0.0, "C": 1.0, "D": 0.0}


def test_a_logprob_must_be_a_number_not_above_zero():
    # a hair above 0 is float noise in a near-certain answer; clearly above is not a logprob
    assert letter_distribution([("A", 1e-3), ("B", -50.0)], ["A", "B"])["A"] == pytest.approx(1.0)
    with pytest.raises(ScoringError, match=r"^0\.0011 is not a log-probability$"):
        letter_distribution([("A", 0.0011)], ["A", "B"])
    with pytest.raises(ScoringError, match=r"^'-0\.5' is not a log-probability$"):
        letter_distribution([("A", "-0.5")], ["A", "B"])
    with pytest.raises(ScoringError, match=r"^2\.0 is not a log-probability$"):
        check_constrained([("A", 2.0)], ["A"])


def test_no_option_error_lists_the_first_ten_tokens_seen():
    top = [(f"t{i}", -1.0) for i in range(12)]
    seen = [f"t{i}" for i in range(10)]
    message = f"none of the options ['A', 'B'] among the answer's top logprobs {seen}"
    with pytest.raises(ScoringError, match=re.escape(message)):
        letter_distribution(top, ["A", "B"])


def test_constrained_answers_carry_all_the_mass_within_tolerance():
    check_constrained([("A", 0.0)], ["A", "B"], tolerance=0.0)  # exactly 1: passes even at zero tolerance
    check_constrained([("A", math.log(0.6)), (" b", math.log(0.3995))], ["A", "B"])  # 0.9995: within 1e-3
    with pytest.raises(ScoringError) as err:
        check_constrained([("A", math.log(0.6)), ("B", math.log(0.398)), ("zz", math.log(0.002))], ["A", "B"])
    assert str(err.value) == (
        "the options ['A', 'B'] carry 0.9980 of the answer's probability, not 1: the vLLM server returns "
        "unconstrained logprobs. Start it with --logprobs-mode processed_logprobs (catcascade serve-vlm does), or "
        "set the client's constraint to 'grammar'")


def test_first_token_ids_take_the_first_token_and_refuse_ambiguity():
    assert first_token_ids(("A", "B", "C"), [[11, 5], [12], [13, 99]]) == [11, 12, 13]
    with pytest.raises(ValueError, match=re.escape("option 'B' encodes to no token")):
        first_token_ids(("A", "B"), [[11], []])
    with pytest.raises(ValueError, match=re.escape(
            "options ['yes', 'yeah'] share a first token ([7, 7]); they cannot be scored by one token")):
        first_token_ids(("yes", "yeah"), [[7, 1], [7, 2]])
    with pytest.raises(ValueError):  # one encoding per option, never silently fewer
        first_token_ids(("A", "B"), [[11]])


def test_letter_scores_without_a_none_option():
    top = [("A", math.log(0.5)), ("B", math.log(0.3)), ("C", math.log(0.2))]
    s = scores_from_letter_logprobs(top, ["x", "y", "z"], ("A", "B", "C"), False, "cats")
    assert s == CandidateScores(("x", "y", "z"), pytest.approx((0.5, 0.3, 0.2), abs=1e-12), 0.0, "cats",
                                "multiple_choice")


def test_yes_no_scores_by_hand():
    s = scores_from_yes_probs([0.9, 0.2, 0.1], ["x", "y", "z"], "cats")
    none = 0.1 * 0.8 * 0.9  # no candidate is the cat
    total = 0.9 + 0.2 + 0.1 + none
    assert s == CandidateScores(("x", "y", "z"), pytest.approx((0.9 / total, 0.2 / total, 0.1 / total), abs=1e-12),
                                pytest.approx(none / total, abs=1e-12), "cats", "yes_no")
    one = scores_from_yes_probs([0.3], ["x"], "m")  # one candidate: yes and no are the whole story
    assert one.probabilities == pytest.approx((0.3,)) and one.none_probability == pytest.approx(0.7)
    assert scores_from_yes_probs([0.0, 0.0], ["x", "y"], "m").none_probability == 1.0
    certain = scores_from_yes_probs([1.0, 0.0], ["x", "y"], "m")  # the bounds themselves are valid
    assert certain.probabilities == (1.0, 0.0) and certain.none_probability == 0.0
    with pytest.raises(ValueError, match=re.escape("3 candidates but 2 yes/no answers")):
        scores_from_yes_probs([0.9, 0.2], ["x", "y", "z"], "cats")
    with pytest.raises(ScoringError, match=re.escape("yes/no probabilities must lie in [0, 1], got [-1.0, 1.0]")):
        scores_from_yes_probs([-1.0, 1.0], ["x", "y"], "cats")
    with pytest.raises(ScoringError, match="must lie in"):
        scores_from_yes_probs([0.5, 1.5], ["x", "y"], "cats")
