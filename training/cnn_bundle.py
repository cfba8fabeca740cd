"""From a trained CNN to the bundle's CNN part: calibrate, export, (optionally) quantize, measure.

1. temperature scaling fitted on the validation logits (NLL), ECE (15 bins) before and after;
2. ONNX export with a dynamic batch axis, checked against torch (max |dp| < 1e-4);
3. optionally a static INT8 copy calibrated on real training images, with its top-1 agreement
   against fp32 (and accuracy) measured on held-out images through ONNX Runtime;
4. the `CnnSpec` (with the validation set's calibrated confidence histogram, the drift
   reference) and a provenance summary for the manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CNN_FILE = "cnn.onnx"
CNN_INT8_FILE = "cnn.int8.onnx"


@dataclass
class CnnExport:
    spec: object  # ensemble.bundle.CnnSpec
    preprocess: object  # cnn_stage.preprocessing.PreprocessConfig
    report: dict = field(default_factory=dict)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.metrics import balanced_accuracy_score

    pred = logits.argmax(1)
    return {"top1": float((pred == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "images": int(len(y))}


def calibrate_and_export(result, out_dir: str | Path, architecture: str, image_size: int,
                         int8_calibration=None, eval_samples=None, quantization=None) -> CnnExport:
    """Writes ``cnn.onnx`` (and ``cnn.int8.onnx`` when ``int8_calibration`` samples are given).

    ``result``: a `training.train_cnn.TrainResult`. ``int8_calibration``/``eval_samples``:
    lists of `Sample` (real images; decoded through the serving path). The returned report
    holds the temperature, ECE before/after, ONNX parity and, with INT8, the agreement.
    """
    from catcascade.ensemble.bundle import CnnSpec, sha256_file
    from catcascade.cnn_stage.onnx_export import export_onnx
    from catcascade.cnn_stage.preprocessing import PreprocessConfig
    from catcascade.ensemble.confidence_histogram import top1_confidence_histogram
    from catcascade.ensemble.metrics import expected_calibration_error
    from catcascade.ensemble.temperature import TemperatureScaler

    out = Path(out_dir)
    scaler = TemperatureScaler().fit(result.val_logits, result.val_labels)
    ece_before = expected_calibration_error(TemperatureScaler(1.0).predict_proba(result.val_logits), result.val_labels)
    ece_after = expected_calibration_error(scaler.predict_proba(result.val_logits), result.val_labels)
    pp = PreprocessConfig.from_timm(result.model, image_size)
    parity = export_onnx(result.model, out / CNN_FILE, image_size)
    report = {"temperature": scaler.temperature_, "ece_before": ece_before, "ece_after": ece_after,
              "ece_bins": 15, "onnx_max_prob_diff": parity}
    # The reference for the server's drift index: how confident the calibrated CNN is on
    # images it was not trained on.
    spec = dict(architecture=architecture, file=CNN_FILE, sha256=sha256_file(out / CNN_FILE),
                temperature=scaler.temperature_,
                confidence_histogram=top1_confidence_histogram(scaler.predict_proba(result.val_logits)))
    if eval_samples or int8_calibration:
        from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
        from catcascade.cnn_stage.quantization import QuantizationConfig, agreement, load_images, quantize_int8, run_batched

        fp32 = OnnxClassifier(out / CNN_FILE)
        if eval_samples:
            x_eval, kept = load_images([s.path for s in eval_samples], pp)
            y_eval = np.asarray([eval_samples[i].label for i in kept])
            fp32_logits = run_batched(fp32, x_eval)
            report["heldout_fp32"] = _accuracy(fp32_logits, y_eval)
        if int8_calibration:
            qcfg = quantization or QuantizationConfig()
            x_cal, _ = load_images([s.path for s in int8_calibration], pp)
            quantize_int8(out / CNN_FILE, out / CNN_INT8_FILE, x_cal, qcfg)
            spec.update(int8_file=CNN_INT8_FILE, int8_sha256=sha256_file(out / CNN_INT8_FILE))
            report["int8"] = {"quantization": qcfg.to_dict(), "calibration_images": int(len(x_cal))}
            if eval_samples:
                int8_logits = run_batched(OnnxClassifier(out / CNN_INT8_FILE), x_eval)
                report["int8"]["top1_agreement_vs_fp32"] = agreement(fp32_logits, int8_logits)
                report["int8"]["heldout"] = _accuracy(int8_logits, y_eval)
    return CnnExport(CnnSpec(**spec), pp, report)
