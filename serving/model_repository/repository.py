"""The model repository on disk: ``DIR/<version>/`` bundles, found by their manifest.

Versions are folder names, ordered naturally (``v2`` < ``v10``, ``2024-01-02`` <
``2024-01-10``). A fingerprint (names, sizes and modification times of a version's files)
tells the watcher and the loader when a version changed on disk, without hashing anything.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from catcascade.ensemble.bundle import MANIFEST

Fingerprint = tuple


def natural_key(name: str) -> tuple:
    """Sorts digits as numbers: v2 before v10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def list_versions(repository: Path) -> list[str]:
    """Version folders (those holding a manifest), oldest first; hidden folders are skipped,
    so a bundle copied in as ``.v3.tmp`` and renamed to ``v3`` appears at once and whole."""
    out = []
    for entry in os.scandir(repository):
        if entry.is_dir() and not entry.name.startswith(".") and os.path.isfile(os.path.join(entry.path, MANIFEST)):
            out.append(entry.name)
    return sorted(out, key=natural_key)


def version_fingerprint(folder: Path) -> Fingerprint:
    """(name, size, mtime) of the files directly in a version folder and in its vlm/adapter
    folder: changes when any of them is replaced or rewritten."""
    rows = []
    for sub in ("", "vlm/adapter"):
        d = Path(folder) / sub
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.is_file():
                st = e.stat()
                rows.append((f"{sub}/{e.name}", st.st_size, st.st_mtime_ns))
    return tuple(sorted(rows))


def repository_fingerprint(repository: Path, routing_file: str) -> Fingerprint:
    """Every version's fingerprint plus the routing file's size and mtime."""
    try:
        st = (Path(repository) / routing_file).stat()
        routing = (st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        routing = None
    return routing, tuple((v, version_fingerprint(Path(repository) / v)) for v in list_versions(repository))
