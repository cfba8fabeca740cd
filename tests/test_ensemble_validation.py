"""What the ensemble layer refuses, and the message it refuses with: score files, bundle
manifests, fitted-parameter shapes, policy fitting and offline-evaluation settings."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from catcascade.ensemble.score_files import ScoreFileError, ScoreSet


def _scores(**kw) -> ScoreSet:
    base = dict(ids=["a", "b"], labels=[0, 1], label_names=["x", "y", "z"], cnn_logits=np.zeros((2, 3)))
    return ScoreSet(**{**base, **kw})


@pytest.mark.parametrize("kw,message", [
    ({"ids": ["a"]}, "ids has shape (1,), expected (2,)"),
    ({"labels": [0, 3]}, "labels must lie in 0..2"),
    ({"vlm_candidates": np.zeros(2)}, "vlm_candidates has shape (2,), expected (2, k)"),
    ({"vlm_candidates": np.zeros((2, 3)), "vlm_scores": np.zeros((2, 2))},
     "vlm_scores has shape (2, 2), expected (2, 3)"),
    ({"vlm_candidates": np.full((2, 3), 3), "vlm_scores": np.zeros((2, 3))}, "vlm_candidates holds a class index >= 3"),
    ({"vlm_none": np.zeros(3)}, "vlm_none has shape (3,), expected (2,)"),
    ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
])
def test_score_set_validation_names_each_problem(kw, message):
    with pytest.raises(ScoreFileError, match="^invalid score set: .*" + re.escape(message)):
        _scores(**kw)


def test_score_file_of_another_format_and_empty_joins_are_refused(tmp_path):
    path = _scores().save(tmp_path / "s.npz")
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"]))
    data["meta"] = np.array(json.dumps({**meta, "format_version": 99}))
    np.savez(tmp_path / "future.npz", **data)
    with pytest.raises(ScoreFileError,
                       match=r"format 'catcascade-scores' version 99 is not 'catcascade-scores' version 1"):
        ScoreSet.load(tmp_path / "future.npz")
    with pytest.raises(ScoreFileError, match="^no score sets to join$"):
        ScoreSet.concat([])


def _manifest(**kw):
    from catcascade.ensemble.bundle import BundleManifest, CnnSpec

    base = dict(name="t", version="1", labels=["a", "b", "c"], preprocess={"image_size": 64, "crop_pct": 0.875,
                "mean": [0.5] * 3, "std": [0.5] * 3}, cnn=CnnSpec(architecture="convnext_atto", sha256="0"))
    return BundleManifest(**{**base, **kw})


def test_bundle_manifest_refusals():
    from catcascade.ensemble.config import CandidateSetConfig, CascadeConfig, EscalationConfig, LearnedDeferralParams
    from catcascade.ensemble.learned_deferral import feature_names

    assert _manifest().labels == ["a", "b", "c"]
    with pytest.raises(ValueError, match="bundle format_version 2 is not supported"):
        _manifest(format_version=2)
    names = feature_names(4)
    learned = LearnedDeferralParams(num_classes=4, features=names, mean=[0.0] * len(names), scale=[1.0] * len(names),
                                    gains=[0.0, 1.0], coef=[[0.0] * len(names)] * 2, intercept=[0.0, 0.0])
    with pytest.raises(ValueError, match="learned was fitted for 4 classes, the bundle has 3 labels"):
        _manifest(cascade=CascadeConfig(escalation=EscalationConfig(metric="learned", learned=learned)))
    with pytest.raises(ValueError, match="candidate_sets.max_size 5 exceeds the 3 labels"):
        _manifest(cascade=CascadeConfig(candidate_sets=CandidateSetConfig(qhat=0.5, max_size=5)))


def test_bundle_files_are_checked(tmp_path):
    from catcascade.ensemble.bundle import Bundle, BundleError, load_bundle

    Bundle(tmp_path, _manifest()).save()
    with pytest.raises(BundleError, match="bundle CNN file missing"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid .*manifest.json"):
        load_bundle(tmp_path)
    from catcascade.ensemble.bundle import CnnSpec

    (tmp_path / "cnn.pt").write_bytes(b"x")
    Bundle(tmp_path, _manifest(cnn=CnnSpec(architecture="convnext_atto", sha256="0", file="cnn.pt"))).save()
    with pytest.raises(BundleError, match="CNN must be an .onnx file, got cnn.pt"):
        load_bundle(tmp_path)
    (tmp_path / "cnn.onnx").write_bytes(b"x")
    Bundle(tmp_path, _manifest(cnn=CnnSpec(architecture="convnext_atto", sha256="0", int8_file="cnn.int8.onnx",
                                           int8_sha256="0"))).save()
    with pytest.raises(BundleError, match="bundle INT8 CNN file missing or not .onnx"):
        load_bundle(tmp_path, verify=False)
    bundle = Bundle(tmp_path, _manifest())
    assert bundle.vlm_base_path() is None and bundle.vlm_adapter_path() is None


def test_fitted_parameter_shapes_are_checked():
    from catcascade.ensemble.config import LearnedDeferralParams, StackingParams

    with pytest.raises(ValueError, match="learned deferral: 2 features but 1 means and 2 scales"):
        LearnedDeferralParams(num_classes=2, features=["f", "g"], mean=[0.0], scale=[1.0, 1.0], gains=[0.0],
                              coef=[[0.0, 0.0]], intercept=[0.0])
    with pytest.raises(ValueError, match="learned deferral: coef must be 1 rows of 2 and intercept 1 numbers"):
        LearnedDeferralParams(num_classes=2, features=["f", "g"], mean=[0.0, 0.0], scale=[1.0, 1.0], gains=[0.0],
                              coef=[[0.0]], intercept=[0.0])
    with pytest.raises(ValueError, match="stacking: 2 features but 2 means, 2 scales and 1 coefficients"):
        StackingParams(features=["f", "g"], mean=[0.0, 0.0], scale=[1.0, 1.0], coef=[0.0])


def test_policy_fitting_and_offline_settings_refusals():
    from catcascade.ensemble.blender import LogLinearBlender
    from catcascade.ensemble.blender_registry import make_fitted_blender
    from catcascade.ensemble.blending import blend_first
    from catcascade.ensemble.metrics import expected_calibration_error, log_loss
    from catcascade.ensemble.offline_eval import OfflineEvalConfig
    from catcascade.ensemble.policy_fitting import fit_escalation

    p = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"budget is a fraction of requests in \[0, 1\], got 1.5"):
        fit_escalation(p, 1.5)
    with pytest.raises(ValueError, match="minority_boost must be >= 1, got 0.5"):
        fit_escalation(p, 0.2, minority_boost=0.5)
    with pytest.raises(ValueError, match="objective must be 'rate' or 'balanced_accuracy', got 'cost'"):
        fit_escalation(p, 0.2, objective="cost")
    with pytest.raises(ValueError, match="needs validation labels y"):
        fit_escalation(p, 0.2, minority_boost=2.0)
    for kw, message in [({"budgets": ()}, "budgets are fractions"), ({"folds": 1}, "folds must be >= 2"),
                        ({"rules": ("top1", "magic")}, r"unknown deferral rule\(s\) \['magic'\]"),
                        ({"conformal_alpha": 1.0}, "conformal_alpha is a miscoverage rate"),
                        ({"bootstrap": -1}, "bootstrap must be >= 0, got -1")]:
        with pytest.raises(ValueError, match=message):
            OfflineEvalConfig(**kw)
    with pytest.raises(ValueError, match="unknown blender 'median'"):
        make_fitted_blender("median", p, np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"sizes must be N numbers in 1..2"):
        blend_first(LogLinearBlender(), p, np.tile([0, 1], (4, 1)), np.full((4, 2), 0.5), np.array([1, 2, 3, 1]))
    with pytest.raises(ValueError, match=r"need \(N, C\) probabilities and N labels"):
        expected_calibration_error(p, np.zeros(3, dtype=int))
    assert log_loss(np.array([[0.25, 0.75]]), np.array([1])) == pytest.approx(-np.log(0.75))
