"""LoRA adapters of the loaded versions, loaded into the running vLLM servers on demand.

Each adapter is served under a name made from its bundle's adapter name and a digest of its
files (``cats-3f2a9c1d4e5b``): two versions with the same adapter share one, a changed
adapter never reuses an old name (vLLM does not invalidate prefix-cache blocks computed with
an adapter's previous weights when it is reloaded under the same name), and the name says
exactly which weights answered. Reference-counted: unloaded when no loaded version uses it.

vLLM forgets runtime-loaded adapters when it restarts, and may not be up yet when the server
starts: a server that cannot be reached does not refuse a version (only a refusal does), and
``keep_in_sync`` loads what a server is missing once it answers again. Until then escalations
of that version get CNN-only answers, as with any VLM outage.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def adapter_digest(folder: Path) -> str:
    """sha256 over the adapter's files (relative names and contents), in name order."""
    h = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class AdapterPool:
    """Which adapters the running vLLM servers hold for the loaded versions."""

    def __init__(self, urls: list[str], on_change=None, transport=None):
        """``transport`` replaces the network (unit tests only)."""
        from catcascade.vlm_stage.vllm_client import VllmAdapterAdmin

        self.admin = VllmAdapterAdmin(urls, transport=transport)
        self._refs: dict[str, int] = {}
        self._owned: dict[str, str] = {}
        """name -> adapter folder, for what this pool loaded."""
        self._lock = asyncio.Lock()
        self.on_change = on_change
        """Called with the number of adapters this pool loaded, after each change."""

    @property
    def loaded(self) -> list[str]:
        return sorted(self._owned)

    async def acquire(self, base_name: str, folder: Path) -> str:
        """The vLLM model name serving the adapter in ``folder``: loaded now if no server has
        it yet. Raises vlm_stage.vllm_client.AdapterLoadError when vLLM refuses it."""
        folder = Path(folder).resolve()
        if not (folder / "adapter_config.json").is_file():
            from catcascade.vlm_stage.vllm_client import AdapterLoadError

            raise AdapterLoadError(f"no adapter_config.json in {folder} (expected a PEFT adapter folder)")
        from catcascade.vlm_stage.vllm_client import AdapterServersUnreachable

        name = f"{base_name}-{adapter_digest(folder)[:12]}"
        async with self._lock:
            if name not in self._refs:
                try:
                    await self.admin.load(name, str(folder))
                    log.info("LoRA adapter %s loaded into vLLM from %s", name, folder)
                except AdapterServersUnreachable as e:
                    log.warning("%s; it is loaded there once the server answers", e)
                self._owned[name] = str(folder)
            self._refs[name] = self._refs.get(name, 0) + 1
            self._changed()
        return name

    async def release(self, name: str) -> None:
        """One version no longer uses ``name``; the last one out unloads it."""
        async with self._lock:
            self._refs[name] -= 1
            if self._refs[name] > 0:
                return
            del self._refs[name]
            self._owned.pop(name, None)
            self._changed()
            try:
                await self.admin.unload(name)
                log.info("LoRA adapter %s unloaded from vLLM (no version uses it)", name)
            except RuntimeError as e:
                log.warning("could not unload LoRA adapter %s: %s", name, e)

    async def reconcile(self) -> list[tuple[str, str]]:
        """Loads every adapter of this pool into each server that lacks it (restarted, or not
        up when it was first loaded); returns the (server, adapter) pairs loaded."""
        from catcascade.vlm_stage.vllm_client import AdapterLoadError

        loaded = []
        async with self._lock:
            for url in self.admin.urls:
                try:
                    served = await self.admin.served_models(url)
                except Exception:  # still down: the next round tries again
                    continue
                for name, folder in self._owned.items():
                    if name in served:
                        continue
                    try:
                        await self.admin.load(name, folder, urls=[url])
                    except AdapterLoadError as e:
                        log.warning("could not reload LoRA adapter %s into %s: %s", name, url, e)
                        continue
                    loaded.append((url, name))
                    log.info("LoRA adapter %s reloaded into %s (the server had lost it)", name, url)
        return loaded

    async def keep_in_sync(self, period_s: float) -> None:
        """reconcile() every ``period_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.reconcile()
            except Exception:
                log.exception("LoRA adapter reconciliation failed")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self._owned))

    async def aclose(self) -> None:
        """Unloads what this pool loaded (the servers outlive this process) and closes."""
        for name in list(self._owned):
            try:
                await self.admin.unload(name)
            except RuntimeError as e:
                log.warning("could not unload LoRA adapter %s: %s", name, e)
        self._owned.clear()
        self._refs.clear()
        await self.admin.aclose()
