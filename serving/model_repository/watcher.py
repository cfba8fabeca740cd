"""Reloads the repository when it changes on disk (polling modification times) or on SIGHUP.

Polling rather than inotify: it works on every filesystem (NFS, bind mounts, ConfigMaps that
swap symlinks) and costs a directory listing every few seconds. A reload starts only when
something changed, so a rejected version is not retried until its files change again (or a
SIGHUP or ReloadModels asks).
"""
from __future__ import annotations

import asyncio
import logging
import signal

from catcascade.serving.model_repository.repository import repository_fingerprint

log = logging.getLogger(__name__)


class RepositoryWatcher:
    def __init__(self, router, poll_interval_s: float):
        self.router = router
        self.poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sighup = False
        self.reloads = 0

    def _fingerprint(self):
        m = self.router.models
        return repository_fingerprint(m.repository, m.routing_file)

    def request_reload(self) -> None:
        """Reload now, whether or not anything changed (SIGHUP)."""
        self._wake.set()

    async def start(self) -> None:
        self._seen = await asyncio.to_thread(self._fingerprint)
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            self._sighup = True
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no SIGHUP
            log.debug("SIGHUP reloads unavailable here (not the main thread)")
        self._task = asyncio.create_task(self._run(), name="model-repository-watcher")

    async def stop(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        timeout = self.poll_interval_s or None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
                forced = True
            except asyncio.TimeoutError:
                forced = False
            self._wake.clear()
            try:
                seen = await asyncio.to_thread(self._fingerprint)
                if not forced and seen == self._seen:
                    continue
                self._seen = seen
                self.reloads += 1
                await self.router.reload(cause="SIGHUP" if forced else "repository changed")
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("model repository reload failed; the serving versions stay")
