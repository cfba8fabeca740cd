"""The model bundle: a folder with manifest.json, the ONNX CNN and (optionally) the VLM.

Everything in it is ONNX, safetensors or JSON/YAML. Loading verifies each file's sha256, so a
server never runs a model other than the one the manifest describes.

    bundle/
      manifest.json        labels, preprocessing, temperature, cascade settings, versions
      cnn.onnx
      cnn.int8.onnx        optional: statically quantized INT8 copy (cnn_stage/quantization.py)
      vlm/base/            optional: a local HF VLM folder (or manifest names a hub id)
      vlm/adapter/         optional: a PEFT LoRA adapter served by vLLM under adapter_name

The files the manifest names (CNN, INT8, adapter) are inside the folder: a path that is
absolute or climbs out with ``..`` is refused. A bundle staged into a model repository also
lists the sha256 of *every* file in it (``files``: adapter weights and config, tokenizer,
anything else), and then holds no links; loading checks the whole list. Bundles without
``files`` (train-cnn and build-demo output, versions staged before the list existed) have their
CNN and INT8 checked and nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from catcascade.cnn_stage.preprocessing import PreprocessConfig
from catcascade.ensemble.confidence_histogram import ConfidenceHistogram
from catcascade.ensemble.config import CascadeConfig
from catcascade.errors import CatcascadeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _inside(path: str, what: str) -> str:
    """``path`` when it names something inside the bundle (relative, no ``..``), else ValueError."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or ".." in p.parts or p == PurePosixPath("."):
        raise ValueError(f"{what} {path!r} is outside the bundle: a bundle's files are inside its folder, "
                         f"named by a relative path without '..'")
    return path


class CnnSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: str
    file: str = "cnn.onnx"
    sha256: str
    temperature: float = Field(1.0, gt=0)
    int8_file: str | None = Field(None, description="optional INT8 ONNX model, same inputs and labels")
    int8_sha256: str | None = None
    confidence_histogram: ConfidenceHistogram | None = Field(
        None, description="calibrated top-1 probability on the validation set, binned: the reference the "
                          "server's drift index compares live traffic with (absent in older bundles)")

    @model_validator(mode="after")
    def _int8_pair(self) -> "CnnSpec":
        if (self.int8_file is None) != (self.int8_sha256 is None):
            raise ValueError("cnn.int8_file and cnn.int8_sha256 go together")
        _inside(self.file, "cnn.file")
        if self.int8_file is not None:
            _inside(self.int8_file, "cnn.int8_file")
        return self


class VlmSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="hub id, or a folder relative to the bundle")
    served_model_name: str = "catcascade-vlm"
    adapter_name: str | None = "cats"
    adapter_dir: str | None = Field(None, description="PEFT adapter folder relative to the bundle")
    scoring_mode: Literal["multiple_choice", "yes_no"] = "multiple_choice"
    max_model_len: int = 512

    @model_validator(mode="after")
    def _paths(self) -> "VlmSpec":
        if self.adapter_dir is not None:
            _inside(self.adapter_dir, "vlm.adapter_dir")
        if ".." in PurePosixPath(self.base_model).parts:  # a hub id never has one; outside folders go by absolute path
            raise ValueError(f"vlm.base_model {self.base_model!r} climbs out of the bundle with '..': name a hub id, "
                             f"a folder inside the bundle, or an absolute folder")
        return self


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    version: str
    labels: list[str] = Field(min_length=2)
    preprocess: dict
    cnn: CnnSpec
    cascade: CascadeConfig = CascadeConfig()
    vlm: VlmSpec | None = None
    provenance: dict = Field(default_factory=dict, description="library versions, training summary")
    files: dict[str, str] | None = Field(
        None, description="sha256 of every file in the bundle but manifest.json, by its path relative to the "
                          "bundle ('/'-separated): written by `catcascade models stage`, checked by load_bundle. "
                          "Absent in older and unstaged bundles, which have only the CNN and INT8 checked")

    @model_validator(mode="after")
    def _check(self) -> "BundleManifest":
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"bundle format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        learned = self.cascade.escalation.learned
        if learned is not None and learned.num_classes != len(self.labels):
            raise ValueError(f"cascade.escalation.learned was fitted for {learned.num_classes} classes, the bundle "
                             f"has {len(self.labels)} labels")
        sets = self.cascade.candidate_sets
        if sets is not None and sets.max_size > len(self.labels):
            raise ValueError(f"cascade.candidate_sets.max_size {sets.max_size} exceeds the {len(self.labels)} labels")
        PreprocessConfig.from_dict(self.preprocess)
        for name in self.files or {}:
            _inside(name, "files entry")
        return self


PROVENANCE_DISTRIBUTIONS = ("torch", "timm", "onnx", "onnxruntime", "accelerate", "safetensors",
                            "transformers", "peft", "trl")


def library_versions(dists: tuple[str, ...] = PROVENANCE_DISTRIBUTIONS) -> dict:
    """Installed versions of the libraries that shaped a bundle (for its provenance)."""
    import importlib.metadata as md

    out = {}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BundleError(CatcascadeError, RuntimeError):
    """The bundle folder is missing, malformed or does not match its manifest."""


