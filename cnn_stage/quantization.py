"""Static INT8 quantization of the exported CNN with ONNX Runtime, calibrated on real images.

``quant_pre_process`` (shape inference + graph optimisation) then ``quantize_static``; the
default is per-channel weights with QDQ nodes, which ONNX Runtime fuses into int8 kernels
(VNNI on x86). Activation ranges come from a few hundred real, serving-preprocessed images:
random noise gives ranges that real photos do not have. The accuracy change is measured as
top-1 agreement with the fp32 model on held-out images (`agreement`).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizationConfig:
    """Knobs of ``onnxruntime.quantization.quantize_static`` that matter for a ConvNeXt."""

    quant_format: str = "QDQ"
    """QDQ (QuantizeLinear/DequantizeLinear pairs, fused by ORT) | QOperator (QLinearConv etc.)"""
    per_channel: bool = True
    reduce_range: bool = False
    """7-bit weights: only for CPUs without VNNI, where 8-bit products can saturate."""
    calibration_method: str = "MinMax"
    """MinMax | Entropy | Percentile"""
    activation_type: str = "QUInt8"
    """QUInt8 | QInt8 (activations); weights are always QInt8 (symmetric)."""
    op_types: tuple[str, ...] | None = None
    """Only quantize these ONNX op types (e.g. ("Conv", "Gemm")); None = every op ORT can quantize."""
    exclude_depthwise: bool = False
    """Keep depthwise convolutions (group > 1) in float: ConvNeXt's 7x7 depthwise convs are the
    most range-sensitive layers and gain little from int8."""
    calibration_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.quant_format not in ("QDQ", "QOperator"):
            raise ValueError(f"quant_format must be QDQ or QOperator, got {self.quant_format!r}")
        if self.calibration_method not in ("MinMax", "Entropy", "Percentile"):
            raise ValueError(f"calibration_method must be MinMax, Entropy or Percentile, "
                             f"got {self.calibration_method!r}")
        if self.activation_type not in ("QUInt8", "QInt8"):
            raise ValueError(f"activation_type must be QUInt8 or QInt8, got {self.activation_type!r}")
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))
            if not self.op_types:
                raise ValueError("op_types must name at least one op type, or be None for all")
        if self.calibration_batch_size < 1:
            raise ValueError("calibration_batch_size must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["op_types"] = list(self.op_types) if self.op_types is not None else None
        return d


def _reader(images: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, len(images), batch_size))

        def get_next(self):
            start = next(self._it, None)
            if start is None:
                return None
            return {input_name: np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)}

    return _Batches()


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration_images: np.ndarray,
                  cfg: QuantizationConfig = QuantizationConfig()) -> Path:
    """Writes a statically quantized copy of ``fp32_path``; ``calibration_images`` is (N, 3, H, W) float32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = np.asarray(calibration_images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be a non-empty (N, 3, H, W) array, got shape {images.shape}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped))
        exclude = None
        if cfg.exclude_depthwise:
            graph = onnx.load(str(prepped)).graph
            exclude = [n.name for n in graph.node if n.op_type == "Conv"
                       and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        quantize_static(
            str(prepped), str(out_path), _reader(images, input_name, cfg.calibration_batch_size),
            quant_format=getattr(QuantFormat, cfg.quant_format), per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range, activation_type=getattr(QuantType, cfg.activation_type),
            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, cfg.calibration_method),
            op_types_to_quantize=list(cfg.op_types) if cfg.op_types else None, nodes_to_exclude=exclude,
        )
    log.info("wrote INT8 model %s (%.1f MB, from %d calibration images)", out_path,
             out_path.stat().st_size / 1e6, len(images))
    return out_path


def agreement(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> float:
    """Share of images whose top-1 class is the same under both models."""
    a, b = np.asarray(fp32_logits), np.asarray(int8_logits)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"logit arrays must have the same (N, C) shape, got {a.shape} and {b.shape}")
    return float((a.argmax(1) == b.argmax(1)).mean())


def run_batched(classifier, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Logits of an `OnnxClassifier` over many images, ``batch_size`` at a time."""
    return np.concatenate([classifier.run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def load_images(paths: Iterable[Path], preprocess_config, limit: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Real image files -> the serving path's (N, 3, H, W) input and the indices of the files kept.

    Unreadable files are skipped and logged.
    """
    from catcascade.cnn_stage.preprocessing import InvalidImageError, load_and_preprocess

    out, kept, bad = [], [], 0
    for i, p in enumerate(paths):
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(load_and_preprocess(Path(p).read_bytes(), preprocess_config))
            kept.append(i)
        except (InvalidImageError, OSError) as e:
            bad += 1
            log.warning("skipping unreadable image %s: %s", p, e)
    if not out:
        raise ValueError("no readable images to calibrate or evaluate on")
    if bad:
        log.warning("skipped %d unreadable image(s)", bad)
    return np.stack(out), kept
