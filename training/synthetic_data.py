"""A built-in labelled image set: procedural "cats" whose class is a colour, stripe angle and
stripe frequency, drawn with noise so a small CNN learns it in seconds but not perfectly.

It stands in for a real breed dataset wherever no data can be downloaded (the demo, tests).
Written as JPEGs in ImageFolder layout so it goes through the same decode path as photos.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# The 12 cat breeds of Oxford-IIIT Pet, in Oxford's spelling.
DEMO_LABELS = [
    "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
    "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
]


def synthetic_image(class_index: int, num_classes: int, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One noisy image of ``class_index``; neighbouring classes share colour or stripe angle."""
    hue = (class_index % 6) / 6.0
    angle = np.pi * ((class_index // 2) % num_classes) / max(num_classes, 1) + rng.normal(0, 0.12)
    freq = 3.0 + 2.0 * (class_index % 3) + rng.normal(0, 0.3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    base = np.array([0.5 + 0.45 * np.cos(2 * np.pi * (hue + k / 3.0)) for k in range(3)])
    base = np.clip(base + rng.normal(0, 0.08, 3), 0, 1)
    img = stripes[..., None] * base + (1 - stripes[..., None]) * base[::-1] * 0.6
    # A darker blob ("the cat") at a random place, plus pixel noise.
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    img[blob] *= 0.7
    img = np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


def write_synthetic_dataset(out_dir: str | Path, labels: list[str] = DEMO_LABELS, per_class: int = 40,
                            size: int = 96, seed: int = 0, progress: bool = True) -> Path:
    """Writes ``per_class`` JPEGs per label under ``out_dir/<label>/`` and returns ``out_dir``."""
    from tqdm import tqdm

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs = [(ci, label, i) for ci, label in enumerate(labels) for i in range(per_class)]
    for ci, label, i in tqdm(jobs, desc="synthetic images", disable=not progress, leave=False):
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        synthetic_image(ci, len(labels), rng, size).save(folder / f"{label}_{i:04d}.jpg", quality=92)
    return out
