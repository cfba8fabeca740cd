"""`catcascade fit-cascade`.

Registered through catcascade.cli.COMMAND_REGISTRARS; heavy imports happen inside the handlers.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

DEFAULT_BUNDLE = Path("artifacts/demo-bundle")


@contextlib.contextmanager
def user_errors():
    """Turns the predictable failures (bad paths, files, settings) into CommandError messages."""
    from ensemble.bundle import BundleError
    from catcascade.errors import CommandError

    try:
        yield
    except (ValueError, FileNotFoundError, BundleError) as e:
        raise CommandError(str(e)) from None


def _fit_cascade(args) -> int:
    from ensemble.config import CascadeConfig
    from ensemble.offline_eval import fit_cascade
    from ensemble.score_files import ScoreSet

    with user_errors():
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


def register(subparsers) -> None:
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
