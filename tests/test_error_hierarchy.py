"""One exception hierarchy: every exception class the project defines derives from
CatcascadeError, crosses Ray's process boundary typed, with its attributes, and maps to its gRPC
status through serving/status_codes.py's one table. The classes are found by reading the source,
so a new class without the base fails here."""
from __future__ import annotations

import ast
import copy
import builtins
import importlib
import inspect
from pathlib import Path

import grpc
import pytest

from catcascade.errors import CatcascadeError
from catcascade.serving import status_codes
from catcascade.serving.status_codes import INTERNAL_MESSAGE, MAX_MESSAGE_CHARS, status_of

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("cnn_stage", "vlm_stage", "ensemble", "training", "serving")
BUILTIN_EXCEPTIONS = {name for name, obj in vars(builtins).items()
                      if isinstance(obj, type) and issubclass(obj, BaseException) and not issubclass(obj, Warning)}
FOREIGN_EXCEPTIONS = {"grpc.RpcError", "RpcError"}
"""Bases from other libraries that make a class an exception."""

# What the front door answered before the table existed (serving/server.py's _compute), plus
# the front door's own two classes. Anything else is INTERNAL.
EXPECTED_CODES = {
    "InvalidImageError": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidRequestError": grpc.StatusCode.INVALID_ARGUMENT,
    "QueueFullError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DeadlineUnmeetableError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "AdmissionRefused": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "OverloadedError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UnknownVersionError": grpc.StatusCode.NOT_FOUND,
    "DeadlineExceededError": grpc.StatusCode.DEADLINE_EXCEEDED,
    "EngineUnavailableError": grpc.StatusCode.UNAVAILABLE,
    "VlmUnavailableError": grpc.StatusCode.UNAVAILABLE,
    "VersionRejected": grpc.StatusCode.FAILED_PRECONDITION,
    "BundleError": grpc.StatusCode.FAILED_PRECONDITION,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts if parts[0] == "catcascade" else ("catcascade", *parts))


def _source_files() -> list[Path]:
    files = list((ROOT / "catcascade").rglob("*.py"))
    for stage in STAGES:
        files += [p for p in (ROOT / stage).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    return sorted(files)


def exception_classes_in_source() -> list[tuple[str, str, int]]:
    """(module, class name, nesting column) of every class whose bases lead to an exception,
    found by name: a builtin exception, grpc.RpcError or another class found here."""
    classes = []  # (module, ClassDef)
    for path in _source_files():
        module = _module_name(path)
        classes += [(module, node) for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ClassDef)]
    exception_names = set(BUILTIN_EXCEPTIONS | FOREIGN_EXCEPTIONS)
    found: dict[tuple[str, str], int] = {}
    changed = True
    while changed:  # a class is an exception when one of its bases is; bases may come later in the walk
        changed = False
        for module, node in classes:
            bases = {ast.unparse(b) for b in node.bases}
            bases |= {b.rpartition(".")[2] for b in bases}
            if (module, node.name) not in found and bases & exception_names:
                found[(module, node.name)] = node.col_offset
                exception_names.add(node.name)
                changed = True
    return sorted((m, n, col) for (m, n), col in found.items())


def project_exception_classes() -> list[type[BaseException]]:
    out = []
    for module, name, col in exception_classes_in_source():
        assert col == 0, f"{module}.{name} is nested: define exception classes at module level (pickle finds them)"
        out.append(getattr(importlib.import_module(module), name))
    return out


CLASSES = project_exception_classes()
IDS = [f"{c.__module__}.{c.__qualname__}" for c in CLASSES]


def test_discovery_finds_the_known_classes():
    """Guards the discovery itself: were it to find nothing, every other test would pass."""
    names = {c.__name__ for c in CLASSES}
    known = {"CommandError", "InvalidImageError", "ScoringError", "RationaleError", "VlmUnavailableError",
             "AdapterLoadError", "AdapterServersUnreachable", "BundleError", "ScoreFileError",
             "VerificationDataError", "VersionRejected", "RoutingFileEmpty", "EngineUnavailableError",
             "QueueFullError", "DeadlineUnmeetableError", "AdmissionRefused", "DeadlineExceededError",
             "CatcascadeRpcError", "InvalidRequestError", "OverloadedError", "UnknownVersionError", "CatcascadeError"}
    assert known <= names, known - names


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_every_exception_class_derives_from_the_base(cls):
    assert issubclass(cls, CatcascadeError), f"{cls.__module__}.{cls.__name__} must derive from CatcascadeError"


@pytest.mark.parametrize(("name", "builtin"), [
    ("InvalidImageError", ValueError), ("ScoreFileError", ValueError), ("VerificationDataError", ValueError),
    ("ScoringError", RuntimeError), ("RationaleError", RuntimeError), ("VlmUnavailableError", RuntimeError),
    ("AdapterLoadError", RuntimeError), ("BundleError", RuntimeError), ("VersionRejected", RuntimeError),
    ("EngineUnavailableError", RuntimeError), ("QueueFullError", RuntimeError),
    ("DeadlineExceededError", RuntimeError), ("CatcascadeRpcError", grpc.RpcError)])
