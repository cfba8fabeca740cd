from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    from catcascade.cnn_stage.model import create_convnext
    from catcascade.cnn_stage.onnx_export import export_onnx

    torch.manual_seed(0)
    model = create_convnext("convnext_atto", num_classes=5)
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    diff = export_onnx(model, path, image_size=64)
    return model, path, diff


def test_onnx_matches_torch_for_any_batch_size(tiny_onnx):
    import torch

    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
    from catcascade.cnn_stage.topk import softmax

    model, path, diff = tiny_onnx
    assert diff < 1e-4
    clf = OnnxClassifier(path, intra_op_threads=1)
    for n in (1, 5):
        x = torch.randn(n, 3, 64, 64)
        with torch.inference_mode():
            ref = softmax(model(x).numpy())
        got = softmax(clf.run(x.numpy()))
        assert got.shape == (n, 5) and np.abs(ref - got).max() < 1e-4


def test_onnx_rejects_non_nchw(tiny_onnx):
    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier

    with pytest.raises(ValueError, match="NCHW"):
        OnnxClassifier(tiny_onnx[1]).run(np.zeros((3, 64, 64), np.float32))


def test_overlap_aware_runs_a_lone_batch_wide_and_overlapping_ones_narrow(tiny_onnx):
    """The wide (all cores) and narrow (one thread) sessions give the same logits; which one a
    batch gets depends only on whether another batch is running (the sessions' run methods are
    replaced by gated wrappers to make the overlap deterministic)."""
    import threading

    from catcascade.cnn_stage.onnx_runtime import OverlapAwareClassifier

    clf = OverlapAwareClassifier(tiny_onnx[1], wide_threads=2)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    assert np.abs(clf.wide.run(x) - clf.narrow.run(x)).max() < 1e-5
    used, gate, started = [], threading.Event(), threading.Event()
    for name in ("wide", "narrow"):
        session = getattr(clf, name)
        real = session.run

        def gated(batch, _name=name, _real=real):
            used.append(_name)
            started.set()
            if _name == "wide":
                gate.wait(5)
            return _real(batch)

        session.run = gated
    first = threading.Thread(target=clf.run, args=(x,))
    first.start()
    assert started.wait(5)
    clf.run(x)  # overlaps the gated wide run
    gate.set()
    first.join()
    clf.run(x)  # alone again
    assert used == ["wide", "narrow", "wide"] and clf.runs == {"wide": 2, "narrow": 1}


def test_top_k_orders_and_labels():
    from catcascade.cnn_stage.topk import softmax, top_k

    p = softmax(np.array([1.0, 3.0, 2.0, 0.0]))
    t = top_k(p, ["a", "b", "c", "d"], 3)
    assert t.labels == ("b", "c", "a") and t.indices == (1, 2, 0)
    assert t.probabilities[0] > t.probabilities[1] > t.probabilities[2]


def test_checkpoint_must_be_safetensors(tmp_path):
    from catcascade.cnn_stage.model import create_convnext

    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        create_convnext("convnext_atto", 3, checkpoint=bad)
    with pytest.raises(ValueError, match="ConvNeXt"):
        create_convnext("resnet50", 3)


def test_bundle_refuses_tampered_model(tiny_onnx, tmp_path):
    import shutil

    from catcascade.ensemble.bundle import Bundle, BundleError, BundleManifest, CnnSpec, load_bundle, sha256_file
    from catcascade.cnn_stage.preprocessing import PreprocessConfig

    shutil.copy(tiny_onnx[1], tmp_path / "cnn.onnx")
    manifest = BundleManifest(name="t", version="1", labels=list("abcde"),
                              preprocess=PreprocessConfig(image_size=64).to_dict(),
                              cnn=CnnSpec(architecture="convnext_atto", sha256=sha256_file(tmp_path / "cnn.onnx")))
    Bundle(tmp_path, manifest).save()
    assert load_bundle(tmp_path).labels == list("abcde")
    with open(tmp_path / "cnn.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["labels"] = ["a", "a"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="labels"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "nowhere")
