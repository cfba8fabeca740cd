"""Per-tenant VLM budgets: each tenant may escalate at a bounded rate (a token bucket).

Tenants are named by their bearer token (``auth.tenants: {name: token}`` in the ServeConfig;
serving/front_door/authentication.py reads it).
An escalation takes one token from its tenant's bucket; with the bucket empty the answer is
CNN-only with reason TENANT_BUDGET, so one tenant's burst of uncertain images cannot spend the
VLM that the others share. CNN answers are never limited here (that is admission's job).
Requests without a known token count as tenant ``anonymous``.
"""
from __future__ import annotations

import time
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from catcascade.serving.cascade_engine import ANONYMOUS


class TokenBucketConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate_per_s: float = Field(ge=0, description="escalations per second, sustained")
    burst: float = Field(ge=1, description="escalations allowed at once after a quiet spell")


class TenantBudgetsConfig(BaseModel):
    """Escalation budgets by tenant name; tenants without an entry get ``default``."""

    model_config = ConfigDict(extra="forbid")

    default: TokenBucketConfig | None = Field(None, description="None = unlimited")
    tenants: dict[str, TokenBucketConfig] = Field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.default is not None or bool(self.tenants)


class TokenBucket:
    def __init__(self, config: TokenBucketConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._tokens = float(config.burst)
        self._at = clock()

    @property
    def tokens(self) -> float:
        now = self._clock()
        self._tokens = min(float(self.config.burst), self._tokens + (now - self._at) * self.config.rate_per_s)
        self._at = now
        return self._tokens

    def take(self) -> bool:
        if self.tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        self._tokens = min(float(self.config.burst), self._tokens + 1.0)


class TenantBudgets:
    """Resolves a request's tenant and keeps each tenant's escalation bucket."""

    def __init__(self, config: TenantBudgetsConfig, tenant_names: list[str] | None = None, registry=None,
                 clock: Callable[[], float] = time.monotonic):
        """``tenant_names``: the tenants authentication can name (``AuthConfig.tenants``)."""
        self.config = config
        self._names = set(tenant_names or ())
        self._clock = clock
        self._buckets: dict[str, TokenBucket | None] = {}
        self._metrics = _TenantMetrics(registry, self) if registry is not None else None

    @property
    def tenants(self) -> list[str]:
        return sorted(self._names | set(self.config.tenants) | {ANONYMOUS})

    def bucket(self, tenant: str) -> TokenBucket | None:
        if tenant not in self._buckets:
            cfg = self.config.tenants.get(tenant, self.config.default)
            self._buckets[tenant] = TokenBucket(cfg, self._clock) if cfg is not None else None
        return self._buckets[tenant]

    def count_request(self, tenant: str) -> None:
        if self._metrics:
            self._metrics.requests.labels(tenant).inc()

    def allow_escalation(self, tenant: str) -> bool:
        """Takes one escalation from the tenant's budget; False when it is spent."""
        bucket = self.bucket(tenant or ANONYMOUS)
        ok = bucket is None or bucket.take()
        if self._metrics:
            self._metrics.escalations.labels(tenant or ANONYMOUS, "allowed" if ok else "over_budget").inc()
        return ok

    def has_budget(self, tenant: str) -> bool:
        """Whether ``tenant`` could escalate now, without spending anything (a cached escalated
        answer is only handed to a tenant that could have paid for it)."""
        bucket = self.bucket(tenant or ANONYMOUS)
        return bucket is None or bucket.tokens >= 1.0

    def give_back(self, tenant: str) -> None:
        """Returns a token taken for an escalation that did not happen after all."""
        bucket = self.bucket(tenant or ANONYMOUS)
        if bucket is not None:
            bucket.give_back()


class _TenantMetrics:
    def __init__(self, registry, budgets: TenantBudgets):
        from prometheus_client import Counter, Gauge

        self.requests = Counter("catcascade_tenant_requests", "Classify requests by tenant", ["tenant"],
                                registry=registry)
        self.escalations = Counter("catcascade_tenant_escalations", "Escalations by tenant: allowed, or "
                                   "over_budget (answered CNN-only)", ["tenant", "outcome"], registry=registry)
        tokens = Gauge("catcascade_tenant_budget_tokens", "Escalations a tenant may make right now",
                       ["tenant"], registry=registry)
        for tenant in budgets.tenants:
            if budgets.bucket(tenant) is not None:
                tokens.labels(tenant).set_function(lambda t=tenant: budgets.bucket(t).tokens)
