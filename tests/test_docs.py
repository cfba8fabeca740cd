"""The documentation a new user reads: a short README with the quick start up front, benchmark
tables on their own page (no benchmark or Makefile target rewrites the README), an index of
every page, no engineering history on user pages, links that resolve."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

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
    assert make.count("--update-doc docs/benchmarks.md") == 4  # bench, bench-features, bench-engines, bench-peers


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


# --- the documentation as a whole ------------------------------------------------------------

DOCS = REPO / "docs"
USER_PAGES = sorted([README, *DOCS.glob("*.md"), *DOCS.glob("guides/*.md"), *DOCS.glob("reference/*.md")])
"""What a user reads: the README and docs/ outside docs/dev/ (engineering history) and the
benchmark reports under docs/bench/ (written by the benchmarks themselves)."""
ISSUE_NUMBER = re.compile(r"(?<![\w/&])#\d+\b|\b[Ii]ssues? #?\d+\b")
COMMIT_HASH = re.compile(r"(?<![\w-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")
WORK_LOG = ("this session", "previous session", "previous landing", "first landing", "this work", "this branch",
            "hostile review", "work log", "before this work", "merged with main")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _strip_urls(text: str) -> str:
    return re.sub(r"https?://\S+", "", text)


def test_the_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    linked = {(DOCS / target.split("#")[0]).resolve() for target in LINK.findall(index)
              if not target.startswith(("http://", "https://"))}
    pages = {p.resolve() for p in DOCS.rglob("*.md")} - {(DOCS / "README.md").resolve()}
    assert sorted(str(p.relative_to(DOCS.resolve())) for p in pages - linked) == []
    assert "docs/README.md" in README.read_text()


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_user_pages_carry_no_issue_numbers_commit_hashes_or_work_log_wording(page):
    text = _strip_urls(page.read_text())
    assert ISSUE_NUMBER.findall(text) == []
    assert COMMIT_HASH.findall(text) == []
    lower = text.lower()
    assert [w for w in WORK_LOG if re.search(rf"\b{w}\b", lower)] == []


def test_the_history_scan_finds_what_it_looks_for():
    assert ISSUE_NUMBER.findall("fixed in #18 and issue 22; see issue #11") == ["#18", "issue 22", "issue #11"]
    assert ISSUE_NUMBER.findall("ray-project/ray#34103, &#39; `grpcurl ... #comment`") == []
    assert COMMIT_HASH.findall("at commit 7b46549, tree 0c22781abc") == ["7b46549", "0c22781abc"]
    assert COMMIT_HASH.findall("adapter cats-656525d99203, 20971520 bytes, deadbeef") == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


LINKED_PAGES = sorted({*USER_PAGES, REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md", *DOCS.glob("dev/*.md")})


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert broken == []


def test_the_slug_is_githubs():
    assert _slug("Training (`training/train_vlm.py`, `catcascade train-vlm`)") == \
        "training-trainingtrain_vlmpy-catcascade-train-vlm"
    assert _slug("`ray.cnn.autoscaling`") == "raycnnautoscaling"
    assert _slug("VLM_UNAVAILABLE: answers are CNN-only") == "vlm_unavailable-answers-are-cnn-only"


# --- documented settings and flags exist, with the documented defaults ----------------------

EXAMPLE_CONFIG = REPO / "configs" / "service.example.yaml"


def _defaults(model) -> dict:
    """Each field's default (nested models as dicts), or REQUIRED."""
    from pydantic import BaseModel

    out = {}
    for name, field in model.model_fields.items():
        if field.is_required():
            out[name] = "REQUIRED"
            continue
        value = field.get_default(call_default_factory=True)
        out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else \
            json.loads(json.dumps(value, default=str))
    return out


def _nested(model, name):
    from tools.generate_reference_docs import _nested_model

    return _nested_model(model.model_fields[name].annotation)


