"""The GPU-only choices, checked on a CPU: each is a pure function of what the machine has
(the probes are the arguments), so every branch runs here; ORT's CUDA fallback runs for real."""
from __future__ import annotations

import logging

import pytest

from catcascade.cnn_stage.onnx_runtime import CPU, CUDA, fallback_warning, select_providers
from catcascade.training.train_cnn import mixed_precision
from catcascade.training.train_vlm import load_plan
from catcascade.vlm_stage.vllm_server import VllmServerConfig, device_flags


@pytest.mark.parametrize("available,device,expected", [
    ([CUDA, CPU], "auto", [(CUDA, {"device_id": 0}), CPU]),
    ([CPU], "auto", [CPU]),
    ([CUDA, CPU], "cpu", [CPU]),
    ([CUDA, CPU], "cuda", [(CUDA, {"device_id": 0}), CPU]),
])
def test_ort_provider_selection(available, device, expected):
    assert select_providers(available, device) == expected


def test_ort_cuda_without_the_gpu_build_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA provider.*install onnxruntime-gpu"):
        select_providers([CPU], "cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        select_providers([CPU], "tpu")
    assert select_providers([CUDA, CPU], "auto", device_id=1)[0] == (CUDA, {"device_id": 1})


def test_ort_fallback_warning():
    assert "running on CPUExecutionProvider" in fallback_warning([(CUDA, {"device_id": 0}), CPU], [CPU])
    assert fallback_warning([(CUDA, {}), CPU], [CUDA, CPU]) is None
    assert fallback_warning([CPU], [CPU]) is None


def test_a_session_that_asked_for_cuda_falls_back_to_the_cpu_and_says_so(tmp_path, monkeypatch, caplog):
    """The probe says CUDA is there (as onnxruntime-gpu on a host whose CUDA libraries are
    missing would); the real CPU build of ORT then runs the model on the CPU, and we log it."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])])
    path = tmp_path / "mean.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level(logging.WARNING, logger="catcascade.cnn_stage.onnx_runtime"):
        clf = OnnxClassifier(path, intra_op_threads=1)
    assert clf.providers == [CPU]
    assert "CUDA provider was requested but did not load" in caplog.text
    out = clf.run(np.ones((2, 3, 4, 4), np.float32))
    assert out.shape == (2, 3) and np.allclose(out, 1.0)


@pytest.mark.parametrize("precision,cuda,bf16,expected", [
    ("auto", True, True, "bf16"), ("auto", True, False, "fp16"), ("auto", False, False, "no"),
    ("bf16", False, False, "bf16"), ("fp32", True, True, "no"), ("fp16", True, True, "fp16"),
])
def test_cnn_training_precision(precision, cuda, bf16, expected):
    assert mixed_precision(precision, cuda, bf16) == expected


@pytest.mark.parametrize("precision,cuda,bf16,message", [
    ("bf16", True, False, "no bf16 support"), ("fp16", False, False, "needs a CUDA GPU"), ("int8", True, True, "one of"),
])
def test_cnn_training_precision_refusals(precision, cuda, bf16, message):
    with pytest.raises(ValueError, match=message):
        mixed_precision(precision, cuda, bf16)


def test_qlora_and_bf16_loading_choices():
    gpu = load_plan(qlora=True, bf16=None, cuda=True, bf16_supported=True)
    assert gpu.dtype == "bfloat16" and gpu.bf16_training
    assert gpu.quantization() == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                  "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    old_gpu = load_plan(qlora=True, bf16=None, cuda=True, bf16_supported=False)  # T4 / V100
    assert old_gpu.dtype == "float16" and not old_gpu.bf16_training
    full = load_plan(qlora=False, bf16=None, cuda=True, bf16_supported=True)
    assert full.dtype == "bfloat16" and full.quantization() is None
    cpu = load_plan(qlora=False, bf16=None, cuda=False, bf16_supported=False)
    assert cpu.dtype == "float32" and not cpu.bf16_training
    assert load_plan(qlora=False, bf16=True, cuda=False, bf16_supported=False).dtype == "bfloat16"
    with pytest.raises(RuntimeError, match="QLoRA needs a CUDA GPU"):
        load_plan(qlora=True, bf16=None, cuda=False, bf16_supported=False)
    with pytest.raises(RuntimeError, match="no bf16 support"):
        load_plan(qlora=False, bf16=True, cuda=True, bf16_supported=False)


def test_vllm_device_flags():
    assert device_flags("auto", cuda=True, gpu_memory_utilization=0.85) == ["--gpu-memory-utilization", "0.85"]
    assert device_flags("bfloat16", cuda=True, gpu_memory_utilization=0.9) == [
        "--gpu-memory-utilization", "0.9", "--dtype", "bfloat16"]
    assert device_flags("auto", cuda=False, gpu_memory_utilization=0.9) == ["--dtype", "float32", "--enforce-eager"]
    assert device_flags("bfloat16", cuda=False, gpu_memory_utilization=0.9) == ["--dtype", "bfloat16", "--enforce-eager"]


def test_vllm_command_for_qwen_on_a_gpu(tmp_path):
    """A Qwen2.5-VL folder on CUDA: CUDA graphs (no --enforce-eager), vLLM's dtype, the
    family's image bounds and no video budget."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    cmd = VllmServerConfig(model=str(tmp_path), gpu_memory_utilization=0.5).command(8000, cuda=True)
    assert "--enforce-eager" not in cmd and "--dtype" not in cmd
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5"
    assert json.loads(cmd[cmd.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    assert json.loads(cmd[cmd.index("--mm-processor-kwargs") + 1]) == {
        "size": {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}}
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VllmServerConfig(model="m", gpu_memory_utilization=1.5)
