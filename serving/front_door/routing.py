"""Routing: which version answers a request. One bundle has one; the model repository
(serving/model_repository/router.py) picks the live version or the candidate per request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import CascadeEngine, CascadeResult, ClassifyRequest


@dataclass(frozen=True)
class Route:
    """Where one request goes: the engine that answers it, the versions its answer names, and
    ``run``, which computes on that engine (holding the version while it runs, counting the
    answer, sending a shadow copy) and is only called on a cache miss."""

    engine: CascadeEngine
    versions: pb.ModelVersions
    run: Callable[[ClassifyRequest], Awaitable[CascadeResult]]


class VersionRouter(Protocol):
    """What the front door serves: ``route`` picks a version for a request; ``live_engine`` is the
    version health, drift and validation follow; ``model_info`` is what GetModelInfo says."""

    def route(self, request: ClassifyRequest) -> Route: ...

    def live_engine(self) -> CascadeEngine: ...

    def model_info(self) -> pb.ModelInfo: ...


class SingleVersion:
    """One bundle: every request goes to its engine."""

    def __init__(self, engine: CascadeEngine):
        self.engine = engine
        self._route = Route(engine, engine.identity.versions, engine.classify)

    def route(self, request: ClassifyRequest) -> Route:
        return self._route

    def live_engine(self) -> CascadeEngine:
        return self.engine

    def model_info(self) -> pb.ModelInfo:
        return self.engine.identity.info