def _compare(data: dict, model, path: str, mismatches: list, examples_allowed: bool = False) -> None:
    defaults = _defaults(model)
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in model.model_fields:
            mismatches.append(f"{where}: no such field")
            continue
        sub = _nested(model, key)
        if sub is not None and isinstance(value, dict):
            _compare(value, sub, where + ".", mismatches, examples_allowed)
        elif examples_allowed and defaults[key] in ("REQUIRED", None):
            continue  # a commented-out example shows a value where there is no default
        elif json.loads(json.dumps(value, default=str)) != defaults[key]:
            mismatches.append(f"{where}: {value!r} in the example, default {defaults[key]!r}")


def _commented_blocks(text: str) -> dict:
    """The example's commented-out sections (``# models:`` and the indented lines under it)."""
    blocks, current = {}, None
    for line in text.splitlines():
        top = re.match(r"^# ([a-z_]+):(.*)$", line)
        if top:
            current = top.group(1)
            blocks[current] = []
            continue
        if current and re.match(r"^#   [a-z_]+:", line):
            blocks[current].append(line[1:])
        else:
            current = None
    return {k: yaml.safe_load("\n".join(v)) for k, v in blocks.items() if v}


def test_the_example_config_shows_every_value_at_its_default():
    import json as _json  # noqa: F401 - json is used by the helpers

    from catcascade.serving.commands import DEFAULT_BUNDLE
    from catcascade.serving.config import ServeConfig

    text = EXAMPLE_CONFIG.read_text()
    data = yaml.safe_load(text)
    assert data.pop("bundle") == str(DEFAULT_BUNDLE)  # what `serve` serves without --bundle or models
    mismatches: list[str] = []
    _compare(data, ServeConfig, "", mismatches)
    blocks = _commented_blocks(text)
    assert set(blocks) == {"models", "tls", "metrics_tls"}
    for name, block in blocks.items():
        _compare(block, _nested(ServeConfig, name), name + ".", mismatches, examples_allowed=True)
    assert mismatches == []
    # and serve without --config is the example: the same configuration
    from catcascade.cli import build_parser
    from catcascade.serving.commands import serve_config_from_args

    plain = serve_config_from_args(build_parser().parse_args(["serve"]))
    assert plain == ServeConfig.model_validate(yaml.safe_load(text))


def test_the_example_check_catches_a_value_that_is_not_the_default():
    from catcascade.serving.config import ServeConfig

    mismatches: list[str] = []
    _compare({"host": "0.0.0.0", "limits": {"max_side": 1}, "vlm": {"nonsense": 1}}, ServeConfig, "", mismatches)
    assert len(mismatches) == 3 and mismatches[0].startswith("host:")


NOT_SETTINGS = {"ray.kill", "ray.serve.llm", "vlm.adapter_dir"}
"""Dotted names in the docs that are not ServeConfig settings: Ray's Python API, a bundle
manifest's field."""


def _documented_config_names() -> set[str]:
    """Dotted settings named in user pages, e.g. `limits.max_decode_queue` (not file names)."""
    from catcascade.serving.config import ServeConfig

    sections = set(ServeConfig.model_fields)
    names = set()
    for page in USER_PAGES:
        for name in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", page.read_text()):
            if name.split(".")[0] in sections and not name.endswith(".py") and name not in NOT_SETTINGS:
                names.add(name)
    return names


def test_every_setting_the_docs_name_exists():
    from catcascade.serving.config import ServeConfig

    names = _documented_config_names()
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        model = ServeConfig
        for part in name.split("."):
            if model is None or part not in model.model_fields:
                missing.append(name)
                break
            model = _nested(model, part)
    assert missing == []


