"""The repository-backed stand-in for one pipeline: the router with its first versions
loaded, the watcher and the admin service running, everything released on exit."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from catcascade.serving.model_repository.router import ModelRouter

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def routed_pipeline(cfg, metrics, factory):
    """Yields a ModelRouter for ``cfg.models`` serving the routing file's live version (and
    candidate). ``factory`` builds one version (serving.engine_builder.build_engine). Raises
    VersionRejected when the live version cannot be loaded: there is nothing to serve."""
    from catcascade.serving.model_repository.adapters import AdapterPool
    from catcascade.serving.model_repository.admin import run_admin_server
    from catcascade.serving.model_repository.watcher import RepositoryWatcher

    models = cfg.models
    adapters = AdapterPool(cfg.vlm.urls) if cfg.vlm.backend == "vllm" and cfg.vlm.model is None else None
    router = ModelRouter(models, cfg, metrics, factory, adapters)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(router.aclose)  # releases the versions and the adapters
        await router.reload(cause="start-up")
        if adapters is not None:
            sync = asyncio.create_task(adapters.keep_in_sync(models.adapter_check_interval_s))
            stack.callback(sync.cancel)
        watcher = RepositoryWatcher(router, models.poll_interval_s)
        await watcher.start()
        stack.push_async_callback(watcher.stop)
        router.watcher = watcher
        router.admin_port = None
        if models.admin_port is not None:
            router.admin_port = await stack.enter_async_context(run_admin_server(
                router, models.admin_host, models.admin_port, models.tokens(), tls=cfg.tls,
                client_tokens=cfg.auth.tokens()))
            log.info("ModelAdmin on %s:%d", models.admin_host, router.admin_port)
        yield router
