"""`catcascade data oxford-pets DIR`: a real dataset to train on, in one command.

Downloads the Oxford-IIIT Pet release with torchvision's own downloader (`OxfordIIITPet`: the
two archives from the Visual Geometry Group's site, md5-checked and extracted), keeps the 12
cat breeds and lays them out as the ImageFolders the training commands read, split as Oxford
splits them::

    DIR/oxford-iiit-pet/           the release as published: images/, annotations/
    DIR/train/<Breed>/<image>.jpg  Oxford's trainval list, cat breeds only (linked or copied)
    DIR/test/<Breed>/<image>.jpg   Oxford's test list, cat breeds only

`train-cnn --data DIR/train` trains on the first (with its own train/val split inside it);
`score DIR/test ...` and `bench-accuracy --data DIR/test` measure on photos it never saw.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from catcascade.errors import CommandError

log = logging.getLogger(__name__)

RELEASE_FOLDER = "oxford-iiit-pet"  # where torchvision's OxfordIIITPet extracts under its root
SPLITS = {"train": "trainval", "test": "test"}  # our folder name: Oxford's list


def download_oxford_pets(root: Path) -> Path:
    """The release under ``root/oxford-iiit-pet`` (downloaded once; an existing one is reused)."""
    from torchvision.datasets import OxfordIIITPet

    OxfordIIITPet(root=str(root), split="trainval", download=True)
    return root / RELEASE_FOLDER


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def write_cat_image_folder(release: Path, out: Path, subset: str = "list") -> dict[str, int]:
    """The release's cat images of one list (list: all; trainval; test) as ``out/<Breed>/<image>.jpg``;
    returns images per breed.

    Rewritten from scratch each time, so a re-run after a partial one leaves no stray files.
    """
    from catcascade.training.datasets import scan_oxford_pet

    samples, labels = scan_oxford_pet(release, cats_only=True, subset=subset)
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise CommandError(f"{len(missing)} image(s) listed in {release / 'annotations' / 'list.txt'} are missing, "
                           f"e.g. {missing[0]}: delete {release} and download again")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = dict.fromkeys(labels, 0)
    for s in samples:
        breed = labels[s.label]
        (tmp / breed).mkdir(parents=True, exist_ok=True)
        _link_or_copy(s.path, tmp / breed / s.path.name)
        counts[breed] += 1
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return counts


def remove_archives(release: Path) -> None:
    """The downloaded .tar.gz files, once extracted (about 800 MB)."""
    for archive in release.glob("*.tar.gz"):
        archive.unlink()


def _oxford_pets(args) -> int:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"downloading Oxford-IIIT Pet into {root / RELEASE_FOLDER} (about 800 MB; reused when present)", flush=True)
    try:
        release = download_oxford_pets(root)
    except (OSError, RuntimeError) as e:  # network errors are OSErrors (URLError); a bad md5 is a RuntimeError
        raise CommandError(f"cannot download Oxford-IIIT Pet: {e}") from None
    if not args.keep_archives:
        remove_archives(release)
    counts = {name: write_cat_image_folder(release, root / name, subset) for name, subset in SPLITS.items()}
    breeds = list(counts["train"])
    print(f"{len(breeds)} cat breeds; photos in {root / 'train'} / {root / 'test'}:")
    for breed in breeds:
        print(f"  {breed}: {counts['train'][breed]} / {counts['test'].get(breed, 0)}")
    print(f"next: catcascade train-cnn --data {root / 'train'} --out artifacts/cats "
          f"(docs/guides/train-on-your-data.md)")
    return 0


def register(sub) -> None:
    """Adds ``catcascade data`` and its datasets."""
    d = sub.add_parser("data", help="download a dataset and lay it out for training")
    datasets = d.add_subparsers(dest="dataset", required=True, metavar="DATASET", help="the dataset to fetch")
    o = datasets.add_parser("oxford-pets", help="Oxford-IIIT Pet (CC BY-SA 4.0): the 12 cat breeds as ImageFolders "
                            "DIR/train/<Breed>/ and DIR/test/<Breed>/ (Oxford's split), the release in "
                            "DIR/oxford-iiit-pet/")
    o.add_argument("dir", type=Path, metavar="DIR", help="folder to download into")
    o.add_argument("--keep-archives", action="store_true", help="keep the downloaded .tar.gz files after extraction")
    o.set_defaults(func=_oxford_pets)
