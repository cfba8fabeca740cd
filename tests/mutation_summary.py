"""Kill rate per module from a finished `mutmut run` (what `make mutation` prints).

    python -m tests.mutation_summary [--survivors]

Reads `mutmut results --all true` ("name: status" per mutant). Killed means a test failed
(or the mutant hung past mutmut's timeout); "no tests" counts as survived: no fast unit test
reaches that code. With --survivors, each surviving mutant's diff follows the table.
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check"}
NOT_RUN = {"not checked", "skipped"}
_LINE = re.compile(r"^\s*(?P<name>\S+): (?P<status>.+?)\s*$")


def _mutmut() -> str:
    return shutil.which("mutmut") or str(Path(sys.executable).parent / "mutmut")


def module_of(mutant: str) -> str:
    """'serving.front_door.chain.xǁFrontDoorǁclassify__mutmut_3' -> 'serving/front_door/chain.py'.

    mutmut names a mutant by its file's path under ``source_paths``, not by the name the code
    imports it as (``catcascade.serving...``; tests/mutation_aliases.py maps the one to the other)."""
    head = re.split(r"\.x(?:_|ǁ)", mutant, maxsplit=1)[0]
    return head.replace(".", "/") + ".py"


def parse(results: str) -> dict[str, str]:
    return {m["name"]: m["status"] for m in map(_LINE.match, results.splitlines()) if m}


def table(statuses: dict[str, str]) -> tuple[str, list[str]]:
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, status in statuses.items():
        per[module_of(name)][status] += 1
    rows = ["| module | mutants | killed | survived | no tests | not run | kill rate |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    total = collections.Counter()
    for module in sorted(per):
        c = per[module]
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("**all core modules**", total))
    survivors = sorted(n for n, s in statuses.items() if s not in KILLED | NOT_RUN)
    return "\n".join(rows), survivors


def _row(name: str, c: collections.Counter) -> str:
    killed = sum(c[s] for s in KILLED)
    run = sum(c.values()) - sum(c[s] for s in NOT_RUN)
    rate = f"{100.0 * killed / run:.1f}%" if run else "n/a"
    return (f"| {name} | {sum(c.values())} | {killed} | {c['survived'] + c['suspicious']} | {c['no tests']} | "
            f"{sum(c[s] for s in NOT_RUN)} | {rate} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="print each surviving mutant's diff")
    args = parser.parse_args(argv)
    out = subprocess.run([_mutmut(), "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    statuses = parse(out)
    if not statuses:
        print("no mutmut results: run `make mutation` first", file=sys.stderr)
        return 1
    text, survivors = table(statuses)
    print(text)
    print(f"\n{len(survivors)} surviving mutant(s)" + (":" if survivors else ""))
    for name in survivors:
        if args.survivors:
            diff = subprocess.run([_mutmut(), "show", name], capture_output=True, text=True).stdout
            print(f"\n## {name} ({statuses[name]})\n" + "\n".join(
                line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")))
        else:
            print(f"  {name} ({statuses[name]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
