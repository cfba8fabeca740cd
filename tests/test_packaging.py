"""An installed wheel puts one top-level package into site-packages, ``catcascade``; the stage
folders go in as its sub-packages and the benchmarks, tests and tools stay out."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_installs_one_top_level_package(tmp_path):
    source = tmp_path / "src"  # pip builds in the tree it is given: a copy keeps build/ out of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "artifacts", "mutants", "build", "*.egg-info", "__pycache__", "docs", "shared"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, cwd=tmp_path, timeout=300)
    wheel = next(tmp_path.glob("catcascade-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"catcascade"}, top
    for module in ("catcascade/cli.py", "catcascade/serving/pipeline.py", "catcascade/serving/front_door/chain.py",
                   "catcascade/serving/api/cascade_pb2.py", "catcascade/serving/api/cascade_pb2.pyi",
                   "catcascade/cnn_stage/preprocessing.py", "catcascade/vlm_stage/families/__init__.py",
                   "catcascade/ensemble/bundle.py", "catcascade/training/train_cnn.py"):
        assert module in names, module
    assert not any(n.startswith(("catcascade/benchmarks/", "catcascade/tests/", "catcascade/tools/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "catcascade = catcascade.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_source_tree_resolves_the_installed_names():
    import catcascade
    import catcascade.serving.pipeline as pipeline

    assert Path(pipeline.__file__).resolve() == ROOT / "serving" / "pipeline.py"
    assert catcascade.__version__


def test_the_command_line_works_without_the_benchmarks(monkeypatch):
    """A wheel install has no benchmarks/ package: the CLI builds without their commands."""
    import importlib

    from catcascade import cli

    real = importlib.import_module

    def import_module(name):
        if name.split(".")[0] == "benchmarks":
            raise ModuleNotFoundError(f"No module named {name!r}", name="benchmarks")
        return real(name)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert "serve" in commands and "classify" in commands and "bench-latency" not in commands