def _command_lines(text: str) -> list[list[str]]:
    """`catcascade COMMAND ...` invocations in a page's code (fenced blocks and inline code), as
    tokens up to a comment, pipe, `;`, `&` or a vLLM pass-through `--`."""
    blocks = re.findall(r"```.*?```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    code = "\n".join(blocks + inline).replace("\\\n", " ")
    out = []
    for m in re.finditer(r"(?:^|(?<=[\s/\"]))catcascade ([a-z][\w-]*[^\n|;&#]*)", code, re.M):
        tokens = m.group(1).split()
        if "--" in tokens:
            tokens = tokens[:tokens.index("--")]
        out.append(tokens)
    return out


def test_every_command_and_flag_the_docs_show_exists():
    import argparse

    from catcascade.cli import build_parser

    root = build_parser()
    commands = root._subparsers._group_actions[0].choices
    unknown, seen = [], 0
    for page in [*USER_PAGES, REPO / "CONTRIBUTING.md"]:
        for tokens in _command_lines(page.read_text()):
            if tokens[0] not in commands:
                unknown.append(f"{page.name}: catcascade {tokens[0]}")
                continue
            parser = commands[tokens[0]]
            sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            if sub and len(tokens) > 1 and tokens[1] in sub.choices:
                parser = sub.choices[tokens[1]]
            known = {o for a in parser._actions for o in a.option_strings}
            if sub:
                known |= {o for p in sub.choices.values() for a in p._actions for o in a.option_strings}
            for token in tokens[1:]:
                flag = token.split("=")[0]
                if re.fullmatch(r"--[a-z][a-z0-9-]*", flag):
                    seen += 1
                    if flag not in known:
                        unknown.append(f"{page.name}: catcascade {tokens[0]} {flag}")
    assert seen > 40 and unknown == []


def test_documented_flag_defaults_are_the_parsers():
    """Option tables (a `--flag` column and a default column) give each flag's real default."""
    from catcascade.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    checked, wrong = 0, []
    for page in USER_PAGES:
        command = None
        for line in page.read_text().splitlines():
            heading = re.match(r"^#+ .*`catcascade ([a-z][\w-]*)`", line)
            if heading:
                command = heading.group(1)
            row = re.match(r"^\| ((?:`--[a-z0-9-]+`(?:, )?)+) \| ([^|]*) \|", line)
            if not (row and command in commands):
                continue
            flags = re.findall(r"`(--[a-z0-9-]+)`", row.group(1))
            values = [v.strip() for v in row.group(2).split(",")]
            if len(values) != len(flags) or not all(re.fullmatch(r"[\d.e-]+", v) for v in values):
                continue  # prose defaults ("off, on with CUDA") are not numbers to compare
            actions = {o: a for a in commands[command]._actions for o in a.option_strings}
            for flag, value in zip(flags, values):
                checked += 1
                if float(value) != float(actions[flag].default):
                    wrong.append(f"{page.name}: {command} {flag} documented {value}, default {actions[flag].default}")
    assert checked >= 3 and wrong == []


def test_the_generated_reference_pages_are_current():
    from tools.generate_reference_docs import PAGES, REFERENCE

    stale = [name for name, render in PAGES.items() if (REFERENCE / name).read_text() != render()]
    assert stale == [], "run: .venv/bin/python -m tools.generate_reference_docs"


def test_the_metric_scan_finds_every_metric_the_server_registers():
    from prometheus_client import CollectorRegistry

    from catcascade.serving.metrics import ServiceMetrics
    from tools.generate_reference_docs import metric_definitions

    registry = CollectorRegistry()
    ServiceMetrics(registry)
    registered = {m.name for m in registry.collect()}
    scanned = {m["name"].removesuffix("_total") for m in metric_definitions()}
    assert registered and registered <= scanned


# --- no path into the build machine's shared folder -----------------------------------------

PRODUCT = ["catcascade", "serving", "cnn_stage", "vlm_stage", "ensemble", "training", "benchmarks", "tools",
           "configs", "deploy", "proto"]
SHARED_PATH = re.compile(r"shared/data|\.\./shared|[\"']shared[\"']\s*/\s*[\"']data[\"']")


def test_no_product_code_or_makefile_target_reads_the_build_machines_shared_data():
    offenders = []
    files = [REPO / "Makefile", *(p for d in PRODUCT for p in (REPO / d).rglob("*")
                                  if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".toml", ".proto", ".txt")
                                  or p.name.startswith("Dockerfile"))]
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if SHARED_PATH.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert len(files) > 100 and offenders == []
    assert SHARED_PATH.search('SAMPLE = ROOT.parent / "shared" / "data" / "cats"')
    assert SHARED_PATH.search("--data ../shared/data/oxford-pet-cats-sample")
