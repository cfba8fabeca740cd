"""What a model repository is configured with: the server's ``models:`` section (where the
repository is, how it is watched, the admin service) and the repository's own routing file
(which version is live, which is the candidate and how much traffic it gets).

The routing lives in the repository (``DIR/routing.yaml``), not in the server's config, so
that a file edit, SIGHUP and the admin RPCs all change one thing: the admin service writes
the file it would otherwise have been asked to edit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catcascade.errors import CatcascadeError

ROUTING_FILE = "routing.yaml"


class ModelsConfig(BaseModel):
    """``catcascade serve --models DIR``: ``DIR/<version>/`` are bundles."""

    model_config = ConfigDict(extra="forbid")

    repository: Path = Field(description="folder whose sub-folders are bundles, one per version")
    routing_file: str = Field(ROUTING_FILE, description="routing file inside the repository; absent = the newest "
                              "version is live and there is no candidate")
    poll_interval_s: float = Field(2.0, ge=0, description="how often the repository is checked for changes "
                                   "(file modification times); 0 = only on SIGHUP or ReloadModels")
    drain_timeout_s: float = Field(30.0, gt=0, description="how long a replaced version may finish its requests "
                                   "before it is released")
    warmup_batches: int = Field(2, ge=1, le=64, description="CNN batches run on a new version before it takes "
                                "traffic (each checks the output against the labels)")
    shadow_max_concurrency: int = Field(4, ge=1, description="shadow copies running at once; beyond, copies are "
                                        "dropped (counted), so shadowing never queues behind itself")
    shadow_timeout_s: float = Field(30.0, gt=0, description="a shadow copy running longer is abandoned")
    adapter_check_interval_s: float = Field(10.0, gt=0, description="how often each vLLM server is checked for "
                                            "the adapters of the loaded versions (reloaded after a vLLM restart)")
    admin_host: str = "127.0.0.1"
    admin_port: int | None = Field(None, ge=0, le=65535, description="port of the ModelAdmin gRPC service; "
                                   "None = no admin service, 0 = any free port")
    admin_tokens: list[str] = Field(default_factory=list, description="bearer tokens accepted by the admin service "
                                    "(never the client tokens)")
    admin_tokens_env: str | None = Field("CATCASCADE_ADMIN_TOKENS", description="or: an environment variable "
                                         "holding comma-separated admin tokens")

    @field_validator("repository")
    @classmethod
    def _is_dir(cls, p: Path) -> Path:
        if not Path(p).is_dir():
            raise ValueError(f"model repository not found (not a folder): {p}")
        return p

    @field_validator("routing_file")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name or Path(name).name != name:
            raise ValueError(f"routing_file must be a file name inside the repository, got {name!r}")
        return name

    def tokens(self) -> list[str]:
        extra = os.environ.get(self.admin_tokens_env, "") if self.admin_tokens_env else ""
        return [t.strip() for t in self.admin_tokens + extra.split(",") if t.strip()]

    @property
    def routing_path(self) -> Path:
        return Path(self.repository) / self.routing_file


class Routing(BaseModel):
    """The routing file: which version answers, and which one is on trial.

    A canary candidate answers ``share`` of the requests; a shadow candidate runs on a copy
    of ``share`` of them and its answers are only compared, never returned. Requests are
    picked by a hash of the image bytes and ``seed``: the same image always takes the same
    route, so a retry gets the same version.
    """

    model_config = ConfigDict(extra="forbid")

    live: str | None = Field(None, description="the version that answers; None = the newest in the repository")
    candidate: str | None = None
    mode: Literal["canary", "shadow"] = "shadow"
    share: float = Field(0.1, ge=0.0, le=1.0)
    previous: str | None = Field(None, description="what Rollback makes live again (written by Promote)")
    seed: int = Field(0, ge=0)

    @field_validator("live", "candidate", "previous")
    @classmethod
    def _version_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or Path(v).name != v or v.startswith(".")):
            raise ValueError(f"a version is a folder name in the repository, got {v!r}")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "Routing":
        if self.candidate is not None and self.candidate == self.live:
            raise ValueError(f"candidate {self.candidate!r} is already the live version")
        return self


class RoutingFileEmpty(CatcascadeError):
    """The routing file exists but holds nothing: most likely a write in progress (``echo >``
    and most editors truncate the file first), not a wish for the newest version."""


def read_routing(path: Path) -> Routing | None:
    """The routing file's content, or None when there is none. Raises ValueError when the
    file is not valid YAML or not a valid routing, RoutingFileEmpty when it is blank."""
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    if not text.strip():
        raise RoutingFileEmpty(f"{path} is empty")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping (live, candidate, mode, share, previous, seed)")
    return Routing.model_validate(data)


def write_routing(path: Path, routing: Routing) -> None:
    """Writes the routing file atomically (a reader sees the old file or the new one)."""
    import yaml

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    data = routing.model_dump(exclude_none=True)
    tmp.write_text("# written by catcascade's ModelAdmin service; edit freely (the server reloads on change)\n"
                   + yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
