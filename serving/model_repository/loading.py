"""One version from the repository, made ready to take traffic: verified, built, warmed.

A version is rejected, with a reason a metric can count and a message a person can act on,
when its manifest is missing or invalid, a file's sha256 differs from the manifest, ONNX
Runtime cannot load the model, the model's outputs do not match the manifest's labels, or
vLLM refuses its LoRA adapter. Nothing of a rejected version is left running.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from catcascade.cnn_stage.preprocessing import preprocess
from catcascade.ensemble.bundle import BundleError, ChecksumMismatch, load_bundle
from catcascade.ensemble.escalation_policy import EscalationMode
from catcascade.errors import CatcascadeError
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import ClassifyRequest
from catcascade.serving.pipeline import CascadePipeline
from catcascade.serving.model_repository.repository import Fingerprint, version_fingerprint

log = logging.getLogger(__name__)

REASONS = ("checksum", "manifest", "missing", "onnx", "labels", "adapter", "warmup", "routing")


class VersionRejected(CatcascadeError, RuntimeError):
    """A version that cannot take traffic; ``reason`` is one of REASONS."""

    def __init__(self, version: str, reason: str, message: str):
        super().__init__(f"version {version!r} rejected ({reason}): {message}")
        self.version = version
        self.reason = reason
        self.message = message


def _bundle_reason(e: BundleError) -> str:
    text = str(e)
    if isinstance(e, ChecksumMismatch) or "sha256" in text:
        return "checksum"
    if "missing" in text or "no manifest" in text:
        return "missing"
    return "manifest"


@dataclass(eq=False)
class ServedVersion:
    """A loaded version: its pipeline and what it tells clients about itself."""

    name: str
    fingerprint: Fingerprint
    pipeline: CascadePipeline
    versions: pb.ModelVersions
    info: pb.ModelInfo
    adapter: str | None
    stack: contextlib.AsyncExitStack
    spinning: bool = True
    """Whether ONNX Runtime's threads spin between batches (live versions only, see load_version)."""
    inflight: int = 0
    retired: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _routed: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def labels(self) -> list[str]:
        return list(self.info.labels)

    def routed_versions(self, route: str) -> pb.ModelVersions:
        """The versions message for a response that took ``route`` (live or canary)."""
        if route not in self._routed:
            v = pb.ModelVersions()
            v.CopyFrom(self.versions)
            v.route = route
            self._routed[route] = v
        return self._routed[route]

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Waits until no request runs on this version; False when ``timeout_s`` ran out."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self, adapters=None) -> None:
        """Stops the batcher, closes the VLM client, gives the adapter back."""
        try:
            await self.stack.aclose()
        finally:
            if self.adapter and adapters is not None:
                await adapters.release(self.adapter)


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


async def warm_up(pipeline, labels: list[str], preprocess_config, batches: int) -> None:
    """Runs ``batches`` CNN batches (sizes 1, 2, 4, ...) and one request end to end, checking
    that the model gives one finite score per label. Raises VersionRejected-ready errors:
    ValueError for outputs that do not match the labels."""
    x = preprocess(Image.new("RGB", (preprocess_config.image_size,) * 2, (128, 128, 128)), preprocess_config)
    cnn = pipeline.cnn
    if not cnn.decodes_images:
        for i in range(batches):
            results = await asyncio.gather(*(cnn.submit(x) for _ in range(min(2**i, 16))))
            for res in results:
                out = np.asarray(res.output)
                if out.shape != (len(labels),):
                    raise ValueError(f"the CNN outputs {out.shape[-1] if out.ndim else 0} scores per image but the "
                                     f"manifest lists {len(labels)} labels")
                if not np.all(np.isfinite(out)):
                    raise ValueError("the CNN outputs non-finite scores")
    await pipeline.classify(ClassifyRequest(_png(preprocess_config.image_size), mode=EscalationMode.NEVER, tenant=None))


async def load_version(name: str, repository: Path, cfg, metrics, factory: Callable, adapters=None,
                       warmup_batches: int = 2, live: bool = True) -> ServedVersion:
    """Loads and verifies ``repository/name`` once, then builds it with ``factory``
    (serving.engine_builder.build_engine: an async context manager over (config, bundle,
    metrics) yielding the engine); raises VersionRejected.

    A candidate (``live=False``) is built with ONNX Runtime's thread spinning off: spinning
    threads of a second session steal the cores the live version needs between its batches
    (measured on 2 cores: a 25% shadow cut live throughput to 0.45x with spinning, 0.77x
    without; docs/bench/lifecycle).
    """
    folder = Path(repository) / name
    if not (folder / "manifest.json").is_file():
        raise VersionRejected(name, "missing", f"no bundle at {folder} (no manifest.json)")
    fingerprint = version_fingerprint(folder)
    try:
        bundle = await asyncio.to_thread(load_bundle, folder, True)
    except BundleError as e:
        raise VersionRejected(name, _bundle_reason(e), str(e)) from None
    adapter = None
    spec, adapter_dir = bundle.manifest.vlm, bundle.vlm_adapter_path()
    spinning = cfg.cnn_spinning and live
    update: dict = {"bundle": folder, "cnn_spinning": spinning}
    if adapters is not None and cfg.vlm.backend == "vllm" and cfg.vlm.model is None and spec and adapter_dir:
        from catcascade.vlm_stage.vllm_client import AdapterLoadError

        try:
            adapter = await adapters.acquire(spec.adapter_name or "adapter", adapter_dir)
        except AdapterLoadError as e:
            raise VersionRejected(name, "adapter", str(e)) from None
        update["vlm"] = cfg.vlm.model_copy(update={"model": adapter})
    stack = contextlib.AsyncExitStack()
    try:
        try:
            pipeline = await stack.enter_async_context(factory(cfg.model_copy(update=update), bundle, metrics))
        except BundleError as e:
            raise VersionRejected(name, _bundle_reason(e), str(e)) from None
        except Exception as e:
            onnx = type(e).__module__.startswith("onnxruntime")
            raise VersionRejected(name, "onnx" if onnx else "warmup", f"{type(e).__name__}: {e}") from None
        try:
            await warm_up(pipeline, bundle.labels, pipeline.preprocess_config, warmup_batches)
        except ValueError as e:
            raise VersionRejected(name, "labels", str(e)) from None
        except Exception as e:
            onnx = type(e).__module__.startswith("onnxruntime")
            raise VersionRejected(name, "onnx" if onnx else "warmup", f"{type(e).__name__}: {e}") from None
    except VersionRejected:
        await stack.aclose()
        if adapter is not None:
            await adapters.release(adapter)
        raise
    v = pb.ModelVersions()
    v.CopyFrom(pipeline.identity.versions)
    v.model_version = name
    i = pb.ModelInfo()
    i.CopyFrom(pipeline.identity.info)
    i.versions.CopyFrom(v)
    return ServedVersion(name, fingerprint, pipeline, v, i, adapter, stack, spinning)
