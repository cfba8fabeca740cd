"""Puts a new bundle into the repository as a version: whole, self-contained and verified.

A freshly trained bundle is rarely complete: ``train-cnn`` writes the CNN alone, the VLM
section and adapter come from the version being replaced or from ``train-vlm``, and the
escalation and blend settings from ``fit-cascade``. Staging assembles them in a hidden folder
beside the repository's versions, verifies the result with the loader the server uses, and
renames it into place, so the watcher never sees half a version.

A version owns its files, so nothing outside it can change what it serves: every file is
copied in (a symbolic link in the bundle or the adapter folder is refused, and the manifest's
paths cannot leave the bundle), the sha256 of each one is written to the manifest's ``files``,
and the loader checks that list: a file changed, added or removed after staging (a zeroed
adapter, an edited tokenizer) gets the version refused with reason ``checksum``. The one thing
a version may name outside itself is the VLM base model (a hub id, or an absolute folder as
``vlm_from`` gives it): vLLM loads it when it starts; no version loads it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from catcascade.ensemble.bundle import BundleError, links_in, load_bundle
from catcascade.ensemble.config import CascadeConfig


def _refuse_links(folder: Path, what: str) -> None:
    """BundleError naming the first symbolic link (or non-regular file) under ``folder``."""
    links = links_in(folder)
    if links:
        first = Path(folder) / links[0]
        target = f"a link to {os.readlink(first)}" if first.is_symlink() else "not a regular file"
        raise BundleError(f"{links[0]} in {what} {folder} is {target}: a version holds its own files, so that a "
                          f"change outside it cannot change what it serves; copy the files themselves (cp -rL) "
                          f"and stage the copy")


def stage_version(source: Path, repository: Path, version: str, *, vlm_from: Path | None = None,
                  adapter: Path | None = None, cascade: Path | None = None) -> Path:
    """Copies bundle ``source`` to ``repository/version`` and lists every file's sha256 in its
    manifest.

    ``vlm_from``: a bundle whose VLM section (base model and adapter) the new version takes
    (its adapter is copied in; a base model folder inside that bundle is referenced by absolute
    path, not copied); ``adapter``: a PEFT adapter folder (``train-vlm --out``) to serve
    instead; ``cascade``: a ``fit-cascade --out`` JSON for the manifest's ``cascade`` section.
    Raises BundleError.
    """
    repository, source = Path(repository), Path(source)
    if not repository.is_dir():
        raise BundleError(f"model repository not found: {repository}")
    if not version or Path(version).name != version or version.startswith("."):
        raise BundleError(f"a version is a plain folder name, got {version!r}")
    target = repository / version
    if target.exists():
        raise BundleError(f"{target} exists: versions are immutable, stage under a new name")
    load_bundle(source)  # the source itself must be sound (every listed file, when it lists them)
    _refuse_links(source, "bundle")
    tmp = repository / f".{version}.staging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp, symlinks=True)  # a link slipped in since the check is refused below
        bundle = load_bundle(tmp, verify=False)
        m = bundle.manifest
        if vlm_from is not None:
            other = load_bundle(vlm_from)  # verified: its adapter is about to become this version's
            if other.manifest.vlm is None:
                raise BundleError(f"{vlm_from} has no vlm section to take")
            m.vlm = other.manifest.vlm.model_copy()
            base = Path(vlm_from) / m.vlm.base_model
            if base.exists():
                m.vlm.base_model = str(base.resolve())
            if adapter is None and other.vlm_adapter_path() is not None:
                adapter = other.vlm_adapter_path()
        if adapter is not None:
            if m.vlm is None:
                raise BundleError("an adapter needs a vlm section: give --vlm-from, or a source bundle with one")
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise BundleError(f"no adapter_config.json in {adapter} (expected a PEFT adapter folder)")
            _refuse_links(adapter, "adapter folder")
            dest = tmp / "vlm" / "adapter"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(adapter, dest, symlinks=True)
            m.vlm.adapter_dir = "vlm/adapter"
        if m.vlm is not None and m.vlm.adapter_dir is not None and not (
                bundle.vlm_adapter_path() / "adapter_config.json").is_file():
            raise BundleError(f"the manifest's adapter folder {m.vlm.adapter_dir} has no adapter_config.json in "
                              f"{source} (expected a PEFT adapter folder)")
        if cascade is not None:
            try:
                m.cascade = CascadeConfig.from_file(cascade)
            except (OSError, ValueError) as e:
                raise BundleError(f"cannot use {cascade} as cascade settings: {e}") from None
        bundle.record_files()
        bundle.save()
        load_bundle(tmp)  # what the server will check: the CNN against the source's hash, and every file
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
