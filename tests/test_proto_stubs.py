"""The committed stubs in serving/api must be what `make proto` generates from proto/."""
from __future__ import annotations

from catcascade.serving.api.generate import GENERATED, PACKAGE_PATH, REPO_ROOT, generate


def test_generated_stubs_are_up_to_date(tmp_path):
    fresh = generate(tmp_path)
    for path in fresh:
        committed = REPO_ROOT / PACKAGE_PATH / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"
    assert {p.name for p in fresh} == set(GENERATED)
