"""The INT8 path: static quantization calibrated on (generated) JPEGs through the serving decoder,
a model ONNX Runtime loads, agreement measured; the bundle's optional INT8 file is verified."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    import torch

    from catcascade.cnn_stage.model import create_convnext
    from catcascade.cnn_stage.onnx_export import export_onnx

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("int8") / "cnn.onnx"
    export_onnx(create_convnext("convnext_atto", num_classes=4), path, image_size=64)
    return path


@pytest.fixture(scope="module")
def jpeg_files(tmp_path_factory):
    from catcascade.training.synthetic_data import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path_factory.mktemp("jpegs"), ["a", "b"], per_class=8, size=80, progress=False)
    files = sorted(root.rglob("*.jpg"))
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return files + [root / "a" / "broken.jpg"]


@pytest.mark.parametrize("fmt, node", [("QDQ", "QuantizeLinear"), ("QOperator", "QLinearConv")])
def test_static_int8_model_loads_and_agrees_measurably(fp32_model, jpeg_files, tmp_path, fmt, node):
    import onnx

    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
    from catcascade.cnn_stage.preprocessing import PreprocessConfig
    from catcascade.cnn_stage.quantization import QuantizationConfig, agreement, load_images, quantize_int8, run_batched

    x, kept = load_images(jpeg_files, PreprocessConfig(image_size=64))
    assert len(kept) == len(jpeg_files) - 1  # the broken file is skipped, not fatal
    out = quantize_int8(fp32_model, tmp_path / "cnn.int8.onnx", x[:8], QuantizationConfig(quant_format=fmt))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert node in ops
    assert out.stat().st_size < 0.5 * fp32_model.stat().st_size
    fp32 = run_batched(OnnxClassifier(fp32_model, intra_op_threads=1), x)
    int8 = run_batched(OnnxClassifier(out, intra_op_threads=1), x, batch_size=5)
    assert int8.shape == fp32.shape == (len(x), 4)
    score = agreement(fp32, int8)
    assert score == np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.9  # same top-1 on nearly every image
    assert np.abs(int8 - fp32).max() < 0.5 * (np.abs(fp32).max() + 1e-3)  # close, not garbage


def test_agreement_is_the_share_of_matching_top1():
    from catcascade.cnn_stage.quantization import agreement

    fp32 = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    int8 = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [9.0, 0.0, 5.0], [0.0, 0.5, 1.0]])
    assert agreement(fp32, int8) == 0.5  # rows 0 and 3 agree, rows 1 and 2 do not
    assert agreement(fp32, fp32) == 1.0
    assert agreement(fp32[1:3], int8[1:3]) == 0.0
    assert agreement(fp32[:1], int8[:1]) == 1.0


def test_quantization_rejects_bad_inputs(fp32_model, tmp_path):
    from catcascade.cnn_stage.quantization import QuantizationConfig, agreement, quantize_int8

    with pytest.raises(ValueError, match="calibration images"):
        quantize_int8(fp32_model, tmp_path / "q.onnx", np.zeros((0, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="quant_format"):
        QuantizationConfig(quant_format="int4")
    with pytest.raises(ValueError, match="same"):
        agreement(np.zeros((2, 3)), np.zeros((3, 3)))


def test_bundle_verifies_the_optional_int8_file(fp32_model, jpeg_files, tmp_path):
    import shutil

    from catcascade.ensemble.bundle import Bundle, BundleError, BundleManifest, CnnSpec, load_bundle, sha256_file
    from catcascade.cnn_stage.preprocessing import PreprocessConfig
    from catcascade.cnn_stage.quantization import load_images, quantize_int8

    shutil.copy(fp32_model, tmp_path / "cnn.onnx")
    pp = PreprocessConfig(image_size=64)
    quantize_int8(tmp_path / "cnn.onnx", tmp_path / "cnn.int8.onnx", load_images(jpeg_files[:4], pp)[0])
    spec = CnnSpec(architecture="convnext_atto", sha256=sha256_file(tmp_path / "cnn.onnx"),
                   int8_file="cnn.int8.onnx", int8_sha256=sha256_file(tmp_path / "cnn.int8.onnx"))
    Bundle(tmp_path, BundleManifest(name="t", version="1", labels=list("abcd"), preprocess=pp.to_dict(),
                                    cnn=spec)).save()
    bundle = load_bundle(tmp_path)
    assert bundle.cnn_int8_path == tmp_path / "cnn.int8.onnx" and bundle.cnn_path == tmp_path / "cnn.onnx"
    with open(tmp_path / "cnn.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="cnn.int8.onnx"):
        load_bundle(tmp_path)
    with pytest.raises(ValueError, match="go together"):
        CnnSpec(architecture="convnext_atto", sha256="0", int8_file="cnn.int8.onnx")
