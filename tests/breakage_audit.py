"""Breaks the code on purpose, one change at a time, and checks that the suite notices.

    python -m tests.breakage_audit [--only NAME] [--keep]

Each breakage listed in issue #18's "Why" is applied to a throw-away git worktree of HEAD, then
the tests that should notice it run there (``pytest -x``, the worktree first on ``sys.path``);
a breakage that leaves them green is a hole in the suite. Prints one row per breakage with the
first failing test. Results: docs/dev/testing.md.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Breakage:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    """The tests expected to catch it: the fast ones first."""


BREAKAGES = (
    Breakage("the pipeline answers with the CNN's probabilities, never the blend", "serving/pipeline.py",
             "final = self.blender.blend(probs, cand, np.asarray(vlm_scores.probabilities))",
             "final = probs",
             ("tests/test_pipeline.py", "tests/test_integration_grpc.py")),
    Breakage("the pipeline ignores the bundle's temperature", "serving/pipeline.py",
             "probs = softmax(res.output, self.temperature)", "probs = softmax(res.output, 1.0)",
             ("tests/test_pipeline.py", "tests/test_integration_grpc.py")),
    Breakage("the pipeline always escalates (the policy asked in ALWAYS mode)", "serving/pipeline.py",
             "decision = self.policy.decide(probs, mode, size, sets.skip_singletons if sets is not None else True)",
             "decision = self.policy.decide(probs, EscalationMode.ALWAYS if mode != EscalationMode.NEVER else mode, "
             "size, sets.skip_singletons if sets is not None else True)",
             ("tests/test_pipeline.py", "tests/test_integration_grpc.py")),
    Breakage("the server never uses the blend (its blend weight 0)", "serving/app.py",
             "blender=make_blender(m.cascade.blend)",
             "blender=make_blender(m.cascade.blend.model_copy(update={'weight': 0.0}))",
             ("tests/test_integration_grpc.py::test_always_returns_vlm_scores_and_blends_them",
              "tests/test_integration_grpc.py::test_auto_mode_serves_the_bundles_policy_and_blend")),
    Breakage("the server ignores the bundle's temperature", "serving/app.py",
             "temperature=m.cnn.temperature,", "temperature=1.0,",
             ("tests/test_integration_grpc.py::test_cnn_probabilities_are_the_bundles_model_at_its_temperature",)),
    Breakage("the server escalates more than the bundle's policy says", "serving/app.py",
             "policy=EscalationPolicy(m.cascade.escalation)",
             "policy=EscalationPolicy(m.cascade.escalation.model_copy(update={'threshold': 1.0, "
             "'class_thresholds': {}}))",
             ("tests/test_integration_grpc.py::test_auto_mode_serves_the_bundles_policy_and_blend",)),
    Breakage("the breaker never resets its failure count on success", "serving/circuit_breaker.py",
             "            self._failures = 0\n            self.last_success = self._clock()",
             "            self.last_success = self._clock()",
             ("tests/test_hardening_units.py", "tests/test_serving_units.py", "tests/test_pipeline.py")),
    Breakage("softmax returns uniform values", "cnn_stage/topk.py",
             "    return e / e.sum(axis=-1, keepdims=True)",
             "    return np.full_like(e, 1.0 / e.shape[-1])",
             ("tests/test_cnn_stage.py", "tests/test_topk.py")),
    Breakage("INT8 agreement() always returns 1.0", "cnn_stage/quantization.py",
             "    return float((a.argmax(1) == b.argmax(1)).mean())", "    return 1.0",
             ("tests/test_cnn_int8.py",)),
)


def _first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return m.group(1) if m else "(no test failed)"


def audit(breakage: Breakage, keep: bool = False) -> tuple[bool, str]:
    """(caught, first failing test) for one breakage, in a fresh worktree of HEAD."""
    with tempfile.TemporaryDirectory(prefix="catcascade-audit-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), "HEAD"], cwd=REPO, check=True)
        try:
            target = tree / breakage.path
            source = target.read_text()
            if source.count(breakage.old) != 1:
                raise SystemExit(f"{breakage.name}: the text to break is not found once in {breakage.path}")
            target.write_text(source.replace(breakage.old, breakage.new))
            run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                  *breakage.tests], cwd=tree, capture_output=True, text=True)
            return run.returncode != 0, _first_failure(run.stdout)
        finally:
            if not keep:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the breakages whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the worktrees (for a look at a survivor)")
    args = ap.parse_args(argv)
    chosen = [b for b in BREAKAGES if not args.only or args.only in b.name]
    print("| breakage | caught | first failing test |\n| --- | --- | --- |", flush=True)
    missed = 0
    for b in chosen:
        caught, test = audit(b, args.keep)
        missed += not caught
        print(f"| {b.name} | {'yes' if caught else '**no**'} | `{test}` |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
