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
    from catcascade.ensemble.bundle import BundleError
    from catcascade.errors import CommandError

    try:
        yield
    except (ValueError, FileNotFoundError, BundleError) as e:
        raise CommandError(str(e)) from None


def _compare_rules(scores, args) -> None:
    """The deferral rules on the same cross-fitted folds, printed as a table (what the learned
    rule is worth against top1, margin and entropy on these scores)."""
    from catcascade.ensemble.offline_eval import OfflineEvalConfig, evaluate_offline

    budget = args.budget / 100.0
    result = evaluate_offline(scores, OfflineEvalConfig(
        budgets=(budget,), blender=args.blender, minority_boost=args.minority_boost, folds=args.folds,
        conformal_alpha=None, bootstrap=args.bootstrap, seed=args.seed))
    d = result.deferral
    if not d.get("rules"):
        return
    grid = d["budgets"]
    j = min(range(len(grid)), key=lambda i: abs(grid[i] - budget))
    print(f"deferral rules on the same {args.folds} cross-fitted folds (balanced accuracy %, bootstrap 95% interval):")
    print(f"  {'rule':8s} {'area under curve':>24s} {f'at {100 * grid[j]:g}%':>24s} {'escalation for 90% gain':>24s}")
    for rule, e in d["rules"].items():
        def pct(v, ci=None):
            if v is None:
                return "not reached"
            return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
        ci_at = e["balanced_accuracy_ci"][j] if e.get("balanced_accuracy_ci") else None
        print(f"  {rule:8s} {pct(e['auc'], e.get('auc_ci')):>24s} {pct(e['balanced_accuracy'][j], ci_at):>24s} "
              f"{pct(e['rate_for_90pct_gain']):>24s}")
    print(f"  CNN only {100 * d['cnn_balanced_accuracy']:.1f}; every image escalated "
          f"{100 * d['vlm_always_balanced_accuracy']:.1f}")


def _fit_cascade(args) -> int:
    from catcascade.ensemble.config import CascadeConfig
    from catcascade.ensemble.offline_eval import fit_cascade
    from catcascade.ensemble.score_files import ScoreSet

    with user_errors():
        scores = ScoreSet.concat([ScoreSet.load(p) for p in args.scores])
        base = CascadeConfig.from_file(args.base) if args.base else None
        if args.compare if args.compare is not None else args.metric == "learned":
            _compare_rules(scores, args)
        cfg = fit_cascade(scores, args.budget / 100.0, args.blender, args.metric, args.objective,
                          args.minority_boost, base, learned_C=args.learned_c, conformal_alpha=args.conformal_alpha,
                          conformal_method=args.conformal_method, conformal_max_size=args.conformal_max_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(cfg.model_dump_json(indent=2) + "\n")
    s = cfg.escalation.fit_summary or {}
    sets = cfg.candidate_sets
    extra = (f", {sets.method} candidate sets (alpha {sets.alpha}, at most {sets.max_size}; calibration coverage "
             f"{100 * sets.fit_summary['calibration_coverage']:.1f}%, mean size "
             f"{sets.fit_summary['calibration_mean_size']:.2f})" if sets else "")
    print(f"wrote {args.out}: {cfg.escalation.metric} threshold {cfg.escalation.threshold:.4f} "
          f"(+{len(cfg.escalation.class_thresholds)} per-class), fitted escalation rate "
          f"{100 * s.get('validation_rate', 0):.1f}%, blender {cfg.blend.method}{extra}")
    return 0


def _alpha(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha is a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 1), got {text!r}")
    return value


def register(subparsers) -> None:
    import argparse

    f = subparsers.add_parser("fit-cascade", help="fit the escalation thresholds and blender on score files; "
                                                  "writes cascade settings (JSON) for a bundle manifest")
    f.add_argument("scores", type=Path, nargs="+", help="validation score files (the VLM must have run)")
    f.add_argument("--budget", type=float, required=True, help="escalation budget, percent of requests")
    f.add_argument("--blender", choices=["log_linear", "stacking"], default="log_linear",
                   help="how CNN and VLM scores are combined")
    f.add_argument("--deferral", "--metric", dest="metric", choices=["top1", "margin", "entropy", "learned"],
                   default="top1", help="deferral rule: a confidence score, or the learned rule (--metric: old name)")
    f.add_argument("--learned-c", type=float, default=1.0, help="learned rule: inverse regularisation strength")
    f.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="first compare the deferral rules on cross-fitted folds (default: on with --deferral learned)")
    f.add_argument("--folds", type=int, default=2, help="--compare: cross-fitting folds")
    f.add_argument("--bootstrap", type=int, default=200, help="--compare: bootstrap resamples (0: no intervals)")
    f.add_argument("--seed", type=int, default=0, help="random seed (folds, bootstrap)")
    f.add_argument("--conformal-alpha", type=_alpha,
                   help="also calibrate conformal candidate sets (1 - alpha coverage)")
    f.add_argument("--conformal-method", choices=["aps", "raps"], default="raps", help="conformal score")
    f.add_argument("--conformal-max-size", type=int, default=5, help="cap on a candidate set's size")
    f.add_argument("--objective", choices=["rate", "balanced_accuracy"], default="rate",
                   help="fit thresholds to the budget's rate, or to the best balanced accuracy within it")
    f.add_argument("--minority-boost", type=float, default=1.0,
                   help="minority classes escalate this many times as often (per-class thresholds)")
    f.add_argument("--base", type=Path, help="existing cascade settings (JSON/YAML) to start from")
    f.add_argument("--out", type=Path, default=Path("artifacts/cascade.json"), help="cascade settings (JSON) to write")
    f.set_defaults(func=_fit_cascade)
