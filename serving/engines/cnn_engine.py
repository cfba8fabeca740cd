"""What CascadePipeline awaits from the CNN stage, whichever engine runs it.

The local engine is serving.batcher.DynamicBatcher (ONNX Runtime in this process); the Ray
engine (serving.engines.ray_engine) sends the same work to a Ray Serve deployment. An engine
that decodes where the model runs (``decodes_images``) is handed the encoded bytes instead of
the tensor, so the front door never decodes on the CNN path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from catcascade.errors import CatcascadeError
from catcascade.serving.batcher import BatchResult


class EngineUnavailableError(CatcascadeError, RuntimeError):
    """The CNN stage cannot be reached (e.g. its replicas died); clients get UNAVAILABLE."""


@dataclass(frozen=True)
class EncodedResult(BatchResult):
    """A BatchResult from an engine that also decoded the image (decode_ms is its time)."""

    decode_ms: float = 0.0


@runtime_checkable
class CnnEngine(Protocol):
    """The CNN stage. ``priority`` (lower first, serving/traffic/priorities.py) orders the
    engine's queue; ``deadline`` (a time.monotonic() instant) lets it shed a request that can no
    longer make it (DeadlineUnmeetableError) before the model works on it.

    ``decodes_images`` says which of the two calls the caller makes: ``submit`` (False) takes
    one preprocessed CHW float32 image, ``submit_encoded`` (True) the image's bytes, decoded and
    preprocessed where the model runs; an engine raises NotImplementedError for the other."""

    decodes_images: bool

    async def submit(self, x: np.ndarray, priority: int = 0, deadline: float | None = None) -> BatchResult: ...

    async def submit_encoded(self, data: bytes, priority: int = 0, deadline: float | None = None) -> EncodedResult: ...

    @property
    def depth(self) -> int:
        """Requests waiting for the model (a metric)."""

    @property
    def running(self) -> int:
        """Batches (local) or calls (remote) in the model right now (a metric)."""
