"""Routing: which version answers a request. One bundle has one; the model repository
(serving/model_repository/router.py) picks the live version or the candidate per request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import CascadeEngine, CascadeResult, ClassifyRequest
from catcascade.serving.request_errors import UnknownVersionError


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

    def served_versions(self) -> tuple[str, ...]:
        """The versions a request may pin by name (``ClassifyRequest.model_version``)."""


class SingleVersion:
    """One bundle: every request goes to its engine."""

    def __init__(self, engine: CascadeEngine):
        self.engine = engine
        self._route = Route(engine, engine.identity.versions, engine.classify)

    def route(self, request: ClassifyRequest) -> Route:
        if request.model_version:
            raise UnknownVersionError(f"model_version {request.model_version!r} is not served: this server serves "
                                      "one bundle; versions are pinned under a model repository (serve --models)")
        return self._route

    def served_versions(self) -> tuple[str, ...]:
        return ()

    def live_engine(self) -> CascadeEngine:
        return self.engine

    def model_info(self) -> pb.ModelInfo:
        return self.engine.identity.info
