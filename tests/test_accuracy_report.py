"""The accuracy benchmark: report + plots from score files, the CLI commands, and (integration)
`catcascade score` / `bench-accuracy` end to end on the real cat photos with the real vLLM."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.accuracy import PLOTS, render_report
from catcascade.ensemble.config import CascadeConfig
from catcascade.ensemble.escalation_policy import EscalationPolicy
from catcascade.ensemble.offline_eval import OfflineEvalConfig, evaluate_offline
from catcascade.ensemble.score_files import ScoreSet
from catcascade.ensemble.synthetic_scores import SyntheticScoreConfig, synthetic_score_set
from catcascade.cli import main as cli


def _assert_real_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 50  # something is drawn, not a blank canvas


def test_report_renders_table_and_pngs(tmp_path):
    scores = synthetic_score_set(SyntheticScoreConfig(n=600, seed=4))
    result = evaluate_offline(scores, OfflineEvalConfig(bootstrap=200))
    report = render_report(result, tmp_path, {"source": "synthetic"})
    text = report.read_text()
    for name in ("cnn-only", "cascade@0%", "cascade@5%", "cascade@30%", "cascade@100%", "vlm-always"):
        assert f"| {name} |" in text
    for png in PLOTS:
        assert f"]({png})" in text
        _assert_real_png(tmp_path / png)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["systems"]) == 16 and data["context"]["source"] == "synthetic"  # + 7 conformal rows
    assert data["minority_classes"]  # imbalanced synthetic classes
    _assert_rates_meet_budgets(data["systems"], vlm_share=float(scores.has_vlm.mean()), n_per_fold=300)


def _assert_rates_meet_budgets(systems: list[dict], vlm_share: float, n_per_fold: int):
    """Each cascade row escalates its budget's share of images: thresholds fitted on one fold
    carry over to the other, up to sampling noise (3 binomial standard deviations)."""
    rows = {r["name"]: r for r in systems}
    assert rows["cnn-only"]["escalation_rate"] == 0.0 and rows["cascade@0%"]["escalation_rate"] == 0.0
    assert rows["cascade@100%"]["escalation_rate"] == pytest.approx(vlm_share)
    assert rows["vlm-always"]["escalation_rate"] == pytest.approx(vlm_share)
    for r in systems:
        if r["name"].startswith("cascade@") and 0.0 < r["budget"] < 1.0:
            noise = 3 * (r["budget"] * (1 - r["budget"]) / n_per_fold) ** 0.5 + 1 / n_per_fold
            assert abs(r["escalation_rate"] - r["budget"] * vlm_share) <= noise, r


def test_bench_accuracy_and_fit_cascade_from_score_files(tmp_path, capsys):
    path = synthetic_score_set(SyntheticScoreConfig(n=800, seed=5)).save(tmp_path / "val.npz")
    out = tmp_path / "bench"
    assert cli(["bench-accuracy", "--scores", str(path), "--out", str(out), "--budgets", "0,20,100",
                "--blender", "stacking", "--minority-boost", "1.5", "--conformal-alpha", "none", "--bootstrap", "50",
                "--rules", "top1,learned", "--deferral", "learned"]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = [s["name"] for s in data["systems"]]
    assert rows == ["cnn-only", "cascade@0%", "cascade@20%", "cascade@100%", "vlm-always"]
    assert set(data["deferral"]["rules"]) == {"top1", "learned"} and data["conformal"] is None
    assert data["fitted"][0]["thresholds"]["cascade@20%"]["metric"] == "learned"
    for png in PLOTS:
        _assert_real_png(out / png)
    cfg_path = tmp_path / "cascade.json"
    assert cli(["fit-cascade", str(path), "--budget", "25", "--out", str(cfg_path)]) == 0
    cfg = CascadeConfig.model_validate_json(cfg_path.read_text())
    assert cfg.escalation.fit_summary["budget"] == 0.25 and 0 < cfg.blend.weight <= 1
    # fitted on the whole file: on that file the policy escalates the budget, to one image
    scores = ScoreSet.load(path)
    rate = EscalationPolicy(cfg.escalation).escalate_mask(scores.cnn_probs()).mean()
    assert abs(rate - 0.25) <= 1 / len(scores)
    rates = {name: rate for name, rate in _rates(out).items() if name in ("cnn-only", "vlm-always") or
             name.startswith("cascade@")}
    assert rates == {"cnn-only": 0.0, "cascade@0%": 0.0, "cascade@100%": pytest.approx(scores.has_vlm.mean()),
                     "cascade@20%": pytest.approx(0.2 * scores.has_vlm.mean(), abs=0.09),
                     "vlm-always": pytest.approx(scores.has_vlm.mean())}
    assert cfg.candidate_sets is None and cfg.escalation.learned is None
    capsys.readouterr()
    assert cli(["fit-cascade", str(path), "--budget", "20", "--deferral", "learned", "--conformal-alpha", "0.1",
                "--bootstrap", "50", "--out", str(cfg_path)]) == 0
    printed = capsys.readouterr().out
    for rule in ("top1", "margin", "entropy", "learned"):  # compared on the same cross-fitted folds first
        assert f"  {rule} " in printed
    cfg = CascadeConfig.model_validate_json(cfg_path.read_text())
    assert cfg.escalation.metric == "learned" and cfg.escalation.learned.num_classes == 12
    assert cfg.candidate_sets.alpha == 0.1 and "candidate sets" in printed


def _rates(out) -> dict[str, float]:
    return {r["name"]: r["escalation_rate"] for r in json.loads((out / "results.json").read_text())["systems"]}


def test_cli_reports_bad_inputs_without_traceback(tmp_path, capsys):
    assert cli(["bench-accuracy", "--scores", str(tmp_path / "nope.npz"), "--out", str(tmp_path)]) == 2
    assert "score file not found" in capsys.readouterr().err
    assert cli(["score", str(tmp_path / "no-data"), "--bundle", str(tmp_path / "no-bundle")]) == 2
    assert "manifest.json" in capsys.readouterr().err
    path = synthetic_score_set(SyntheticScoreConfig(n=100, seed=6)).save(tmp_path / "s.npz")
    assert cli(["fit-cascade", str(path), "--budget", "150"]) == 2
    assert "budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["bench-accuracy", "--scores", str(path), "--budgets", "10,abc"])
    with pytest.raises(SystemExit):
        cli(["bench-accuracy", "--scores", str(path), "--rules", "top1,psychic"])
    with pytest.raises(SystemExit):
        cli(["fit-cascade", str(path), "--budget", "20", "--conformal-alpha", "2"])


@pytest.mark.integration
@pytest.mark.needs_sample_data
def test_score_and_bench_accuracy_on_real_photos(demo_bundle, vllm_server, sample_data, tmp_path):
    """End to end: ONNX CNN + real vLLM over the 120 Oxford cat photos. The demo CNN is trained
    on synthetic images, so accuracy is near chance: this checks structure, not accuracy."""
    cnn_only = tmp_path / "cnn.npz"
    assert cli(["score", str(sample_data), "--bundle", str(demo_bundle), "--out", str(cnn_only),
                "--limit", "24", "--no-progress"]) == 0
    s = ScoreSet.load(cnn_only)
    assert len(s) == 24 and len(set(s.labels.tolist())) == 12 and not s.has_vlm.any()
    assert (s.vlm_candidates == -1).all() and np.isnan(s.vlm_scores).all()

    out = tmp_path / "bench"
    assert cli(["bench-accuracy", "--data", str(sample_data), "--bundle", str(demo_bundle),
                "--vlm-url", vllm_server.url, "--out", str(out), "--no-progress"]) == 0
    scores = ScoreSet.load(out / "scores.npz")
    n_images = sum(1 for p in sample_data.rglob("*.jpg"))
    assert len(scores) == n_images and scores.has_vlm.mean() > 0.95
    assert np.isclose(np.nansum(scores.vlm_scores, axis=1) + scores.vlm_none, 1.0, atol=1e-3)[scores.has_vlm].all()
    assert (scores.vlm_candidates[:, 0] == scores.cnn_logits.argmax(1)).all()  # the VLM saw the CNN's top-3
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["systems"]]
    assert names[0] == "cnn-only" and "cascade@30%" in names and names[-1] == "vlm-always"
    for r in data["systems"]:
        assert 0.0 <= r["balanced_accuracy"] <= 1.0
    _assert_rates_meet_budgets(data["systems"], vlm_share=float(scores.has_vlm.mean()), n_per_fold=n_images // 2)
    for png in PLOTS:
        _assert_real_png(out / png)
