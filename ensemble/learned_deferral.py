"""Learned deferral: predict, from the CNN's outputs alone, what asking the VLM would gain.

Confidence deferral (escalate when top-1, margin or entropy is low) is the best rule only when
the second model is uniformly better than the first; when it is a specialist (good on some
breeds only), or some labels are noise, a small post-hoc model of the *gain* of deferring does
better, most of all at low budgets (Jitkrittum et al., NeurIPS 2023, "When does confidence-based
cascade deferral suffice?"; FrugalGPT, Chen et al. 2023, learns its scorer the same way).

Target, per held-out image where both stages ran: +1 when the escalated (blended) answer is
right and the CNN's is wrong, -1 for the reverse, 0 otherwise. Features: the CNN's sorted top-k
probabilities, margin, entropy confidence, the predicted class (one-hot), the predicted class
times the CNN's doubt (1 - p1), and each class's probability where it is among the top-k (the
candidates the VLM would see; 0 elsewhere). The last two let the rule learn which breeds the VLM
rescues: a VLM that knows some breeds only helps when one of those is among the candidates, which
no confidence score can see. A multinomial logistic
regression (scikit-learn) predicts P(gain = g); the predicted gain is its expectation. Samples
are weighted by 1 / support of their class (``class_balanced``), so the rule maximises the gain
in balanced accuracy, the benchmark's headline metric. Fitted state is plain numbers
(``LearnedDeferralParams``), saved as JSON in the cascade settings.
"""
from __future__ import annotations

import warnings

import numpy as np

from catcascade.ensemble.config import LearnedDeferralParams
from catcascade.ensemble.confidence import confidence_from_sorted, sorted_probs


def feature_names(num_classes: int, top_k: int = 3) -> list[str]:
    k = min(top_k, num_classes)
    return ([f"p{r + 1}" for r in range(k)] + ["margin", "entropy_conf"]
            + [f"pred_{c}" for c in range(num_classes)] + [f"pred_{c}_x_doubt" for c in range(num_classes)]
            + [f"candidate_p_{c}" for c in range(num_classes)])


def deferral_features(cnn_probs: np.ndarray, top_k: int = 3) -> np.ndarray:
    """(N, C) calibrated CNN probabilities -> (N, F) features in ``feature_names(C, top_k)`` order."""
    p = np.atleast_2d(np.asarray(cnn_probs, dtype=np.float64))
    n, c = p.shape
    s = sorted_probs(p)
    onehot = np.zeros((n, c))
    onehot[np.arange(n), p.argmax(axis=1)] = 1.0
    doubt = 1.0 - s[:, :1]
    top = np.argsort(-p, axis=1, kind="stable")[:, : min(top_k, c)]  # the CNN's ranking, as serving's top_k
    candidate_p = np.zeros((n, c))
    np.put_along_axis(candidate_p, top, np.take_along_axis(p, top, axis=1), axis=1)
    cols = [s[:, : min(top_k, c)], confidence_from_sorted(s, "margin")[:, None],
            confidence_from_sorted(s, "entropy")[:, None], onehot, onehot * doubt, candidate_p]
    return np.concatenate(cols, axis=1)


