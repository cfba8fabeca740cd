"""Score files: what both stages said about a labelled image set, for offline evaluation.

Written once by `catcascade score` (ensemble/score_runner.py), read by every offline tool, so
policies and blenders can be tried at any budget without running the models again. Format: a
NumPy ``.npz`` (no pickled objects; loaded with ``allow_pickle=False``) holding

    ids             (N,)   str      image id (path relative to the dataset root)
    labels          (N,)   int64    true class index into label_names
    label_names     (C,)   str      the bundle's labels, in logit order
    cnn_logits      (N, C) float32  raw CNN logits (before temperature)
    temperature     ()     float64  the bundle's calibration temperature
    vlm_candidates  (N, k) int64    class indices the VLM was asked about (CNN rank order); -1 = not asked
    vlm_scores      (N, k) float32  VLM probability per candidate; NaN where not asked or it failed
    vlm_none        (N,)   float32  VLM "none of these" probability; NaN where not asked
    meta            ()     str      JSON: format, format_version, bundle, vlm_model, vlm_requests_per_image, ...
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catcascade.cnn_stage.topk import softmax
from catcascade.errors import CatcascadeError

FORMAT = "catcascade-scores"
FORMAT_VERSION = 1
_ARRAYS = ("ids", "labels", "label_names", "cnn_logits", "temperature", "vlm_candidates", "vlm_scores", "vlm_none")


class ScoreFileError(CatcascadeError, ValueError):
    """A score file is missing, malformed or incompatible with another."""


@dataclass
class ScoreSet:
    ids: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    cnn_logits: np.ndarray
    temperature: float = 1.0
    vlm_candidates: np.ndarray | None = None
    vlm_scores: np.ndarray | None = None
    vlm_none: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids).astype(str)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.label_names = [str(s) for s in self.label_names]
        self.cnn_logits = np.asarray(self.cnn_logits, dtype=np.float32)
        n = len(self.labels)
        if self.vlm_candidates is None:
            self.vlm_candidates = np.full((n, 3), -1, dtype=np.int64)
        if self.vlm_scores is None:
            self.vlm_scores = np.full(self.vlm_candidates.shape, np.nan, dtype=np.float32)
        if self.vlm_none is None:
            self.vlm_none = np.full(n, np.nan, dtype=np.float32)
        self.vlm_candidates = np.asarray(self.vlm_candidates, dtype=np.int64)
        self.vlm_scores = np.asarray(self.vlm_scores, dtype=np.float32)
        self.vlm_none = np.asarray(self.vlm_none, dtype=np.float32)
        self.validate()

    def validate(self) -> None:
        n, c = len(self.labels), len(self.label_names)
        problems = []
        if self.cnn_logits.shape != (n, c):
            problems.append(f"cnn_logits has shape {self.cnn_logits.shape}, expected ({n}, {c})")
        if self.ids.shape != (n,):
            problems.append(f"ids has shape {self.ids.shape}, expected ({n},)")
        if n and (self.labels.min() < 0 or self.labels.max() >= c):
            problems.append(f"labels must lie in 0..{c - 1}")
        if self.vlm_candidates.ndim != 2 or len(self.vlm_candidates) != n:
            problems.append(f"vlm_candidates has shape {self.vlm_candidates.shape}, expected ({n}, k)")
        elif self.vlm_scores.shape != self.vlm_candidates.shape:
            problems.append(f"vlm_scores has shape {self.vlm_scores.shape}, expected {self.vlm_candidates.shape}")
        elif self.vlm_candidates.max(initial=-1) >= c:
            problems.append(f"vlm_candidates holds a class index >= {c}")
        if self.vlm_none.shape != (n,):
            problems.append(f"vlm_none has shape {self.vlm_none.shape}, expected ({n},)")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if problems:
            raise ScoreFileError("invalid score set: " + "; ".join(problems))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def top_k(self) -> int:
        return self.vlm_candidates.shape[1]

    @property
    def has_vlm(self) -> np.ndarray:
        """(N,) True where the VLM answered for every candidate."""
        return (self.vlm_candidates >= 0).all(axis=1) & np.isfinite(self.vlm_scores).all(axis=1)

    def cnn_probs(self, temperature: float | None = None) -> np.ndarray:
        return softmax(self.cnn_logits.astype(np.float64), self.temperature if temperature is None else temperature)

    def subset(self, rows: np.ndarray) -> "ScoreSet":
        rows = np.asarray(rows)
        return ScoreSet(self.ids[rows], self.labels[rows], self.label_names, self.cnn_logits[rows], self.temperature,
                        self.vlm_candidates[rows], self.vlm_scores[rows], self.vlm_none[rows], dict(self.meta))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.meta}
        np.savez_compressed(path, ids=self.ids, labels=self.labels, label_names=np.asarray(self.label_names),
                            cnn_logits=self.cnn_logits, temperature=np.float64(self.temperature),
                            vlm_candidates=self.vlm_candidates, vlm_scores=self.vlm_scores, vlm_none=self.vlm_none,
                            meta=np.asarray(json.dumps(meta)))
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> "ScoreSet":
        path = Path(path)
        if not path.is_file():
            raise ScoreFileError(f"score file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in (*_ARRAYS, "meta") if k not in z.files]
                if missing:
                    raise ScoreFileError(f"{path} is not a catcascade score file (missing {', '.join(missing)})")
                data = {k: z[k] for k in (*_ARRAYS, "meta")}
        except (OSError, ValueError) as e:
            if isinstance(e, ScoreFileError):
                raise
            raise ScoreFileError(f"cannot read score file {path}: {e}") from None
        meta = json.loads(str(data.pop("meta")))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ScoreFileError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r} "
                                 f"is not {FORMAT!r} version {FORMAT_VERSION}")
        return cls(ids=data["ids"], labels=data["labels"], label_names=data["label_names"].tolist(),
                   cnn_logits=data["cnn_logits"], temperature=float(data["temperature"]),
                   vlm_candidates=data["vlm_candidates"], vlm_scores=data["vlm_scores"], vlm_none=data["vlm_none"],
                   meta=meta)

    @classmethod
    def concat(cls, parts: list["ScoreSet"]) -> "ScoreSet":
        """Joins score files of one bundle (same labels, temperature and top-k)."""
        if not parts:
            raise ScoreFileError("no score sets to join")
        first = parts[0]
        for p in parts[1:]:
            if p.label_names != first.label_names or p.temperature != first.temperature or p.top_k != first.top_k:
                raise ScoreFileError("score files disagree on labels, temperature or top-k; they come from different "
                                     "bundles or settings and cannot be evaluated together")
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]), first.label_names,
                   np.concatenate([p.cnn_logits for p in parts]), first.temperature,
                   np.concatenate([p.vlm_candidates for p in parts]), np.concatenate([p.vlm_scores for p in parts]),
                   np.concatenate([p.vlm_none for p in parts]), dict(first.meta))
