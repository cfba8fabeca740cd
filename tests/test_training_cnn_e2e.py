"""End to end: `catcascade train-cnn` on real cat photos -> a bundle the server loads and serves;
resuming a run; the training options that change the loop (mixup/cutmix, focal, sampler, RandAugment)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def trained_bundle(sample_data, tmp_path_factory):
    """convnext_atto at 64 px, one head-only epoch + one full epoch, INT8 included (about 40 s)."""
    from catcascade.cli import main

    out = tmp_path_factory.mktemp("train-cnn") / "bundle"
    code = main(["train-cnn", "--data", str(sample_data), "--out", str(out), "--image-size", "64",
                 "--phase-epochs", "1,1", "--batch-size", "16", "--int8", "--calibration-images", "16",
                 "--no-progress", "--threads", "2", "--imbalance", "class_weights"])
    assert code == 0
    return out


@pytest.mark.needs_sample_data
def test_train_cnn_writes_a_loadable_calibrated_bundle(trained_bundle, sample_data):
    import yaml

    from catcascade.ensemble.bundle import load_bundle
    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
    from catcascade.cnn_stage.preprocessing import load_and_preprocess

    bundle = load_bundle(trained_bundle)
    m = bundle.manifest
    assert len(bundle.labels) == 12 and "Sphynx" in bundle.labels
    assert bundle.preprocess.image_size == 64 and m.cnn.architecture == "convnext_atto"
    prov = m.provenance
    assert m.cnn.temperature == pytest.approx(prov["temperature"]) and m.cnn.temperature > 0
    assert prov["onnx_max_prob_diff"] < 1e-4
    assert prov["split"] == {"train": 96, "val": 12, "test": 12, "skipped_unreadable": 0}
    assert prov["int8"]["calibration_images"] == 16 and prov["heldout_split"] == "test"

    rows = [json.loads(line) for line in (trained_bundle / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(0, 0), (1, 1)]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    config = yaml.safe_load((trained_bundle / "train_config.yaml").read_text())
    assert config["train"]["phase_epochs"] == [1, 1] and config["train"]["imbalance"] == "class_weights"
    assert (trained_bundle / "split.json").is_file() and (trained_bundle / "training.png").stat().st_size > 10_000

    image = next((sample_data / "Bengal").glob("*.jpg"))
    x = load_and_preprocess(image.read_bytes(), bundle.preprocess)[None]
    fp32 = OnnxClassifier(bundle.cnn_path, intra_op_threads=1).run(x)
    int8 = OnnxClassifier(bundle.cnn_int8_path, intra_op_threads=1).run(x)
    assert fp32.shape == int8.shape == (1, 12) and np.isfinite(int8).all()


@pytest.mark.needs_sample_data
def test_reported_calibration_and_heldout_figures_are_the_bundles_own(trained_bundle, sample_data):
    """The figures in the provenance are recomputed here from the exported ONNX files and the
    saved split: ECE before/after at the bundle's temperature on the validation images, a
    temperature that minimises the validation NLL, held-out top-1 of fp32 and INT8, and the
    INT8 top-1 agreement."""
    from sklearn.metrics import balanced_accuracy_score

    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
    from catcascade.cnn_stage.quantization import load_images, run_batched
    from catcascade.cnn_stage.topk import softmax
    from catcascade.ensemble.bundle import load_bundle
    from catcascade.ensemble.metrics import expected_calibration_error
    from catcascade.training.datasets import load_split

    bundle = load_bundle(trained_bundle)
    prov, temperature = bundle.manifest.provenance, bundle.manifest.cnn.temperature
    split = load_split(trained_bundle / "split.json", sample_data)
    fp32 = OnnxClassifier(bundle.cnn_path, intra_op_threads=2)
    int8 = OnnxClassifier(bundle.cnn_int8_path, intra_op_threads=2)

    def logits_and_labels(samples, model):
        x, kept = load_images([s.path for s in samples], bundle.preprocess)
        assert len(kept) == len(samples)
        return run_batched(model, x), np.array([s.label for s in samples])

    val_logits, y_val = logits_and_labels(split.val, fp32)
    # ONNX and torch logits differ by < 1e-4 in probability: the ECE matches to well under a bin's worth
    assert expected_calibration_error(softmax(val_logits), y_val) == pytest.approx(prov["ece_before"], abs=2e-3)
    assert expected_calibration_error(softmax(val_logits, temperature), y_val) == pytest.approx(prov["ece_after"],
                                                                                                abs=2e-3)

    def nll(t):
        return -np.log(softmax(val_logits, t)[np.arange(len(y_val)), y_val]).mean()

    assert nll(temperature) <= min(nll(temperature * 1.1), nll(temperature / 1.1)) + 1e-9

    test_fp32, y_test = logits_and_labels(split.test, fp32)
    test_int8, _ = logits_and_labels(split.test, int8)
    assert prov["heldout_fp32"] == {"top1": np.mean(test_fp32.argmax(1) == y_test),
                                    "balanced_accuracy": balanced_accuracy_score(y_test, test_fp32.argmax(1)),
                                    "images": 12}
    assert prov["int8"]["heldout"]["top1"] == np.mean(test_int8.argmax(1) == y_test)
    assert prov["int8"]["top1_agreement_vs_fp32"] == np.mean(test_int8.argmax(1) == test_fp32.argmax(1))


@pytest.mark.integration
@pytest.mark.needs_sample_data
def test_trained_bundle_serves_over_grpc(trained_bundle, sample_data):
    from catcascade.client import CatcascadeClient
    from catcascade.serving.config import ServeConfig
    from tests.conftest import GrpcServerThread

    server = GrpcServerThread(ServeConfig(bundle=trained_bundle, port=0)).start()
    try:
        with CatcascadeClient(server.target, timeout_s=30) as client:
            info = client.model_info()
            assert list(info.labels)[:2] == ["Abyssinian", "Bengal"] and info.image_size == 64
            r = client.classify(next((sample_data / "Persian").glob("*.jpg")), top_k=3, mode="never")
            assert len(r.cnn_top_k) == 3 and r.cnn_top_k[0].label in info.labels
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from catcascade.training.synthetic_data import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), ["Bengal", "Persian", "Sphynx"],
                                   per_class=8, size=40, progress=False)


def test_resume_continues_after_the_last_saved_epoch(tiny_dataset, tmp_path):
    from catcascade.training.image_folder import scan_image_folder, stratified_split
    from catcascade.training.train_cnn import CnnTrainConfig, train_cnn

    samples, labels = scan_image_folder(tiny_dataset)
    train, val, _ = stratified_split(samples, (0.6, 0.4, 0.0))

    def run(phases, resume):
        cfg = CnnTrainConfig(image_size=32, phase_epochs=phases, batch_size=6, progress=False, threads=2, patience=9)
        return train_cnn(cfg, train, val, labels, metrics_path=tmp_path / "metrics.jsonl",
                         checkpoint_dir=tmp_path / "ckpt", resume=resume)

    first = run((1, 1), False)
    resumed = run((1, 1, 1), True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(0, 0), (1, 1), (2, 2)]
    assert resumed.history[:2] == first.history and len(resumed.history) == 3
    state = json.loads((tmp_path / "ckpt" / "last" / "state.json").read_text())
    assert state["epoch"] == 2 and state["best_bacc"] == resumed.best_val_balanced_accuracy
    with pytest.raises(ValueError, match="trained for model"):
        train_cnn(CnnTrainConfig(model="convnext_femto", image_size=32, phase_epochs=(1,), progress=False),
                  train, val, labels, checkpoint_dir=tmp_path / "ckpt", resume=True)


@pytest.mark.parametrize("options", [
    {"imbalance": "focal", "mixup": 0.4, "cutmix": 1.0, "label_smoothing": 0.1},
    {"imbalance": "balanced_sampler", "randaugment": "rand-m9-mstd0.5", "train_norm": False},
], ids=["focal+mixup/cutmix", "sampler+randaugment+frozen-norm"])
def test_training_options_run_and_select_on_balanced_accuracy(tiny_dataset, options):
    from catcascade.training.image_folder import scan_image_folder, stratified_split
    from catcascade.training.train_cnn import CnnTrainConfig, train_cnn

    samples, labels = scan_image_folder(tiny_dataset)
    train, val, _ = stratified_split(samples, (0.6, 0.4, 0.0))
    cfg = CnnTrainConfig(image_size=32, phase_epochs=(1, 1), batch_size=6, progress=False, threads=2, **options)
    result = train_cnn(cfg, train, val, labels)
    best = max(r["val_balanced_accuracy"] for r in result.history)
    assert result.best_val_balanced_accuracy == best and len(result.history) == 2
    assert result.val_logits.shape == (len(val), 3) and np.isfinite(result.val_logits).all()


def test_cli_rejects_pickle_checkpoints_and_missing_data(tmp_path, capsys):
    from catcascade.cli import main

    assert main(["train-cnn", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--pretrained", "w.pth"]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main(["train-cnn", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train-cnn", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--imbalance", "smote"]) == 2
    assert "imbalance" in capsys.readouterr().err
