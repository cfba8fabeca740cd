"""Dataset layouts for CNN training, and the reproducible train/val/test split.

Three layouts, one registry (`DATASET_FORMATS`): an ImageFolder tree, the Oxford-IIIT Pet
release (``images/`` + ``annotations/list.txt``, ``trainval.txt``, ``test.txt``) and a CSV
manifest (``path,label``) as shipped with the 67-breed cat collections. Each parser returns
`Sample`s with integer labels and the sorted label names. Images whose header cannot be read
are dropped before training and reported (count in the log, paths in the split file), never
silently: the serving decoder's checks are the ones applied.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from catcascade.training.image_folder import IMAGE_SUFFIXES, Sample, scan_image_folder, stratified_split

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
OXFORD_CAT = 1  # SPECIES column of annotations/list.txt: 1 = cat, 2 = dog


@dataclass(frozen=True)
class DatasetSpec:
    """Where the images are and how they are laid out."""

    root: Path
    format: str = "imagefolder"
    """imagefolder | oxford | csv"""
    csv_file: Path | None = None
    """csv: the manifest (default ``root/labels.csv``); relative image paths resolve against root."""
    cats_only: bool = False
    """oxford: keep the 12 cat breeds (SPECIES 1) and drop the 25 dog breeds."""
    official_split: bool = False
    """oxford: test = annotations/test.txt; train/val are a stratified split of trainval.txt."""

    def __post_init__(self) -> None:
        if self.format not in DATASET_FORMATS:
            raise ValueError(f"dataset format must be one of {sorted(DATASET_FORMATS)}, got {self.format!r}")
        if self.official_split and self.format != "oxford":
            raise ValueError("official_split only applies to the oxford format")


@dataclass
class DatasetSplit:
    """Labelled samples in three parts, plus what was dropped and why."""

    labels: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _oxford_rows(path: Path) -> list[tuple[str, int, int]]:
    """``Image CLASS-ID SPECIES BREED-ID`` lines (``#`` comments skipped) -> (image, class_id, species)."""
    if not path.is_file():
        raise FileNotFoundError(f"Oxford-IIIT Pet annotation file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 3:
            raise ValueError(f"{path}:{n}: expected 'IMAGE CLASS-ID SPECIES BREED-ID', got {line!r}")
        try:
            rows.append((parts[0], int(parts[1]), int(parts[2])))
        except ValueError:
            raise ValueError(f"{path}:{n}: CLASS-ID and SPECIES must be integers, got {line!r}") from None
    return rows


def _oxford_breed(image_id: str) -> str:
    """``Bengal_105`` -> ``Bengal``; ``great_pyrenees_1`` -> ``great_pyrenees``."""
    return image_id.rsplit("_", 1)[0]


def scan_oxford_pet(root: str | Path, cats_only: bool = False, subset: str = "list") -> tuple[list[Sample], list[str]]:
    """Reads ``annotations/{subset}.txt`` (list, trainval or test); labels are Oxford's breed names.

    Labels are derived from list.txt whatever the subset, so trainval and test agree on indices.
    """
    root = Path(root)
    ann = root / "annotations"
    rows = _oxford_rows(ann / "list.txt")
    keep = [r for r in rows if not cats_only or r[2] == OXFORD_CAT]
    labels = sorted({_oxford_breed(r[0]) for r in keep})
    if len(labels) < 2:
        raise ValueError(f"{ann / 'list.txt'} yields {len(labels)} breed(s) (cats_only={cats_only}); need at least 2")
    index = {name: i for i, name in enumerate(labels)}
    if subset != "list":
        rows = _oxford_rows(ann / f"{subset}.txt")
    samples = [Sample(root / "images" / f"{r[0]}.jpg", index[_oxford_breed(r[0])])
               for r in rows if (not cats_only or r[2] == OXFORD_CAT)]
    return samples, labels


def scan_csv_manifest(csv_file: str | Path, root: str | Path | None = None) -> tuple[list[Sample], list[str]]:
    """A ``path,label`` CSV (header row required; extra columns ignored) -> samples and sorted labels."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"CSV manifest not found: {csv_file}")
    base = Path(root) if root is not None else csv_file.parent
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_file}: header must name the columns path,label (missing {sorted(missing)}); "
                             f"found {reader.fieldnames}")
        rows = []
        for n, row in enumerate(reader, 2):
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not path or not label:
                raise ValueError(f"{csv_file}:{n}: empty path or label")
            rows.append((path, label))
    labels = sorted({label for _, label in rows})
    if len(labels) < 2:
        raise ValueError(f"{csv_file} names {len(labels)} label(s); need at least 2")
    index = {name: i for i, name in enumerate(labels)}
    return [Sample(Path(p) if Path(p).is_absolute() else base / p, index[lab]) for p, lab in rows], labels


def check_readable(samples: list[Sample], progress: bool = False) -> tuple[list[Sample], list[str]]:
    """Drops samples whose file is missing or whose header the serving decoder refuses.

    Only headers are read (cheap); a file that fails later while decoding pixels is skipped
    by the dataset and counted in the per-epoch metrics.
    """
    from PIL import Image
    from tqdm import tqdm

    from catcascade.cnn_stage.decode_budget import check_dimensions
    from catcascade.cnn_stage.preprocessing import DecodeLimits

    limits = DecodeLimits()
    good, bad = [], []
    for s in tqdm(samples, desc="checking images", disable=not progress, leave=False):
        try:
            if s.path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"suffix {s.path.suffix!r} is not one of {sorted(IMAGE_SUFFIXES)}")
            if s.path.stat().st_size > limits.max_bytes:
                raise ValueError("file exceeds the decoder's size limit")
            with Image.open(s.path, formats=list(limits.formats)) as img:
                w, h = img.size
            check_dimensions(w, h, limits)  # side, pixel count and aspect ratio, as serving checks them
            good.append(s)
        except Exception as e:  # missing, truncated, wrong format: all are reported the same way
            bad.append(str(s.path))
            log.debug("unreadable image %s: %s", s.path, e)
    if bad:
        log.warning("skipped %d unreadable image(s) of %d (first: %s)", len(bad), len(samples), bad[0])
    return good, bad


DATASET_FORMATS = {
    "imagefolder": lambda spec: scan_image_folder(spec.root),
    "oxford": lambda spec: scan_oxford_pet(spec.root, spec.cats_only),
    "csv": lambda spec: scan_csv_manifest(spec.csv_file or Path(spec.root) / "labels.csv", spec.root),
}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def save_split(split: DatasetSplit, path: str | Path, root: str | Path, seed: int | None = None) -> Path:
    """Writes the split as JSON: labels, image paths relative to root (label by name), skipped files."""
    root = Path(root)
    labels = split.labels
    doc = {"labels": labels, "seed": seed,
           **{name: [[_relative(s.path, root), labels[s.label]] for s in part] for name, part in split.parts().items()},
           "skipped": split.skipped}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_split(path: str | Path, root: str | Path) -> DatasetSplit:
    """Reads a split written by `save_split` (a run is reproduced from this file alone)."""
    path, root = Path(path), Path(root)
    try:
        doc = json.loads(path.read_text())
        labels = list(doc["labels"])
        index = {name: i for i, name in enumerate(labels)}
        parts = {name: [Sample(Path(p) if Path(p).is_absolute() else root / p, index[lab]) for p, lab in doc[name]]
                 for name in SPLIT_NAMES}
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a split file written by catcascade train-cnn: {e!r}") from None
    return DatasetSplit(labels, parts["train"], parts["val"], parts["test"], list(doc.get("skipped", [])))


def resolve_split(spec: DatasetSpec, split_file: str | Path | None = None, save_to: str | Path | None = None,
                  seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  progress: bool = False) -> DatasetSplit:
    """The split to train on: ``split_file`` when given, else a fresh stratified split.

    A fresh split (seeded, stratified per class so rare breeds land in every part) is written
    to ``save_to`` so the run can be reproduced with ``--split-file``.
    """
    if split_file is not None:
        split = load_split(split_file, spec.root)
        log.info("using split %s: %d/%d/%d images", split_file, len(split.train), len(split.val), len(split.test))
        return split
    samples, labels = DATASET_FORMATS[spec.format](spec)
    samples, skipped = check_readable(samples, progress)
    if spec.official_split:
        test_set = {s.path for s in scan_oxford_pet(spec.root, spec.cats_only, "test")[0]}
        trainval_set = {s.path for s in scan_oxford_pet(spec.root, spec.cats_only, "trainval")[0]}
        test = [s for s in samples if s.path in test_set]
        trainval = [s for s in samples if s.path in trainval_set]
        val_share = fractions[1] / (fractions[0] + fractions[1])
        train, val = stratified_split(trainval, (1.0 - val_share, val_share), seed)
    else:
        train, val, test = stratified_split(samples, fractions, seed)
    if not train or not val:
        raise ValueError(f"split of {spec.root} left {len(train)} train and {len(val)} val images; "
                         "need at least one of each (more images per class?)")
    split = DatasetSplit(labels, train, val, test, skipped)
    if save_to is not None:
        save_split(split, save_to, spec.root, seed)
    log.info("split %s (seed %d): %d train, %d val, %d test, %d skipped", spec.root, seed,
             len(train), len(val), len(test), len(skipped))
    return split