class ChecksumMismatch(BundleError):
    """The bundle's files are not the ones its manifest lists: a file's sha256 differs, a listed
    file is gone, an unlisted one appeared, or a file was replaced by a link."""


def _walk(root: Path):
    """(path relative to ``root``, absolute path, is a link) of every non-directory entry under
    ``root``, without following links; a link to a folder is listed, not entered."""
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs):
            path = Path(folder) / name
            if path.is_symlink():
                yield path.relative_to(root).as_posix(), path, True
        for name in sorted(files):
            path = Path(folder) / name
            yield path.relative_to(root).as_posix(), path, path.is_symlink() or not path.is_file()


def links_in(folder: Path) -> list[str]:
    """The symbolic links (and other non-regular files) under ``folder``, relative names."""
    return [rel for rel, _, link in _walk(Path(folder)) if link]


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but its manifest, by relative path. Raises
    BundleError on a link: what a link points at can change without the bundle changing."""
    root = Path(root)
    out = {}
    for rel, path, link in _walk(root):
        if link:
            raise BundleError(f"{path} is a symbolic link or not a regular file: a bundle holds its own files")
        if rel != MANIFEST:
            out[rel] = sha256_file(path)
    return out


def check_files(root: Path, expected: dict[str, str]) -> None:
    """Raises ChecksumMismatch unless the files under ``root`` are exactly ``expected`` (the
    manifest's ``files``): same names, same sha256, no links."""
    root = Path(root)
    seen = set()
    for rel, path, link in _walk(root):
        if rel == MANIFEST:
            continue
        if link:
            raise ChecksumMismatch(f"{rel} in {root} is a symbolic link or not a regular file where the manifest "
                                   f"lists files by sha256: a staged bundle holds its own files")
        if rel not in expected:
            raise ChecksumMismatch(f"{rel} in {root} is not in the manifest's files (sha256 list): added after "
                                   f"staging")
        if sha256_file(path) != expected[rel]:
            raise ChecksumMismatch(f"sha256 of {rel} does not match the manifest")
        seen.add(rel)
    gone = sorted(set(expected) - seen)
    if gone:
        raise ChecksumMismatch(f"{gone[0]} is listed in the manifest's files (sha256) but is missing from {root}"
                               + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""))


class Bundle:
    def __init__(self, root: Path, manifest: BundleManifest):
        self.root = root
        self.manifest = manifest

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest.preprocess)

    @property
    def cnn_path(self) -> Path:
        return self.root / self.manifest.cnn.file

    @property
    def cnn_int8_path(self) -> Path | None:
        """The optional INT8 model (None when the bundle has none)."""
        f = self.manifest.cnn.int8_file
        return self.root / f if f else None

    @property
    def version_string(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    def vlm_base_path(self) -> str | None:
        """A local folder path when the base model ships inside the bundle, else the hub id."""
        if self.manifest.vlm is None:
            return None
        local = self.root / self.manifest.vlm.base_model
        return str(local) if local.exists() else self.manifest.vlm.base_model

    def vlm_adapter_path(self) -> Path | None:
        vlm = self.manifest.vlm
        return self.root / vlm.adapter_dir if vlm and vlm.adapter_dir else None

    def record_files(self) -> None:
        """Sets the manifest's ``files`` to the sha256 of every file now in the folder (call
        save() to write it). Raises BundleError on a link."""
        self.manifest.files = file_hashes(self.root)

    def save(self) -> None:
        unlisted = {"files"} if self.manifest.files is None else None  # older bundles' manifests stay as they were
        (self.root / MANIFEST).write_text(self.manifest.model_dump_json(indent=2, exclude=unlisted) + "\n")


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Reads and validates ``root``'s manifest; with ``verify``, checks the CNN's and INT8's
    sha256 and, when the manifest lists ``files``, every file's (ChecksumMismatch)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in {root} (build one with `catcascade build-demo` or `catcascade train-cnn`)")
    try:
        manifest = BundleManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise BundleError(f"invalid {path}: {e}") from None
    bundle = Bundle(root, manifest)
    if not bundle.cnn_path.is_file():
        raise BundleError(f"bundle CNN file missing: {bundle.cnn_path}")
    if bundle.cnn_path.suffix != ".onnx":
        raise BundleError(f"CNN must be an .onnx file, got {bundle.cnn_path.name}")
    if verify and sha256_file(bundle.cnn_path) != manifest.cnn.sha256:
        raise ChecksumMismatch(f"sha256 of {bundle.cnn_path.name} does not match the manifest")
    int8 = bundle.cnn_int8_path
    if int8 is not None:
        if not int8.is_file() or int8.suffix != ".onnx":
            raise BundleError(f"bundle INT8 CNN file missing or not .onnx: {int8}")
        if verify and sha256_file(int8) != manifest.cnn.int8_sha256:
            raise ChecksumMismatch(f"sha256 of {int8.name} does not match the manifest")
    if verify and manifest.files is not None:
        check_files(root, manifest.files)
    return bundle
