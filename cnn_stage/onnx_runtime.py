"""ONNX Runtime inference for the CNN: deliberate session options, CUDA when present, and a
pair of sessions for servers that run several batches at once on a CPU."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - install problem
        raise ImportError("onnxruntime is required: `make setup` installs onnxruntime (CPU) or onnxruntime-gpu") from e
    return ort


def cuda_available() -> bool:
    """Whether ONNX Runtime can run on a GPU here (onnxruntime-gpu and a visible device)."""
    return CUDA in _import_ort().get_available_providers()


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


def select_providers(available: list[str], device: str = "auto", device_id: int = 0) -> list:
    """ONNX Runtime providers for ``device`` given the build's ``available`` ones (pure).

    auto: the CUDA provider on ``device_id`` when this build has it, the CPU provider always
    after it (ORT falls back to it for operators CUDA lacks, or when CUDA fails to load);
    cuda: the same, but an error when the build has no CUDA provider; cpu: CPU only.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and CUDA not in available:
        raise ValueError(f"device cuda: this onnxruntime build has no CUDA provider (has {list(available)}); "
                         "install onnxruntime-gpu (`make setup ACCEL=gpu`)")
    if device != "cpu" and CUDA in available:
        return [(CUDA, {"device_id": device_id}), CPU]
    return [CPU]


def fallback_warning(requested: list, active: list[str]) -> str | None:
    """A message when CUDA was asked for but the session runs without it (pure). ORT does not
    raise then (missing CUDA or cuDNN libraries, no visible device): it runs on the CPU."""
    names = [p[0] if isinstance(p, tuple) else p for p in requested]
    if CUDA in names and CUDA not in active:
        return ("ONNX Runtime's CUDA provider was requested but did not load (CUDA/cuDNN libraries or the "
                f"device missing?): running on {', '.join(active)}")
    return None


def _preload_cuda_libraries(ort) -> None:
    """onnxruntime-gpu loads the CUDA and cuDNN libraries of the nvidia-* wheels (the ones
    torch uses; gpu.txt pins both to CUDA 13) only if torch was imported first, or after
    ``preload_dlls()``. A no-op on the CPU build."""
    if ort.get_device() != "GPU" or not hasattr(ort, "preload_dlls"):
        return
    try:
        ort.preload_dlls()
    except OSError as e:  # the session then falls back to the CPU, and says so
        log.warning("could not preload CUDA/cuDNN libraries for ONNX Runtime: %s", e)


class OnnxClassifier:
    """Runs an exported classifier: float32 NCHW in, logits out."""

    def __init__(self, path: str | Path, intra_op_threads: int | None = None, providers: list | None = None,
                 allow_spinning: bool = True, profile_dir: str | Path | None = None, device: str = "auto"):
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
        if profile_dir is not None:  # ORT writes onnxruntime_profile_<time>.json into the cwd by default
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(profile_dir) / "onnxruntime_profile")
        if providers is None:
            providers = select_providers(ort.get_available_providers(), device)
        if any((p[0] if isinstance(p, tuple) else p) == CUDA for p in providers):
            _preload_cuda_libraries(ort)
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()
        warning = fallback_warning(providers, self.providers)
        if warning:
            log.warning(warning)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class OverlapAwareClassifier:
    """Two sessions over one model for a server that runs several batches at once on a CPU.

    A batch that runs alone gets every core (the lowest latency for one image); a batch that
    overlaps another gets one thread, because on a CPU two single-threaded runs get more images
    per second out of the cores than runs that each try to use all of them. Weights are held
    twice (one copy per session).
    """

    def __init__(self, path: str | Path, wide_threads: int | None = None, allow_spinning: bool = True):
        self.wide = OnnxClassifier(path, intra_op_threads=wide_threads, allow_spinning=allow_spinning)
        self.narrow = OnnxClassifier(path, intra_op_threads=1, allow_spinning=allow_spinning)
        self._lock = threading.Lock()
        self._running = 0
        self.runs = {"wide": 0, "narrow": 0}
        self.providers = self.wide.providers  # both sessions: CPU (this class is for CPU-only hosts)

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            lone = self._running == 0
            self._running += 1
            self.runs["wide" if lone else "narrow"] += 1
        try:
            return (self.wide if lone else self.narrow).run(batch)
        finally:
            with self._lock:
                self._running -= 1


def make_classifier(path: str | Path, *, instances: int = 1, threads: int | None = None,
                    spinning: bool = True) -> OnnxClassifier | OverlapAwareClassifier:
    """The classifier a server with ``instances`` batches at once should run, the one choice
    every engine makes the same way (local batcher, Ray replicas, offline scoring).

    ``threads`` set: each batch gets that many ONNX Runtime threads. Unset: on a CPU with several
    instances, a lone batch takes every core and overlapping ones one thread each
    (OverlapAwareClassifier); otherwise the cores are split between the instances.
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if instances > 1 and threads is None and not cuda_available():
        return OverlapAwareClassifier(path, allow_spinning=spinning)
    return OnnxClassifier(path, intra_op_threads=threads or max(1, (os.cpu_count() or 1) // instances),
                          allow_spinning=spinning)