def escalation_gain(cnn_probs: np.ndarray, escalated_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image: +1 where escalating turns a wrong answer right, -1 for the reverse, else 0."""
    cnn_ok = np.asarray(cnn_probs).argmax(axis=1) == y
    esc_ok = np.asarray(escalated_probs).argmax(axis=1) == y
    return esc_ok.astype(np.int64) - cnn_ok.astype(np.int64)


class LearnedDeferral:
    """``fit(cnn_probs, escalated_probs, y) -> self``; ``predict_gain`` / ``confidence`` after."""

    def __init__(self, C: float = 1.0, top_k: int = 3, class_balanced: bool = True,
                 params: LearnedDeferralParams | None = None):
        self.C = C
        self.top_k = top_k
        self.class_balanced = class_balanced
        self.params_ = params

    def _check_fitted(self) -> LearnedDeferralParams:
        if self.params_ is None:
            raise RuntimeError("LearnedDeferral is not fitted: call fit() or load fitted parameters")
        return self.params_

    def fit(self, cnn_probs: np.ndarray, escalated_probs: np.ndarray, y: np.ndarray) -> "LearnedDeferral":
        """Learns the gain model on held-out images where both stages ran (rows whose escalated
        answer is the CNN's own, e.g. failed VLM calls, should be left out by the caller)."""
        from sklearn.linear_model import LogisticRegression

        p = np.atleast_2d(np.asarray(cnn_probs, dtype=np.float64))
        e = np.asarray(escalated_probs, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if e.shape != p.shape or len(y) != len(p):
            raise ValueError(f"cnn_probs {p.shape}, escalated_probs {e.shape} and {len(y)} labels do not match")
        if len(y) < 10:
            raise ValueError(f"learned deferral needs held-out images where both stages ran; got {len(y)}")
        n, c = p.shape
        x = deferral_features(p, self.top_k)
        gain = escalation_gain(p, e, y)
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-9] = 1.0
        xs = (x - mean) / scale
        weight = np.ones(n)
        if self.class_balanced:
            support = np.bincount(y, minlength=c).astype(np.float64)
            weight = 1.0 / support[y]
            weight *= n / weight.sum()
        values = np.unique(gain)
        names = feature_names(c, self.top_k)
        summary = {"n": int(n), "gain_counts": {int(v): int((gain == v).sum()) for v in (-1, 0, 1)},
                   "class_balanced": self.class_balanced, "C": self.C}
        if len(values) == 1:  # escalating never changes an answer here: a constant prediction
            coef, intercept = [[0.0] * len(names)], [0.0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter on separable folds
                lr = LogisticRegression(C=self.C, max_iter=2000).fit(xs, gain, sample_weight=weight)
            values = lr.classes_
            if len(values) == 2:  # sklearn keeps one row for two classes: log-odds of the second
                coef = [[0.0] * len(names), lr.coef_[0].tolist()]
                intercept = [0.0, float(lr.intercept_[0])]
            else:
                coef, intercept = lr.coef_.tolist(), lr.intercept_.tolist()
        self.params_ = LearnedDeferralParams(
            num_classes=c, top_k=self.top_k, features=names, mean=mean.tolist(), scale=scale.tolist(),
            gains=[float(v) for v in values], coef=coef, intercept=[float(b) for b in intercept], fit_summary=summary)
        return self

    def predict_gain(self, cnn_probs: np.ndarray) -> np.ndarray:
        """(N, C) -> (N,) expected gain of escalating, in [-1, 1]."""
        return predicted_gain(self._check_fitted(), cnn_probs)

    def confidence(self, cnn_probs: np.ndarray) -> np.ndarray:
        """(1 - predicted gain) / 2 in [0, 1]: low means "ask the VLM", as for the other scores."""
        return (1.0 - self.predict_gain(cnn_probs)) / 2.0


def predicted_gain(params: LearnedDeferralParams, cnn_probs: np.ndarray) -> np.ndarray:
    """The fitted rule applied to (N, C) probabilities (what serving runs per request)."""
    p = np.atleast_2d(np.asarray(cnn_probs, dtype=np.float64))
    if p.shape[1] != params.num_classes:
        raise ValueError(f"the learned deferral rule was fitted for {params.num_classes} classes, "
                         f"the CNN gives {p.shape[1]}")
    x = (deferral_features(p, params.top_k) - np.asarray(params.mean)) / np.asarray(params.scale)
    z = x @ np.asarray(params.coef).T + np.asarray(params.intercept)
    z -= z.max(axis=1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    return np.clip(prob @ np.asarray(params.gains), -1.0, 1.0)
