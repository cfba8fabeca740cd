"""The model bundle: a folder with manifest.json, the ONNX CNN and (optionally) the VLM.

Everything in it is ONNX, safetensors or JSON/YAML. Loading verifies each file's sha256, so a
server never runs a model other than the one the manifest describes.

    bundle/
      manifest.json        labels, preprocessing, temperature, cascade settings, versions
      cnn.onnx
      cnn.int8.onnx        optional: statically quantized INT8 copy (cnn_stage/quantization.py)
      vlm/base/            optional: a local HF VLM folder (or manifest names a hub id)
      vlm/adapter/         optional: a PEFT LoRA adapter served by vLLM under adapter_name
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from catcascade.cnn_stage.preprocessing import PreprocessConfig
from catcascade.ensemble.confidence_histogram import ConfidenceHistogram
from catcascade.ensemble.config import CascadeConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


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
        return self


class VlmSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="hub id, or a folder relative to the bundle")
    served_model_name: str = "catcascade-vlm"
    adapter_name: str | None = "cats"
    adapter_dir: str | None = Field(None, description="PEFT adapter folder relative to the bundle")
    scoring_mode: Literal["multiple_choice", "yes_no"] = "multiple_choice"
    max_model_len: int = 512


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


class BundleError(RuntimeError):
    """The bundle folder is missing, malformed or does not match its manifest."""


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

    def save(self) -> None:
        (self.root / MANIFEST).write_text(self.manifest.model_dump_json(indent=2) + "\n")


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
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
        raise BundleError(f"sha256 of {bundle.cnn_path.name} does not match the manifest")
    int8 = bundle.cnn_int8_path
    if int8 is not None:
        if not int8.is_file() or int8.suffix != ".onnx":
            raise BundleError(f"bundle INT8 CNN file missing or not .onnx: {int8}")
        if verify and sha256_file(int8) != manifest.cnn.int8_sha256:
            raise BundleError(f"sha256 of {int8.name} does not match the manifest")
    return bundle
