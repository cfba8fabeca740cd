"""The documentation a new user reads: a short README with the quick start up front, benchmark
tables on their own page (no benchmark or Makefile target rewrites the README), an index of
every page, no engineering history on user pages, links that resolve."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_is_short_with_the_two_quick_start_commands_up_front():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150
    head = lines[:30]
    start = head.index("## Quick start")
    fence = [i for i in range(start, 30) if head[i].startswith("```")]
    assert len(fence) >= 2, "the quick-start code block must close within the first 30 lines"
    commands = [line.split("#")[0].strip() for line in head[fence[0] + 1:fence[1]]]
    assert commands == ["make demo", "make test"]


def test_readme_carries_no_benchmark_tables():
    text = README.read_text()
    assert "<!-- bench:" not in text
    assert not re.search(r"^\|.*\|\s*$", text, re.M), "tables belong in docs/, not the README"


def test_no_makefile_target_or_benchmark_writes_the_readme():
    assert "README" not in (REPO / "Makefile").read_text()
    for path in (REPO / "benchmarks").glob("*.py"):
        text = path.read_text()
        assert "update-readme" not in text and "update_readme" not in text, path.name
        assert "README.md" not in text, f"{path.name} names a README"


def test_benchmark_pages_are_rewritten_between_their_markers_and_a_readme_is_refused(tmp_path):
    from benchmarks.doc_tables import replace_between_markers

    page = (REPO / "docs" / "benchmarks.md").read_text()
    for name in ("latency", "features", "engines"):
        assert page.count(f"<!-- bench:{name}:start -->") == 1 and page.count(f"<!-- bench:{name}:end -->") == 1
    copy = tmp_path / "benchmarks.md"
    copy.write_text(page)
    replace_between_markers(copy, "engines", "| new | table |")
    new = copy.read_text()
    assert "<!-- bench:engines:start -->\n| new | table |\n<!-- bench:engines:end -->" in new
    assert new.split("<!-- bench:engines:start -->")[0] == page.split("<!-- bench:engines:start -->")[0]
    readme = tmp_path / "README.md"
    readme.write_text(page)
    with pytest.raises(SystemExit, match="not a README"):
        replace_between_markers(readme, "engines", "x")
    assert readme.read_text() == page


def test_the_bench_commands_point_at_the_benchmarks_page():
    from benchmarks.latency import add_cli_args
    import argparse

    p = argparse.ArgumentParser()
    add_cli_args(p)
    args = p.parse_args(["--update-doc", "docs/benchmarks.md", "--data", "photos"])
    assert args.update_doc == Path("docs/benchmarks.md") and args.images == Path("photos")
    make = (REPO / "Makefile").read_text()
    assert make.count("--update-doc docs/benchmarks.md") == 3


def test_licence_changelog_and_contributing_guide():
    import tomllib

    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence
    assert "END OF TERMS AND CONDITIONS" in licence and licence.count("\n") > 190  # the full text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    changelog = (REPO / "CHANGELOG.md").read_text()
    import catcascade

    assert f"## [{catcascade.__version__}]" in changelog and "## [Unreleased]" in changelog
    contributing = (REPO / "CONTRIBUTING.md").read_text()
    for needed in ("make test", "make bench", "docs/architecture.md", "tests/test_layering.py", "serving/"):
        assert needed in contributing, needed