def test_existing_handlers_still_catch_them(name, builtin):
    """``except ValueError`` (and the like) written before the base existed still works."""
    (cls,) = [c for c in CLASSES if c.__name__ == name]
    assert issubclass(cls, builtin)


def _sample(param: inspect.Parameter):
    annotation = str(param.annotation)
    samples = {"str": f"{param.name} value", "list[str]": [f"{param.name}-a", f"{param.name}-b"], "int": 7,
               "float": 2.5, "grpc.StatusCode": grpc.StatusCode.ABORTED}
    assert annotation in samples, f"add a sample value for {param.name}: {annotation}"
    return samples[annotation]


def make(cls: type[BaseException]) -> BaseException:
    """An instance built with a value for every parameter, defaults included (so attributes
    that differ from their default must cross processes too)."""
    if cls.__init__ is BaseException.__init__:
        return cls(f"a {cls.__name__} happened")
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return cls(*[_sample(p) for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


def _same(a: BaseException, b: BaseException) -> None:
    assert type(b) is type(a)
    assert b.args == a.args
    assert str(b) == str(a)
    assert vars(b) == vars(a)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_crosses_the_ray_boundary_typed(cls):
    """Ray ships a task's exception in a RayTaskError and raises an instance of both; the caller
    can catch the project class and status_of answers with the cause's status. ``deepcopy``
    rebuilds the error through the same reduce protocol Ray's serializer uses, without
    deserialising bytes here."""
    ray_exceptions = pytest.importorskip("ray.exceptions")
    cause = make(cls)
    cause.note = "set after raising"  # attributes added later travel too
    wrapped = ray_exceptions.RayTaskError("classify", "Traceback (most recent call last):\n  secret frame", cause,
                                          proctitle="replica", pid=1, ip="127.0.0.1")
    shipped = copy.deepcopy(wrapped).as_instanceof_cause()
    assert isinstance(shipped, cls)
    _same(cause, shipped.cause)
    assert status_of(shipped) == status_of(cause)
    assert "secret frame" not in status_of(shipped)[1]


def expected_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """From EXPECTED_CODES by the nearest class name in the MRO (ChecksumMismatch is a BundleError)."""
    names = [cls.__name__ for cls in type(exc).__mro__]
    code = next((EXPECTED_CODES[n] for n in names if n in EXPECTED_CODES), grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.INTERNAL:
        return code, INTERNAL_MESSAGE
    prefix = "server overloaded: " if "QueueFullError" in names else ""
    return code, prefix + str(exc)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_status_of_each_class(cls):
    exc = make(cls)
    assert status_of(exc) == expected_status(exc)


def test_the_table_names_only_project_errors():
    assert all(issubclass(cls, CatcascadeError) for cls in status_codes.STATUS_CODES)
    assert all(isinstance(code, grpc.StatusCode) for code in status_codes.STATUS_CODES.values())


def test_most_specific_class_wins(monkeypatch):
    from catcascade.serving.batcher import DeadlineUnmeetableError, QueueFullError

    assert status_of(DeadlineUnmeetableError("2 ms left"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED  # inherited
    monkeypatch.setitem(status_codes.STATUS_CODES, DeadlineUnmeetableError, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert status_of(DeadlineUnmeetableError("2 ms left"))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(QueueFullError("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_subclass_follows_its_first_mapped_base():
    from catcascade.cnn_stage.decode_budget import InvalidImageError
    from catcascade.vlm_stage.vllm_client import VlmUnavailableError

    class ImageAndVlm(InvalidImageError, VlmUnavailableError):
        pass

    class VlmAndImage(VlmUnavailableError, InvalidImageError):
        pass

    assert status_of(ImageAndVlm("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(VlmAndImage("x"))[0] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("exc", [KeyError("/srv/models/secret.onnx"), RuntimeError("token=abc123"),
                                 ValueError("bad value in /etc/secret")], ids=repr)
def test_anything_else_is_internal_without_its_text(exc):
    code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert message == INTERNAL_MESSAGE


def test_project_error_without_entry_is_internal_without_its_text():
    from catcascade.vlm_stage.scoring import ScoringError

    assert status_of(ScoringError("model said 'secret'")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def test_message_is_bounded_and_names_no_class():
    from catcascade.cnn_stage.decode_budget import InvalidImageError

    code, message = status_of(InvalidImageError("x" * 5000, reason="dimensions"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) <= MAX_MESSAGE_CHARS and message.startswith("xxx")
    assert "InvalidImageError" not in status_of(InvalidImageError("not a JPEG"))[1]

