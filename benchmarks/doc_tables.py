"""Rewrites one benchmark's table in place in a Markdown page (docs/benchmarks.md), between
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``. Benchmarks write the results
page, never the README: a contributor's run should not change the front page."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PAGE = Path("docs/benchmarks.md")


def replace_between_markers(page: Path, name: str, body: str) -> None:
    """Swaps the text between the page's ``bench:<name>`` markers for ``body``."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    if Path(page).name.lower() == "readme.md":
        raise SystemExit(f"{page}: benchmarks write docs/benchmarks.md, not a README")
    text = Path(page).read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    Path(page).write_text(head + start + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1])


def relative_link(out_dir: Path, page: Path) -> str:
    """``out_dir`` as a link relative to the page that shows its plots."""
    return os.path.relpath(out_dir, Path(page).parent)
