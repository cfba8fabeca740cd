from __future__ import annotations

import math

import pytest

from vlm_stage.prompts import NONE_OPTION, build_multiple_choice, build_yes_no, option_letters
from vlm_stage.scoring import ScoringError, letter_distribution, scores_from_letter_logprobs, scores_from_yes_probs


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
