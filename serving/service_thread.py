"""Runs the gRPC service in a background thread, for synchronous callers."""
from __future__ import annotations

import asyncio
import threading

from catcascade.serving.config import ServeConfig


class ServiceThread:
    """The whole service (``running_service``) on its own event loop in a background thread,
    for callers that are synchronous: tests, benchmarks and the demo."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.port: int | None = None
        self.servicer = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self):
        from catcascade.serving.app import running_service

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_service(self.config) as (servicer, port, health):
                self.servicer, self.port, self.health = servicer, port, health
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:  # re-raised in the thread that called start()
            self._error = e
            self._ready.set()

    def start(self, timeout_s: float = 300.0) -> "ServiceThread":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the service did not start within {timeout_s:.0f} s")
        if self._error:
            raise self._error
        return self

    def on_loop(self, fn, timeout_s: float = 30.0):
        """Runs ``fn()`` on the service's event loop and returns its result: a safe way for
        other threads to read state the loop owns (the breaker, queue depths)."""
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout_s)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> "ServiceThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
