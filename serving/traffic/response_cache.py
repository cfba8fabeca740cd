"""The response cache's parts: the key, a bounded LRU, and single-flight for identical requests
in flight together (the front door's cache stage, serving/front_door/caching.py, puts them
together per tenant and version).

The key is the sha256 of the image bytes with the escalation mode, top_k and the answering
version's content key, so a new bundle, calibration, policy or adapter never answers from an
old one's entries. The LRU is bounded in entries and in bytes (the serialized size of the
stored responses).

Single-flight: while one request for a key is being computed, identical requests wait for its
answer instead of running the models again (100 concurrent copies of one image cost one CNN
and at most one VLM call). The computation runs in its own task, so the first caller going
away does not cancel it for the others.
"""
from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class ResponseCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="answer repeated images from memory; cached answers say so "
                          "(ClassifyResponse.cached)")
    max_entries: int = Field(10_000, ge=1, description="per tenant")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="bound on a tenant's stored responses' serialized size")


def cache_key(image: bytes, mode: int, top_k: int, model_version: str) -> bytes:
    """sha256 over the image's own sha256, the mode, top_k and the model version."""
    h = hashlib.sha256(hashlib.sha256(image).digest())
    h.update(f"|{int(mode)}|{int(top_k)}|{model_version}".encode())
    return h.digest()


class ResponseCache(Generic[T]):
    """LRU over (value, size) pairs, bounded by entry count and total size."""

    def __init__(self, config: ResponseCacheConfig, size_of: Callable[[T], int]):
        self.config = config
        self._size_of = size_of
        self._entries: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.shared = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: T) -> bool:
        """Stores ``value``; False when it alone is larger than the byte bound."""
        size = int(self._size_of(value))
        if size > self.config.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while len(self._entries) > self.config.max_entries or self.bytes > self.config.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
            self.evictions += 1
        return True


class SingleFlight(Generic[T]):
    """Runs one computation per key at a time; callers that arrive meanwhile share its result."""

    def __init__(self):
        self._flights: dict[Hashable, asyncio.Task] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``(result, shared)``: shared is False for the caller whose call ran ``compute``.
        An exception from ``compute`` reaches every caller that waited on it."""
        task = self._flights.get(key)
        shared = task is not None
        if task is None:
            task = asyncio.ensure_future(compute())
            self._flights[key] = task
            task.add_done_callback(lambda t: self._landed(key, t))
        return await asyncio.shield(task), shared

    def _landed(self, key: Hashable, task: asyncio.Task) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone away before it landed
