"""`catcascade score`, `catcascade fit-cascade` and `catcascade bench-accuracy`.

Registered through serving.cli.COMMAND_REGISTRARS; heavy imports happen inside the handlers.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

DEFAULT_BUNDLE = Path("artifacts/demo-bundle")


@contextlib.contextmanager
def _user_errors():
    """Turns the predictable failures (bad paths, files, settings) into CliError messages."""
    from cnn_stage.bundle import BundleError
    from serving.cli import CliError

    try:
        yield
    except (ValueError, FileNotFoundError, BundleError) as e:
        raise CliError(str(e)) from None


def _score(args) -> int:
    from ensemble.score_runner import ScoreRunConfig, score_image_folder

    with _user_errors():
        cfg = ScoreRunConfig(batch_size=args.batch_size, vlm_urls=tuple(args.vlm_url), vlm_model=args.vlm_model,
                             vlm_concurrency=args.vlm_concurrency, limit=args.limit, progress=not args.no_progress)
        scores = score_image_folder(args.bundle, args.data, cfg)
        path = scores.save(args.out)
    n_vlm = int(scores.has_vlm.sum())
    print(f"wrote {path}: {len(scores)} images, {scores.num_classes} classes, VLM scores for {n_vlm}"
          + (f" ({len(scores.meta.get('skipped_images', []))} unreadable images skipped)"
             if scores.meta.get("skipped_images") else ""))
    return 0


def _fit_cascade(args) -> int:
    from ensemble.config import CascadeConfig
    from ensemble.offline_eval import fit_cascade
    from ensemble.score_files import ScoreSet

    with _user_errors():
        scores = ScoreSet.concat([ScoreSet.load(p) for p in args.scores])
        base = CascadeConfig.from_file(args.base) if args.base else None
        cfg = fit_cascade(scores, args.budget / 100.0, args.blender, args.metric, args.objective,
                          args.minority_boost, base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(cfg.model_dump_json(indent=2) + "\n")
    s = cfg.escalation.fit_summary or {}
    print(f"wrote {args.out}: {cfg.escalation.metric} threshold {cfg.escalation.threshold:.4f} "
          f"(+{len(cfg.escalation.class_thresholds)} per-class), fitted escalation rate "
          f"{100 * s.get('validation_rate', 0):.1f}%, blender {cfg.blend.method}")
    return 0


def _bench_accuracy(args) -> int:
    from benchmarks.accuracy import main

    with _user_errors():
        return main(args)


def register(subparsers) -> None:
    s = subparsers.add_parser("score", help="score a labelled ImageFolder dataset with a bundle (CNN, and the VLM "
                                            "on every image's top-k) into a score file for offline evaluation")
    s.add_argument("data", type=Path, help="dataset folder: <label>/<image>")
    s.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    s.add_argument("--out", type=Path, default=Path("artifacts/scores.npz"), help="score file to write (.npz)")
    s.add_argument("--vlm-url", action="append", default=[], help="vLLM base URL (repeatable); none = CNN only")
    s.add_argument("--vlm-model", help="vLLM model name (default: the bundle's adapter)")
    s.add_argument("--vlm-concurrency", type=int, default=4, help="VLM requests in flight")
    s.add_argument("--batch-size", type=int, default=16, help="CNN batch size")
    s.add_argument("--limit", type=int, help="score at most this many images (classes interleaved)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_score)

    f = subparsers.add_parser("fit-cascade", help="fit the escalation thresholds and blender on score files; "
                                                  "writes cascade settings (JSON) for a bundle manifest")
    f.add_argument("scores", type=Path, nargs="+", help="validation score files (the VLM must have run)")
    f.add_argument("--budget", type=float, required=True, help="escalation budget, percent of requests")
    f.add_argument("--blender", choices=["log_linear", "stacking"], default="log_linear")
    f.add_argument("--metric", choices=["top1", "margin", "entropy"], default="top1")
    f.add_argument("--objective", choices=["rate", "balanced_accuracy"], default="rate")
    f.add_argument("--minority-boost", type=float, default=1.0)
    f.add_argument("--base", type=Path, help="existing cascade settings (JSON/YAML) to start from")
    f.add_argument("--out", type=Path, default=Path("artifacts/cascade.json"))
    f.set_defaults(func=_fit_cascade)

    from benchmarks.accuracy import add_cli_args

    b = subparsers.add_parser("bench-accuracy", help="offline balanced-accuracy benchmark: CNN only, the cascade at "
                                                     "escalation budgets, VLM always (Markdown report + PNG plots)")
    add_cli_args(b)
    b.set_defaults(func=_bench_accuracy)
