"""ONNX Runtime inference for the CNN: one session, deliberate options, CUDA when present."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - install problem
        raise ImportError("onnxruntime is required: `make setup` installs onnxruntime (CPU) or onnxruntime-gpu") from e
    return ort


class OnnxClassifier:
    """Runs an exported classifier: float32 NCHW in, logits out."""

    def __init__(self, path: str | Path, intra_op_threads: int | None = None, providers: list[str] | None = None,
                 allow_spinning: bool = True):
        ort = _import_ort()
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        # ORT's pool threads spin while waiting for work; in a server that shares the cores
        # with decoding and gRPC that spinning steals the CPU they need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
