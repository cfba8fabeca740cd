"""Routes each request to the live version or the candidate, and swaps versions without
dropping any.

The router is the front door's VersionRouter for a repository (and a CascadeEngine itself, for
callers without a front door). A request picks its version once, when it arrives (``route``),
and finishes on it whatever happens next: a swap only changes which
version the *next* request picks, and the replaced version is released after its last
request (bounded by ``drain_timeout_s``). A new version takes traffic only once it is loaded,
verified and warmed (serving.model_repository.loading); if it cannot be, the version that
was serving goes on serving.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from catcascade.cnn_stage.native_memory import release_free_memory
from catcascade.cnn_stage.preprocessing import InvalidImageError
from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import CascadeEngine, CascadeResult, ClassifyRequest, EngineIdentity
from catcascade.serving.front_door.routing import Route
from catcascade.serving.model_repository.agreement import AgreementWindow
from catcascade.serving.model_repository.config import ModelsConfig, Routing, RoutingFileEmpty, read_routing, write_routing
from catcascade.serving.model_repository.loading import ServedVersion, VersionRejected, load_version
from catcascade.serving.model_repository.metrics import RepositoryMetrics
from catcascade.serving.model_repository.repository import Fingerprint, list_versions, version_fingerprint
from catcascade.serving.model_repository.traffic_split import in_share
from catcascade.serving.pipeline import DeadlineExceededError
from catcascade.serving.request_errors import UnknownVersionError

log = logging.getLogger(__name__)
MODES = {"canary": pb.TRAFFIC_MODE_CANARY, "shadow": pb.TRAFFIC_MODE_SHADOW}


def give_back_memory() -> None:
    """After a version is released: its CNN session, batch buffers and pipeline were native
    memory that glibc keeps in its arenas once freed (``malloc_trim`` returns it), so without
    this the server's RSS ratchets up by tens of MB with every few loads of a version
    (measured with a swap every 10 s: 330 to 500 MB in 4 minutes, Python's own heap flat at
    60 MB; with the trim, 280 to 340 MB and level)."""
    gc.collect()
    release_free_memory()


@dataclass
class ReloadOutcome:
    loaded: list[str] = field(default_factory=list)
    rejected: list[VersionRejected] = field(default_factory=list)
    changed: bool = False


class ModelRouter:
    """The model repository at run time: the live version, the candidate, the versions
    draining, and how requests are split between them."""

    def __init__(self, models: ModelsConfig, cfg, metrics, factory: Callable, adapters=None):
        """``cfg`` is the ServeConfig each version is built with (its bundle replaced by the
        version's folder); ``factory`` is serving.engine_builder.build_engine."""
        self.models = models
        self.cfg = cfg
        self.service_metrics = metrics
        self.metrics = RepositoryMetrics(metrics.registry)
        self.factory = factory
        self.adapters = adapters
        if adapters is not None:
            adapters.on_change = self.metrics.adapters.set
        self.live: ServedVersion | None = None
        self.candidate: ServedVersion | None = None
        self.routing = Routing()
        self.window = AgreementWindow("", None)
        self.rejected: dict[str, tuple[Fingerprint, VersionRejected]] = {}
        self.draining: set[ServedVersion] = set()
        self._lock = asyncio.Lock()
        self._shadows: set[asyncio.Task] = set()
        self._retiring: set[asyncio.Task] = set()
        self._shadow_inflight = 0
        self._model_info: pb.ModelInfo | None = None
        self.watcher = None
        self.admin_port: int | None = None

    # --- the front door's VersionRouter, and the CascadeEngine interface -----------------

    def live_engine(self) -> CascadeEngine:
        return self.live.pipeline

    @property
    def labels(self) -> list[str]:
        return self.live.pipeline.labels

    @property
    def identity(self) -> EngineIdentity:
        """The live version's, with the candidate in its info."""
        return EngineIdentity(self.live.routed_versions("live"), self.model_info(), self.live.pipeline.identity.content_key,
                              self.live.pipeline.identity.confidence_reference)

    def vlm_serving(self) -> bool:
        return self.live.pipeline.vlm_serving()

    def model_info(self) -> pb.ModelInfo:
        """The live version's info, with the candidate and its share."""
        if self._model_info is None:
            info = pb.ModelInfo()
            info.CopyFrom(self.live.info)
            info.versions.CopyFrom(self.live.routed_versions("live"))
            if self.candidate is not None:
                info.candidate.CopyFrom(self.candidate.versions)
                info.candidate_mode = MODES[self.routing.mode]
                info.candidate_share = self.routing.share
            self._model_info = info
        return self._model_info

    # --- requests ------------------------------------------------------------------------

    def route(self, request: ClassifyRequest) -> Route:
        """The version ``request`` runs on: the candidate for a canary's share of the images,
        else the live version; in shadow mode, the candidate's share also gets a copy."""
        live, candidate, routing = self.live, self.candidate, self.routing
        if request.model_version:
            return self._pinned(request.model_version)
        version, name = live, "live"
        picked = candidate is not None and in_share(request.image, routing.share, routing.seed)
        if picked and routing.mode == "canary":
            version, name = candidate, "canary"
        shadow = candidate if picked and routing.mode == "shadow" else None
        return Route(version.pipeline, version.routed_versions(name),
                     functools.partial(self._run, version, name, shadow))

    def served_versions(self) -> tuple[str, ...]:
        return tuple(v.name for v in (self.live, self.candidate) if v is not None)

    def _pinned(self, name: str) -> Route:
        """A request that names its version runs there, and no shadow copy is made of it."""
        version = next((v for v in (self.live, self.candidate) if v is not None and v.name == name), None)
        if version is None:
            raise UnknownVersionError(f"model_version {name!r} is not served; served versions: "
                                      f"{', '.join(self.served_versions())}")
        return Route(version.pipeline, version.routed_versions("pinned"),
                     functools.partial(self._run, version, "pinned", None))

    async def classify(self, request: ClassifyRequest) -> CascadeResult:
        return await self.route(request).run(request)

    async def _run(self, version: ServedVersion, route: str, shadow: ServedVersion | None,
                   request: ClassifyRequest) -> CascadeResult:
        version.enter()
        try:
            result = await version.pipeline.classify(request)
        except BaseException as e:
            self._count_error(version, route, e)
            raise
        finally:
            version.exit()
        self._count(version, route, result)
        result = dataclasses.replace(result, versions=version.routed_versions(route))
        if shadow is not None:
            # No client waits on the copy, and no tenant pays for it: no deadline, no budget, no
            # rationale nobody reads, no admission ticket.
            self._shadow(shadow, result, dataclasses.replace(request, deadline=None, tenant=None, explain=False,
                                                             on_cnn_done=None))
        return result

    def _stats(self, version: ServedVersion):
        """The window's counters for ``version``; None for a version already replaced."""
        if version is self.live:
            return self.window.live
        if version is self.candidate:
            return self.window.candidate
        return None

    def _count(self, version: ServedVersion, route: str, result) -> None:
        ms = result.timings.total_ms
        self.metrics.requests.labels(version.name, route, "ok").inc()
        self.metrics.latency_ms.labels(version.name, route).observe(ms)
        if result.escalated:
            self.metrics.escalated.labels(version.name, route).inc()
        stats = self._stats(version)
        if stats is not None:
            stats.record(ms, result.escalated)

    def _count_error(self, version: ServedVersion, route: str, e: BaseException) -> None:
        outcome = type(e).__name__ if isinstance(e, Exception) else "CancelledError"
        self.metrics.requests.labels(version.name, route, outcome).inc()
        stats = self._stats(version)
        if stats is not None and not isinstance(e, (InvalidImageError, DeadlineExceededError, asyncio.CancelledError)):
            stats.record_error()  # a bad image or a client that gave up says nothing about the version

    def _shadow(self, candidate: ServedVersion, live_result: CascadeResult, request: ClassifyRequest) -> None:
        if self._shadow_inflight >= self.models.shadow_max_concurrency:
            self.metrics.shadow_dropped.labels(candidate.name).inc()
            if candidate is self.candidate:
                self.window.shadow_dropped += 1
            return
        self._shadow_inflight += 1
        candidate.enter()
        self._spawn(self._run_shadow(candidate, self.window, live_result, request), self._shadows)

    async def _run_shadow(self, candidate: ServedVersion, window: AgreementWindow, live_result: CascadeResult,
                          request: ClassifyRequest) -> None:
        """The candidate's answer to a copy of a live request: counted and compared (in the
        window it started in, if still open), never returned. No client deadline applies;
        ``shadow_timeout_s`` bounds it."""
        try:
            result = await asyncio.wait_for(candidate.pipeline.classify(request), self.models.shadow_timeout_s)
        except Exception as e:
            self._count_error(candidate, "shadow", e)
            log.debug("shadow copy on %s failed: %r", candidate.name, e)
            return
        finally:
            candidate.exit()
            self._shadow_inflight -= 1
        self._count(candidate, "shadow", result)
        if window is self.window:
            agree = window.compare(live_result.labels.labels[0], result.labels.labels[0])
            live_name = window.live.version
            self.metrics.shadow_comparisons.labels(live_name, candidate.name, "agree" if agree else "disagree").inc()
            self.metrics.top1_agreement.labels(live_name, candidate.name).set(window.top1_agreement)

    @staticmethod
    def _spawn(coro, tasks: set) -> asyncio.Task:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # --- reloads and swaps ---------------------------------------------------------------

    @property
    def repository(self) -> Path:
        return Path(self.models.repository)

    async def reload(self, routing: Routing | None = None, *, strict: bool = False, persist: bool = False,
                     cause: str = "reload") -> ReloadOutcome:
        """Brings the served versions in line with ``routing`` (default: the routing file).

        Versions already loaded and unchanged on disk are kept; others are loaded, verified
        and warmed before any traffic moves. A rejected version leaves the one serving in
        place (``strict``: nothing changes and VersionRejected is raised). ``persist`` writes
        ``routing`` to the routing file once everything it names is ready.
        """
        async with self._lock:
            return await self._reload(routing, strict, persist, cause)

    async def _reload(self, routing: Routing | None, strict: bool, persist: bool, cause: str) -> ReloadOutcome:
        """reload() with self._lock held."""
        outcome = ReloadOutcome()
        if routing is None:
            try:
                routing = read_routing(self.models.routing_path) or Routing()
            except RoutingFileEmpty:
                if self.live is not None:  # caught mid-write: the next change of the file is read
                    log.info("%s is empty (a write in progress?): the serving versions stay",
                             self.models.routing_file)
                    return outcome
                routing = Routing()  # at start-up, as without a file: the newest version
            except ValueError as e:
                err = VersionRejected(self.models.routing_file, "routing", str(e))
                self._rejected(err, None, outcome)
                if self.live is None or strict:
                    raise err from None
                return outcome
            self.rejected.pop(self.models.routing_file, None)
        live_name = routing.live or self._newest()
        fresh: list[ServedVersion] = []
        try:
            new_live = await self._obtain(live_name, outcome, fresh, live=True)
            if new_live is None:
                if strict or self.live is None:
                    raise outcome.rejected[-1]
                new_live = self.live
            new_candidate = None
            if routing.candidate is not None and routing.candidate != new_live.name:
                new_candidate = await self._obtain(routing.candidate, outcome, fresh, live=False)
                if new_candidate is None and strict:
                    raise outcome.rejected[-1]
            if persist:
                write_routing(self.models.routing_path, routing)
        except BaseException:
            for v in fresh:
                await v.close(self.adapters)
            raise
        effective = routing.model_copy(update={"live": new_live.name,
                                               "candidate": new_candidate.name if new_candidate else None})
        outcome.changed = self._swap(new_live, new_candidate, effective, cause)
        for v in fresh:
            if v is not new_live and v is not new_candidate:
                await v.close(self.adapters)
        return outcome

    def _newest(self) -> str:
        versions = list_versions(self.repository)
        if not versions:
            raise VersionRejected("", "missing", f"no bundles in the model repository {self.repository} "
                                  "(expected DIR/<version>/manifest.json)")
        return versions[-1]

    async def _obtain(self, name: str, outcome: ReloadOutcome, fresh: list, live: bool) -> ServedVersion | None:
        """The loaded version ``name`` for a role: the one loaded if unchanged on disk and built
        for that role, else a new load (None when rejected, recorded in ``outcome``). A promoted
        candidate is rebuilt as a live version (thread spinning, see load_version) unless the
        two builds would be the same."""
        spinning = self.cfg.cnn_spinning and live
        for v in (self.live, self.candidate, *fresh):
            if (v is not None and v.name == name and v.spinning == spinning
                    and v.fingerprint == version_fingerprint(self.repository / name)):
                return v
        t0 = time.perf_counter()
        try:
            version = await load_version(name, self.repository, self.cfg, self.service_metrics, self.factory,
                                         self.adapters, self.models.warmup_batches, live=live)
        except VersionRejected as e:
            self._rejected(e, name, outcome)
            return None
        fresh.append(version)
        self.rejected.pop(name, None)
        outcome.loaded.append(name)
        self.metrics.loads.labels(name, "loaded", "").inc()
        log.info("model version %s loaded, verified and warmed in %.1f s (%s, %s%s)", name,
                 time.perf_counter() - t0, version.versions.bundle, version.versions.cnn,
                 f", {version.versions.vlm}" if version.versions.vlm else "")
        return version

    def _rejected(self, e: VersionRejected, name: str | None, outcome: ReloadOutcome) -> None:
        outcome.rejected.append(e)
        fp = version_fingerprint(self.repository / name) if name else None
        self.rejected[e.version] = (fp, e)
        self.metrics.loads.labels(e.version or "-", "rejected", e.reason).inc()
        serving = f"; {self.live.name} keeps serving" if self.live is not None else ""
        log.error("model version %s rejected (%s): %s%s", e.version or "-", e.reason, e.message, serving,
                  extra={"model_version": e.version, "reason": e.reason})

    def _swap(self, live: ServedVersion, candidate: ServedVersion | None, routing: Routing, cause: str) -> bool:
        """Points new requests at ``live``/``candidate`` (one assignment each, on the event
        loop: no request sees half a swap) and releases what is no longer used."""
        changed = live is not self.live or candidate is not self.candidate
        old = [v for v in (self.live, self.candidate) if v is not None and v is not live and v is not candidate]
        split_changed = (routing.mode, routing.share, routing.seed) != (self.routing.mode, self.routing.share,
                                                                         self.routing.seed)
        previous = (self.live.name if self.live else None, self.candidate.name if self.candidate else None)
        old_mode = self.routing.mode
        self.live, self.candidate, self.routing = live, candidate, routing
        self._model_info = None
        if changed or split_changed:
            self.window = AgreementWindow(live.name, candidate.name if candidate else None)
            for name, role in ((previous[0], "live"), (previous[1], old_mode)):
                if name:
                    self.metrics.serving.labels(name, role).set(0)
            self.metrics.serving.labels(live.name, "live").set(1)
            if candidate is not None:
                self.metrics.serving.labels(candidate.name, routing.mode).set(1)
            self._point_gauges()
        if changed:
            self.metrics.swaps.inc()
            log.info("models now: live %s%s (%s; before: live %s, candidate %s)", live.name,
                     f", candidate {candidate.name} ({routing.mode}, {routing.share:.0%})" if candidate else "",
                     cause, previous[0], previous[1],
                     extra={"model_version": live.name, "candidate": candidate.name if candidate else None})
        for v in old:
            v.retired = True
            self.draining.add(v)
            self._spawn(self._retire(v), self._retiring)
        return changed

    def _point_gauges(self) -> None:
        """The service's CNN and VLM gauges follow the live version."""
        m = self.service_metrics
        m.queue_depth.set_function(lambda: self.live.pipeline.cnn.depth if self.live else 0)
        m.batches_running.set_function(lambda: self.live.pipeline.cnn.running if self.live else 0)
        m.inflight_escalations.set_function(lambda: self.live.pipeline.inflight_escalations if self.live else 0)

    async def _retire(self, version: ServedVersion) -> None:
        if not await version.drain(self.models.drain_timeout_s):
            log.warning("model version %s still had %d requests after %.0f s; releasing it", version.name,
                        version.inflight, self.models.drain_timeout_s)
        try:
            await version.close(self.adapters)
        finally:
            self.draining.discard(version)
        log.info("model version %s released", version.name, extra={"model_version": version.name})
        del version  # the last reference, bar cycles: give_back_memory collects those
        await asyncio.to_thread(give_back_memory)

    # --- admin operations (each one change of the routing file) -------------------------

    async def _change(self, make_routing: Callable[[], Routing], cause: str) -> ReloadOutcome:
        """One admin change: the new routing is made from the one in force under the reload
        lock (two calls never both start from the same state), then applied strictly and
        written to the routing file."""
        async with self._lock:
            return await self._reload(make_routing(), strict=True, persist=True, cause=cause)

    def _with(self, **changes) -> Routing:
        base = self.routing.model_copy(update={"live": self.live.name}).model_dump()
        return Routing.model_validate({**base, **changes})

    async def set_candidate(self, version: str | None, mode: str = "shadow", share: float = 0.1) -> ReloadOutcome:
        return await self._change(lambda: self._with(candidate=version or None, mode=mode, share=share),
                                  f"candidate set to {version or 'none'}")

    async def promote(self, version: str | None = None) -> ReloadOutcome:
        def routing() -> Routing:
            target = version or (self.candidate.name if self.candidate else None)
            if not target:
                raise ValueError("no candidate to promote (name a version, or set a candidate first)")
            if target == self.live.name:
                raise ValueError(f"{target} is already live")
            return self._with(live=target, candidate=None, previous=self.live.name)

        return await self._change(routing, f"{version or 'the candidate'} promoted")

    async def rollback(self) -> ReloadOutcome:
        def routing() -> Routing:
            if not self.routing.previous:
                raise ValueError("nothing to roll back to (no previous version recorded; Promote records one)")
            return self._with(live=self.routing.previous, candidate=None, previous=None)

        return await self._change(routing, "rolled back")

    # --- reports -------------------------------------------------------------------------

    def states(self) -> list[tuple[str, str, ServedVersion | None, str]]:
        """(version, state, loaded version or None, error) for every version on disk or loaded."""
        names = list_versions(self.repository)
        loaded = {v.name: v for v in self.draining}
        for v in (self.candidate, self.live):
            if v is not None:
                loaded[v.name] = v
        for extra in list(loaded) + list(self.rejected):
            if extra not in names and extra:
                names.append(extra)
        out = []
        for name in names:
            v = loaded.get(name)
            err = self.rejected[name][1].message if name in self.rejected else ""
            if v is self.live:
                state = "LIVE"
            elif v is not None and v is self.candidate:
                state = "CANDIDATE"
            elif v is not None:
                state = "DRAINING"
            elif err:
                state = "REJECTED"
            else:
                state = "AVAILABLE"
            out.append((name, state, v, err))
        return out

    async def aclose(self) -> None:
        """Releases every version (after its requests) and the adapters loaded for them."""
        for task in list(self._shadows):
            task.cancel()
        await asyncio.gather(*self._shadows, *self._retiring, return_exceptions=True)
        for v in {self.live, self.candidate} - {None}:
            await v.drain(self.models.drain_timeout_s)
            await v.close(self.adapters)
        self.live = self.candidate = None
        if self.adapters is not None:
            await self.adapters.aclose()
