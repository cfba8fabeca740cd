"""Runs a bundle over a labelled ImageFolder dataset and writes a score file.

The CNN (the bundle's ONNX model, through ONNX Runtime) scores every image; with vLLM URLs the
VLM is asked about every image's top-k, whatever its confidence, so any escalation budget can
be simulated afterwards from the file alone (ensemble/offline_eval.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catcascade.ensemble.score_files import ScoreSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreRunConfig:
    batch_size: int = 16
    cnn_threads: int | None = None
    vlm_urls: tuple[str, ...] = ()
    vlm_model: str | None = None
    """vLLM model name; default: the bundle's adapter, else its served base model."""
    vlm_concurrency: int = 4
    vlm_timeout_s: float = 60.0
    limit: int | None = None
    """Score at most this many images (an evenly spaced subset, every class kept if possible)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.vlm_concurrency < 1:
            raise ValueError(f"batch_size and vlm_concurrency must be >= 1, got {self.batch_size}, {self.vlm_concurrency}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def _samples(data_dir: Path, bundle_labels: list[str], limit: int | None):
    """(path, bundle class index) for every image whose folder names a bundle label."""
    from catcascade.training.image_folder import scan_image_folder

    samples, folders = scan_image_folder(data_dir)
    unknown = [f for f in folders if f not in bundle_labels]
    if unknown:
        raise ValueError(f"dataset classes not among the bundle's labels: {unknown} (bundle labels: {bundle_labels})")
    items = [(s.path, bundle_labels.index(folders[s.label])) for s in samples]
    if not items:
        raise ValueError(f"no images (.jpg/.jpeg/.png/.webp) under {data_dir}")
    if limit is not None and limit < len(items):
        # interleave classes so a small limit still covers them
        by_class: dict[int, list] = {}
        for it in items:
            by_class.setdefault(it[1], []).append(it)
        order = [it for rank in range(max(len(v) for v in by_class.values()))
                 for c in sorted(by_class) for it in by_class[c][rank:rank + 1]]
        items = order[:limit]
    return items


def _cnn_pass(bundle, items, cfg: ScoreRunConfig):
    from tqdm import tqdm

    from catcascade.cnn_stage.onnx_runtime import make_classifier
    from catcascade.cnn_stage.preprocessing import InvalidImageError, load_and_preprocess

    onnx = make_classifier(bundle.cnn_path, threads=cfg.cnn_threads)
    pp = bundle.preprocess
    kept, logits, skipped = [], [], []
    bar = tqdm(total=len(items), desc="CNN", unit="img", disable=not cfg.progress)
    for start in range(0, len(items), cfg.batch_size):
        xs = []
        for path, label in items[start:start + cfg.batch_size]:
            try:
                xs.append(load_and_preprocess(path.read_bytes(), pp))
                kept.append((path, label))
            except (InvalidImageError, OSError) as e:
                log.warning("skipping unreadable image %s: %s", path, e)
                skipped.append(str(path))
        if xs:
            logits.append(onnx.run(np.stack(xs)))
        bar.update(len(items[start:start + cfg.batch_size]))
    bar.close()
    if not kept:
        raise ValueError("no image could be decoded")
    return kept, np.concatenate(logits).astype(np.float32), skipped


async def _vlm_pass(bundle, paths, candidates, cfg: ScoreRunConfig, client_config):
    from tqdm import tqdm

    from catcascade.cnn_stage.preprocessing import decode_image
    from catcascade.vlm_stage.vllm_client import VllmVerifier

    verifier = VllmVerifier(client_config)
    labels = bundle.labels
    scores = np.full(candidates.shape, np.nan, dtype=np.float32)
    none = np.full(len(paths), np.nan, dtype=np.float32)
    failures: list[str] = []
    sem = asyncio.Semaphore(cfg.vlm_concurrency)
    bar = tqdm(total=len(paths), desc="VLM", unit="img", disable=not cfg.progress)

    async def one(i: int) -> None:
        async with sem:
            try:
                img = await asyncio.to_thread(decode_image, Path(paths[i]).read_bytes())
                res = await verifier.verify(img, tuple(labels[c] for c in candidates[i]))
                scores[i] = res.probabilities
                none[i] = res.none_probability
            except Exception as e:  # recorded as NaN: the offline cascade answers CNN-only there
                log.warning("VLM failed on %s: %s", paths[i], e)
                failures.append(f"{paths[i]}: {e}"[:300])
            finally:
                bar.update(1)

    try:
        await verifier.warm_up(tuple(labels[c] for c in candidates[0]))
        await asyncio.gather(*(one(i) for i in range(len(paths))))
    finally:
        bar.close()
        await verifier.aclose()
    requests = verifier.requests_sent
    return scores, none, failures, requests


def score_image_folder(bundle_dir: str | Path, data_dir: str | Path, cfg: ScoreRunConfig = ScoreRunConfig()) -> ScoreSet:
    """Scores ``data_dir/<label>/<image>`` with the bundle's CNN (and VLM when URLs are given)."""
    from catcascade.ensemble.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    data_dir = Path(data_dir)
    items = _samples(data_dir, m.labels, cfg.limit)
    t0 = time.perf_counter()
    kept, logits, skipped = _cnn_pass(bundle, items, cfg)
    k = m.cascade.top_k
    candidates = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)
    meta = {"bundle": str(bundle_dir), "bundle_version": bundle.version_string, "dataset": str(data_dir),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped_images": skipped,
            "cnn_seconds": round(time.perf_counter() - t0, 2), "vlm_model": None, "vlm_requests_per_image": 0}
    vlm_scores = vlm_none = None
    if cfg.vlm_urls:
        from catcascade.ensemble.vlm_client_settings import bundle_vlm_client_config

        if m.vlm is None and cfg.vlm_model is None:
            raise ValueError("no VLM model name: pass --vlm-model, or use a bundle with a vlm section")
        client_config = bundle_vlm_client_config(bundle, cfg.vlm_urls, model=cfg.vlm_model, timeout_s=cfg.vlm_timeout_s)
        t1 = time.perf_counter()
        vlm_scores, vlm_none, failures, requests = asyncio.run(
            _vlm_pass(bundle, [str(p) for p, _ in kept], candidates, cfg, client_config))
        model, mode = client_config.model, client_config.scoring_mode.value
        meta.update(vlm_model=model, vlm_urls=list(cfg.vlm_urls), vlm_failures=failures, vlm_scoring_mode=mode,
                    vlm_requests_per_image=k if mode == "yes_no" else 1, vlm_requests_sent=requests,
                    vlm_seconds=round(time.perf_counter() - t1, 2))
    else:
        candidates = np.full_like(candidates, -1)
    ids = [str(p.relative_to(data_dir)) for p, _ in kept]
    return ScoreSet(ids=ids, labels=[lab for _, lab in kept], label_names=m.labels, cnn_logits=logits,
                    temperature=m.cnn.temperature, vlm_candidates=candidates, vlm_scores=vlm_scores,
                    vlm_none=vlm_none, meta=meta)
