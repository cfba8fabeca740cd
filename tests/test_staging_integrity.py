"""Staging makes a version self-contained and verified (issue 25): every file copied into the
version (no links, no manifest path outside it), every file's sha256 in the manifest, and the
loader refusing a version whose files changed after staging with reason ``checksum``."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from catcascade.ensemble.bundle import (Bundle, BundleError, BundleManifest, ChecksumMismatch, VlmSpec, load_bundle,
                                        sha256_file)
from catcascade.serving.model_repository.repository import list_versions
from catcascade.serving.model_repository.staging import stage_version

PREPROCESS = {"image_size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
LABELS = ["Abyssinian", "Bengal", "Persian"]


def _cnn_bundle(root: Path, *, int8: bool = False) -> Path:
    """A CNN-only bundle (train-cnn's shape): the loader checks hashes and suffixes, not ONNX."""
    root.mkdir(parents=True)
    (root / "cnn.onnx").write_bytes(b"onnx bytes " + root.name.encode())
    cnn = {"architecture": "convnext_atto", "sha256": sha256_file(root / "cnn.onnx")}
    if int8:
        (root / "cnn.int8.onnx").write_bytes(b"int8 onnx bytes")
        cnn.update(int8_file="cnn.int8.onnx", int8_sha256=sha256_file(root / "cnn.int8.onnx"))
    Bundle(root, BundleManifest(name="cats", version="2", labels=LABELS, preprocess=PREPROCESS, cnn=cnn)).save()
    return root


def _adapter(folder: Path) -> Path:
    """A small PEFT-shaped adapter: safetensors weights, its config, a tokenizer config."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"base_model.model.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
               "base_model.model.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return folder


def _with_vlm(root: Path) -> Path:
    """Gives bundle ``root`` a base model folder and an adapter, as build-demo does."""
    (root / "vlm" / "base").mkdir(parents=True)
    (root / "vlm" / "base" / "config.json").write_text('{"model_type": "llava"}')
    _adapter(root / "vlm" / "adapter")
    b = load_bundle(root)
    b.manifest.vlm = VlmSpec(base_model="vlm/base", adapter_dir="vlm/adapter", adapter_name="cats")
    b.save()
    return root


def _edit_manifest(root: Path, edit) -> None:
    """Rewrites manifest.json as raw JSON (past the schema), as a hand edit would."""
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data))


@pytest.fixture
def repo(tmp_path) -> Path:
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def _nothing_staged(repo: Path) -> bool:
    return list_versions(repo) == [] and not list(repo.iterdir())


def _staged(repo: Path, tmp_path: Path, *, own_vlm: bool = False) -> Path:
    """v1: a CNN bundle with an INT8 copy and the VLM section and adapter of a live bundle, or
    (``own_vlm``) with its own base model folder and adapter, as build-demo writes it."""
    new = _cnn_bundle(tmp_path / "new", int8=True)
    if own_vlm:
        return stage_version(_with_vlm(new), repo, "v1")
    return stage_version(new, repo, "v1", vlm_from=_with_vlm(_cnn_bundle(tmp_path / "live")))


def _reason(repo: Path, version: str) -> str:
    from catcascade.serving.model_repository.loading import VersionRejected, load_version

    with pytest.raises(VersionRejected) as err:  # refused before anything is built: no config or factory needed
        asyncio.run(load_version(version, repo, None, None, None))
    return err.value.reason


# -- what staging writes ---------------------------------------------------------------------

def test_a_staged_version_holds_every_file_itself_and_lists_each_sha256(repo, tmp_path):
    path = _staged(repo, tmp_path)
    files = load_bundle(path).manifest.files
    on_disk = {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert files == on_disk
    assert {"cnn.onnx", "cnn.int8.onnx", "vlm/adapter/adapter_model.safetensors", "vlm/adapter/adapter_config.json",
            "vlm/adapter/tokenizer_config.json"} <= set(files)
    assert not [p for p in path.rglob("*") if p.is_symlink()]
    # the adapter is a copy: changing the live bundle's adapter does not change v1
    live_weights = tmp_path / "live" / "vlm" / "adapter" / "adapter_model.safetensors"
    live_weights.write_bytes(b"changed")
    assert (path / "vlm" / "adapter" / "adapter_model.safetensors").read_bytes() != b"changed"
    load_bundle(path)


def test_an_adapter_folder_from_train_vlm_is_copied_in_and_hashed(repo, tmp_path):
    source = _with_vlm(_cnn_bundle(tmp_path / "new"))
    adapter = _adapter(tmp_path / "adapter-v2")
    path = stage_version(source, repo, "v2", adapter=adapter)
    files = load_bundle(path).manifest.files
    assert files["vlm/adapter/adapter_model.safetensors"] == sha256_file(adapter / "adapter_model.safetensors")
    assert files["vlm/adapter/tokenizer_config.json"] == sha256_file(adapter / "tokenizer_config.json")


def test_restaging_a_staged_version_verifies_it_and_lists_the_new_files(repo, tmp_path):
    v1 = _staged(repo, tmp_path)
    cascade = tmp_path / "cascade.json"
    cascade.write_text('{"escalation": {"metric": "margin", "threshold": 0.25}}')
    v2 = stage_version(v1, repo, "v2", cascade=cascade)
    assert load_bundle(v2).manifest.files == load_bundle(v1).manifest.files
    (v1 / "vlm" / "adapter" / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(ChecksumMismatch, match="adapter_config.json"):
        stage_version(v1, repo, "v3")
    with pytest.raises(ChecksumMismatch, match="adapter_config.json"):  # nor can its VLM section be taken
        stage_version(_cnn_bundle(tmp_path / "other"), repo, "v3", vlm_from=v1)
    assert list_versions(repo) == ["v1", "v2"]


# -- what staging refuses --------------------------------------------------------------------

def test_a_symlinked_cnn_is_refused(repo, tmp_path):
    source = _cnn_bundle(tmp_path / "new")
    outside = tmp_path / "elsewhere.onnx"
    os.replace(source / "cnn.onnx", outside)
    (source / "cnn.onnx").symlink_to(outside)  # same bytes, so the manifest's sha256 matches
    with pytest.raises(BundleError, match=r"cnn\.onnx in bundle .* is a link to .*elsewhere\.onnx"):
        stage_version(source, repo, "v1")
    assert _nothing_staged(repo)


def test_a_symlinked_folder_in_the_bundle_or_adapter_is_refused(repo, tmp_path):
    source = _with_vlm(_cnn_bundle(tmp_path / "new"))
    os.replace(source / "vlm" / "adapter", tmp_path / "adapter-elsewhere")
    (source / "vlm" / "adapter").symlink_to(tmp_path / "adapter-elsewhere")
    with pytest.raises(BundleError, match=r"vlm/adapter in bundle .* is a link"):
        stage_version(source, repo, "v1")
    adapter = _adapter(tmp_path / "adapter-v2")
    os.replace(adapter / "adapter_model.safetensors", tmp_path / "weights.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(BundleError, match=r"adapter_model\.safetensors in adapter folder .* is a link"):
        stage_version(_with_vlm(_cnn_bundle(tmp_path / "plain")), repo, "v1", adapter=adapter)
    assert _nothing_staged(repo)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_a_cnn_path_outside_the_bundle_is_refused(repo, tmp_path, where):
    source = _cnn_bundle(tmp_path / "new")
    outside = tmp_path / "shared" / "cnn.onnx"
    outside.parent.mkdir()
    outside.write_bytes((source / "cnn.onnx").read_bytes())
    path = str(outside) if where == "absolute" else "../shared/cnn.onnx"
    _edit_manifest(source, lambda m: m["cnn"].update(file=path))
    with pytest.raises(BundleError, match=r"cnn\.file .* is outside the bundle"):
        stage_version(source, repo, "v1")
    with pytest.raises(BundleError, match="outside the bundle"):  # nor does it load
        load_bundle(source)
    assert _nothing_staged(repo)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_an_adapter_folder_outside_the_bundle_is_refused(repo, tmp_path, where):
    source = _with_vlm(_cnn_bundle(tmp_path / "new"))
    outside = _adapter(tmp_path / "adapters" / "cats")
    path = str(outside) if where == "absolute" else "../adapters/cats"
    _edit_manifest(source, lambda m: m["vlm"].update(adapter_dir=path))
    with pytest.raises(BundleError, match=r"vlm\.adapter_dir .* is outside the bundle"):
        stage_version(source, repo, "v1")
    live = _with_vlm(_cnn_bundle(tmp_path / "live"))
    _edit_manifest(live, lambda m: m["vlm"].update(adapter_dir=path))
    with pytest.raises(BundleError, match=r"vlm\.adapter_dir .* is outside the bundle"):
        stage_version(_cnn_bundle(tmp_path / "plain"), repo, "v1", vlm_from=live)
    assert _nothing_staged(repo)


def test_a_manifest_adapter_folder_without_an_adapter_is_refused(repo, tmp_path):
    source = _with_vlm(_cnn_bundle(tmp_path / "new"))
    (source / "vlm" / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(BundleError, match="no adapter_config.json"):
        stage_version(source, repo, "v1")


def test_a_files_list_naming_a_path_outside_the_bundle_is_invalid(tmp_path):
    source = _cnn_bundle(tmp_path / "new")
    _edit_manifest(source, lambda m: m.update(files={"../../etc/passwd": "0" * 64}))
    with pytest.raises(BundleError, match="files entry .* is outside the bundle"):
        load_bundle(source, verify=False)


def test_the_command_exits_2_with_the_reason(repo, tmp_path, capsys):
    from catcascade.cli import main

    source = _cnn_bundle(tmp_path / "new")
    os.replace(source / "cnn.onnx", tmp_path / "elsewhere.onnx")
    (source / "cnn.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    assert main(["models", "stage", str(source), "--repository", str(repo), "--version", "v1"]) == 2
    err = capsys.readouterr().err
    assert "catcascade: error: cannot stage" in err and "cnn.onnx" in err and "is a link to" in err
    assert _nothing_staged(repo)
    (source / "cnn.onnx").unlink()
    os.replace(tmp_path / "elsewhere.onnx", source / "cnn.onnx")
    assert main(["models", "stage", str(source), "--repository", str(repo), "--version", "v1"]) == 0
    assert "1 files copied in, each one's sha256 in its manifest" in capsys.readouterr().out


# -- what loading refuses after staging ------------------------------------------------------

def _zero_weights(path: Path) -> None:
    save_file({k: np.zeros_like(v) for k, v in load_file(str(path)).items()}, str(path))


@pytest.mark.parametrize("change", ["zeroed adapter", "adapter config", "tokenizer", "int8", "base model config",
                                    "added file", "removed file", "file swapped for a link"])
def test_a_version_changed_after_staging_is_rejected_for_its_checksum(repo, tmp_path, change):
    path = _staged(repo, tmp_path, own_vlm=change == "base model config")
    adapter = path / "vlm" / "adapter"
    if change == "zeroed adapter":
        _zero_weights(adapter / "adapter_model.safetensors")
    elif change == "adapter config":
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 800, "peft_type": "LORA"}))
    elif change == "tokenizer":
        (adapter / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    elif change == "int8":
        (path / "cnn.int8.onnx").write_bytes(b"other int8 bytes")
    elif change == "base model config":
        (path / "vlm" / "base" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    elif change == "added file":
        (adapter / "adapter_model.bin").write_bytes(b"pickled weights")
    elif change == "removed file":
        (adapter / "tokenizer_config.json").unlink()
    else:
        copy = tmp_path / "same-bytes"
        copy.write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        (adapter / "adapter_model.safetensors").unlink()
        (adapter / "adapter_model.safetensors").symlink_to(copy)
    with pytest.raises(ChecksumMismatch):
        load_bundle(path)
    assert _reason(repo, "v1") == "checksum"


def test_an_unchanged_staged_version_passes_the_loader_check(repo, tmp_path):
    from catcascade.serving.model_repository.loading import VersionRejected, load_version

    _staged(repo, tmp_path)
    with pytest.raises(Exception) as err:  # past the checks, it needs the config it was not given
        asyncio.run(load_version("v1", repo, None, None, None))
    assert not isinstance(err.value, VersionRejected)


# -- older bundles ---------------------------------------------------------------------------

def test_an_older_bundle_without_a_files_list_loads_with_its_cnn_checked(repo, tmp_path):
    """Documented in docs/operations.md: only the CNN and INT8 are covered until it is staged."""
    old = _with_vlm(_cnn_bundle(tmp_path / "old", int8=True))
    assert "files" not in json.loads((old / "manifest.json").read_text())  # written as before
    _zero_weights(old / "vlm" / "adapter" / "adapter_model.safetensors")
    assert load_bundle(old).manifest.files is None  # its adapter is covered by no hash
    (old / "cnn.int8.onnx").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch, match="cnn.int8.onnx"):
        load_bundle(old)


def test_attaching_an_adapter_to_a_bundle_that_lists_its_files_relists_them(repo, tmp_path, capsys):
    """`train-vlm --attach` replaces the adapter of a bundle in place: a staged copy stays loadable."""
    import shutil

    from catcascade.training.train_vlm_command import _attach

    work = tmp_path / "work"
    shutil.copytree(_staged(repo, tmp_path), work)
    adapter = _adapter(tmp_path / "adapter-v2")
    _zero_weights(adapter / "adapter_model.safetensors")  # other weights than the staged ones
    _attach(work, adapter, "Qwen/Qwen2-VL-2B-Instruct", {"steps": 1})
    files = load_bundle(work).manifest.files
    assert files["vlm/adapter/adapter_model.safetensors"] == sha256_file(adapter / "adapter_model.safetensors")
