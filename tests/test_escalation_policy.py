"""The escalation policy's decisions and their details: conformal singletons, the learned
deferral rule (on hand-set parameters whose predicted gain is known), vectorised masks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from catcascade.ensemble.config import EscalationConfig, LearnedDeferralParams
from catcascade.ensemble.escalation_policy import (EscalationDecision, EscalationMode, EscalationPolicy, EscalationReason,
                                        confidence_score, confidence_scores)
from catcascade.ensemble.learned_deferral import feature_names

P = np.array([0.5, 0.3, 0.2])


def test_a_singleton_set_is_confident_whatever_the_score():
    policy = EscalationPolicy(EscalationConfig(threshold=0.6))
    assert policy.decide(P, set_size=1) == EscalationDecision(
        False, EscalationReason.CONFIDENT, 0.5,
        "the conformal candidate set holds one breed; top1 confidence 0.500 < 0.600")
    assert policy.decide(P, set_size=2).reason == EscalationReason.LOW_CONFIDENCE
    assert policy.decide(P, set_size=1, skip_singletons=False).escalate
    assert policy.decide(P, set_size=None).escalate
    assert policy.decide(P, EscalationMode.ALWAYS, set_size=1).escalate  # the client's word wins
    sure = policy.decide(np.array([0.7, 0.2, 0.1]), set_size=1)  # confident anyway: the plain detail
    assert sure.detail == "top1 confidence 0.700 >= 0.600"
    at = EscalationPolicy(EscalationConfig(threshold=0.5)).decide(P, set_size=1)
    assert at.detail == "top1 confidence 0.500 >= 0.500"
    assert policy.escalate_mask(np.array([P, P, P]), set_sizes=np.array([1, 2, 3])).tolist() == [False, True, True]
    assert policy.escalate_mask(np.array([P, P]), set_sizes=np.array([1, 2]), skip_singletons=False).tolist() == [
        True, True]


def _learned(gain_logits=(0.0, 0.0, math.log(3.0)), num_classes=3) -> LearnedDeferralParams:
    """Zero coefficients: the predicted gain is the same for every image, softmax(b) . gains;
    with b = (0, 0, log 3) and gains (-1, 0, +1) that is (-1 + 3) / 5 = +0.4."""
    names = feature_names(num_classes)
    return LearnedDeferralParams(num_classes=num_classes, features=names, mean=[0.0] * len(names),
                                 scale=[1.0] * len(names), gains=[-1.0, 0.0, 1.0],
                                 coef=[[0.0] * len(names) for _ in range(3)], intercept=list(gain_logits))


def test_learned_rule_scores_are_one_minus_the_gain_over_two():
    learned = _learned()
    assert confidence_scores(np.array([P, P[::-1]]), "learned", learned) == pytest.approx([0.3, 0.3], abs=1e-12)
    assert confidence_score(P, "learned", learned) == pytest.approx(0.3, abs=1e-12)
    with pytest.raises(ValueError, match=r"^metric 'learned' needs the fitted learned deferral rule$"):
        confidence_scores(np.array([P]), "learned")


def test_learned_rule_decisions_are_said_in_gains():
    policy = EscalationPolicy(EscalationConfig(metric="learned", threshold=0.5, learned=_learned()))
    assert policy.scores(np.array([P])) == pytest.approx([0.3], abs=1e-12)
    assert policy.decide(P) == EscalationDecision(
        True, EscalationReason.LOW_CONFIDENCE, pytest.approx(0.3, abs=1e-12),
        "learned deferral: predicted gain of asking the VLM +0.400 > +0.000")
    low_gain = EscalationPolicy(EscalationConfig(metric="learned", threshold=0.25, learned=_learned()))
    assert low_gain.decide(P).detail == "learned deferral: predicted gain of asking the VLM +0.400 <= +0.500"
    assert not low_gain.decide(P).escalate
    singleton = policy.decide(P, set_size=1)
    assert singleton.detail == ("the conformal candidate set holds one breed; learned deferral: predicted gain of "
                                "asking the VLM +0.400 > +0.000")
