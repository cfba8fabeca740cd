"""The cache stage: repeated images answered from memory, after routing.

An entry is keyed by the image, mode and top_k and by the *answering version's content* (its
``content_key``: CNN weights, calibration, policy, candidates, blend, VLM and adapter), so a
promotion, a rollback or a removed candidate never answers from another version's entries,
whatever the versions are called. Entries live in one partition per tenant, each with the
configured bounds: one tenant never learns from ``cached`` what another sent, and never evicts
another's entries. A cached escalated answer is only handed to a tenant whose VLM budget could
have paid for it now; otherwise the request is computed, and its budget decides.

Only complete answers are stored: a CNN-only answer given because the VLM was down, shed, out
of deadline or out of the tenant's budget is not what the next caller should get. Identical
requests in flight together share one computation (single-flight).
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable

from catcascade.serving.api import cascade_pb2 as pb
from catcascade.serving.cascade_engine import ANONYMOUS, ClassifyRequest
from catcascade.serving.front_door.routing import Route
from catcascade.serving.traffic.response_cache import ResponseCache, ResponseCacheConfig, SingleFlight, cache_key
from catcascade.serving.traffic.tenant_budgets import TenantBudgets

CACHEABLE_REASONS = frozenset({pb.ESCALATION_REASON_CONFIDENT, pb.ESCALATION_REASON_LOW_CONFIDENCE,
                               pb.ESCALATION_REASON_REQUESTED_ALWAYS, pb.ESCALATION_REASON_REQUESTED_NEVER,
                               pb.ESCALATION_REASON_VLM_DISABLED})


def cacheable(response: pb.ClassifyResponse) -> bool:
    return response.escalation_reason in CACHEABLE_REASONS


class CacheStage:
    def __init__(self, config: ResponseCacheConfig, budgets: TenantBudgets | None = None, registry=None):
        self.config = config
        self.budgets = budgets
        self.partitions: dict[str, ResponseCache[pb.ClassifyResponse]] = {}
        self._flights: SingleFlight[pb.ClassifyResponse] = SingleFlight()
        self._metrics = _CacheMetrics(registry, self) if registry is not None else None

    @property
    def hits(self) -> int:
        return sum(p.hits for p in self.partitions.values())

    def partition(self, tenant: str | None) -> ResponseCache[pb.ClassifyResponse]:
        """The tenant's own LRU (tenants are the configured ones plus anonymous: a bounded set)."""
        name = tenant or ANONYMOUS
        if name not in self.partitions:
            self.partitions[name] = ResponseCache(self.config, size_of=lambda r: r.ByteSize())
        return self.partitions[name]

    async def answer(self, request: ClassifyRequest, route: Route,
                     compute: Callable[[], Awaitable[pb.ClassifyResponse]]) -> pb.ClassifyResponse:
        """The cached answer for ``request`` on ``route``'s version, or ``compute()``'s (stored
        when complete)."""
        t0 = time.perf_counter()
        key = cache_key(request.image, request.mode, request.top_k or 0, route.engine.identity.content_key)
        cache = self.partition(request.tenant)
        hit = cache.get(key)
        if hit is not None and self._may_have(request, hit):
            self._count("hit")
            return reused(hit, request.request_id, route, t0)
        self._count("miss")
        flight_key = (request.tenant, key)
        response, shared = await self._flights.run(flight_key, lambda: self._compute_and_store(cache, key, compute))
        if not shared:
            return response
        if cacheable(response) and self._may_have(request, response):
            self._count("shared")
            return reused(response, request.request_id, route, t0)
        # The answer in flight was degraded for its own caller (deadline, budget, VLM down):
        # this caller gets a computation of its own.
        return await compute()

    def _may_have(self, request: ClassifyRequest, response: pb.ClassifyResponse) -> bool:
        """An escalated answer is worth a VLM call: only for a tenant with budget left."""
        return not (response.escalated and self.budgets is not None and request.tenant is not None
                    and not self.budgets.has_budget(request.tenant))

    async def _compute_and_store(self, cache: ResponseCache, key: bytes,
                                 compute: Callable[[], Awaitable[pb.ClassifyResponse]]) -> pb.ClassifyResponse:
        response = await compute()
        if cacheable(response):
            evicted = cache.evictions
            cache.put(key, response)
            if self._metrics is not None and cache.evictions > evicted:
                self._metrics.evictions.inc(cache.evictions - evicted)
        return response

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.lookups.labels(result).inc()


def reused(response: pb.ClassifyResponse, request_id: str, route: Route, t0: float) -> pb.ClassifyResponse:
    """A stored or shared answer as this request's: its id, the route it took now, cached=True,
    its own total time."""
    out = pb.ClassifyResponse()
    out.CopyFrom(response)
    out.request_id = request_id
    out.cached = True
    out.versions.CopyFrom(route.versions)
    out.timings.CopyFrom(pb.StageTimings(total_ms=(time.perf_counter() - t0) * 1000.0))
    return out


class _CacheMetrics:
    def __init__(self, registry, stage: CacheStage):
        from prometheus_client import Counter, Gauge

        self.lookups = Counter("catcascade_response_cache_lookups", "Response cache lookups: hit, miss, or "
                               "shared (answered by an identical request in flight)", ["result"], registry=registry)
        self.evictions = Counter("catcascade_response_cache_evictions", "Entries dropped to stay within the bounds",
                                 registry=registry)
        Gauge("catcascade_response_cache_entries", "Responses in the cache, all tenants",
              registry=registry).set_function(lambda: sum(len(p) for p in stage.partitions.values()))
        Gauge("catcascade_response_cache_bytes", "Serialized size of the cached responses, all tenants",
              registry=registry).set_function(lambda: sum(p.bytes for p in stage.partitions.values()))
