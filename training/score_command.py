"""`catcascade score`: runs a bundle over a labelled image folder into a score file, the data
that `fit-cascade` and `bench-accuracy` learn and measure the cascade on."""
from __future__ import annotations

from pathlib import Path

from catcascade.ensemble.cli_commands import DEFAULT_BUNDLE, user_errors


def _score(args) -> int:
    from catcascade.training.score_runner import ScoreRunConfig, score_image_folder

    with user_errors():
        cfg = ScoreRunConfig(batch_size=args.batch_size, vlm_urls=tuple(args.vlm_url), vlm_model=args.vlm_model,
                             vlm_concurrency=args.vlm_concurrency, limit=args.limit, progress=not args.no_progress)
        scores = score_image_folder(args.bundle, args.data, cfg)
        path = scores.save(args.out)
    n_vlm = int(scores.has_vlm.sum())
    print(f"wrote {path}: {len(scores)} images, {scores.num_classes} classes, VLM scores for {n_vlm}"
          + (f" ({len(scores.meta.get('skipped_images', []))} unreadable images skipped)"
             if scores.meta.get("skipped_images") else ""))
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser("score", help="score a labelled ImageFolder dataset with a bundle (CNN, and the VLM "
                                            "on every image's top-k) into a score file for offline evaluation")
    s.add_argument("data", type=Path, help="dataset folder: <label>/<image>")
    s.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle whose CNN (and VLM) to score with")
    s.add_argument("--out", type=Path, default=Path("artifacts/scores.npz"), help="score file to write (.npz)")
    s.add_argument("--vlm-url", action="append", default=[], help="vLLM base URL (repeatable); none = CNN only")
    s.add_argument("--vlm-model", help="vLLM model name (default: the bundle's adapter)")
    s.add_argument("--vlm-concurrency", type=int, default=4, help="VLM requests in flight")
    s.add_argument("--batch-size", type=int, default=16, help="CNN batch size")
    s.add_argument("--limit", type=int, help="score at most this many images (classes interleaved)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_score)
