"""The layering docs/architecture.md promises: no module imports a higher layer, and no two
project modules import each other (directly or around a loop), lazy imports included."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module may import its own layer and the ones below it.
LAYERS: list[tuple[str, ...]] = [
    ("catcascade.errors",),
    ("catcascade.cnn_stage", "catcascade.vlm_stage"),
    ("catcascade.ensemble",),
    ("catcascade.training",),
    # the client speaks the server's protocol (serving/api) and serving's commands use it: one layer
    ("catcascade.serving", "catcascade.client"),
    ("benchmarks",),
    ("catcascade",),  # the command line: assembles every layer's commands
]
STAGES = ("cnn_stage", "vlm_stage", "ensemble", "training", "serving")
PACKAGES = ("catcascade", *STAGES, "benchmarks")


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "api" in path.relative_to(ROOT).parts and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated gRPC stubs
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            prefix = ("catcascade",) if pkg in STAGES else ()  # installed as catcascade.<stage> (setup.py)
            mods[".".join(prefix + parts)] = path
    return mods


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # the longest known module that the name denotes
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def test_every_project_module_has_a_layer():
    assert all(layer_of(m) >= 0 for m in project_modules()), [m for m in project_modules() if layer_of(m) < 0]


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in import_graph().items() for d in deps
              if layer_of(d) > layer_of(m) and not (d.startswith(m + ".") or m.startswith(d + "."))]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its modules is not a cycle with them
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".") and not m.startswith(d + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a stage module importing serving is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from catcascade.serving.pipeline import CascadePipeline\n")
    deps = imports_of(bad, set(project_modules()))
    assert "catcascade.serving.pipeline" in deps and layer_of("catcascade.serving.pipeline") > layer_of("catcascade.cnn_stage.topk")


def test_repository_tracks_no_generated_dumps():
    """Profiler dumps and other generated output belong under artifacts/ (ignored), not in git."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dumps = [f for f in tracked if "onnxruntime_profile" in f or f.startswith("artifacts/") or f.endswith(".npz")]
    assert not dumps, dumps


def test_stages_are_imported_by_their_installed_name():
    """``serving.x`` and ``catcascade.serving.x`` would be two copies of one module in a source
    checkout (two exception classes, two registries): only the installed name is used."""
    old = []
    for path in [*ROOT.glob("*/**/*.py")]:
        if path.parts[len(ROOT.parts)] in (".venv", "mutants", "build") or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            old += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in STAGES]
    assert not old, "\n".join(old)
