"""Labelled image sets for CNN training: an ImageFolder layout read through the serving
decoder, so training sees exactly the pixels the server will see."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catcascade.cnn_stage.preprocessing import InvalidImageError, decode_image

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def scan_image_folder(root: str | Path) -> tuple[list[Sample], list[str]]:
    """``root/<label>/<image>`` -> samples and sorted labels."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(labels) < 2:
        raise ValueError(f"{root} needs at least two class sub-folders, found {labels}")
    samples = [Sample(p, i) for i, name in enumerate(labels)
               for p in sorted((root / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return samples, labels


def stratified_split(samples: list[Sample], fractions=(0.8, 0.1, 0.1), seed: int = 0) -> tuple[list[Sample], ...]:
    """Splits per class with a fixed seed, so rare classes appear in every part."""
    rng = np.random.default_rng(seed)
    parts: list[list[Sample]] = [[] for _ in fractions]
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        bounds = np.cumsum([0] + [round(f * len(items)) for f in fractions[:-1]] + [len(items)])
        bounds = np.minimum(bounds, len(items))
        for k in range(len(fractions)):
            parts[k].extend(items[i] for i in order[bounds[k]:bounds[k + 1]])
    return tuple(parts)


class ImageDataset:
    """A torch-style dataset over samples; unreadable images are skipped and counted."""

    def __init__(self, samples: list[Sample], transform, draft_size: int | None = None):
        self.samples = samples
        self.transform = transform
        self.draft_size = draft_size
        self.skipped: list[Path] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            img = decode_image(s.path.read_bytes(), draft_size=self.draft_size)
        except (InvalidImageError, OSError) as e:
            self.skipped.append(s.path)
            log.warning("skipping unreadable image %s: %s", s.path, e)
            return None
        return self.transform(img), s.label


def collate_skip_none(batch):
    import torch

    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
