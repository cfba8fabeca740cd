"""The suite's own helpers: a missing prerequisite skips locally and fails under CI."""
from __future__ import annotations

import pytest

from tests.conftest import import_or_missing, missing


def test_missing_prerequisite_skips_without_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="grpcurl"):
        missing("grpcurl not installed")


def test_missing_prerequisite_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        missing("grpcurl not installed")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_here is not installed"):
        import_or_missing("no_such_module_here", "requirements/dev.txt")
    assert import_or_missing("json", "stdlib").dumps([1]) == "[1]"
