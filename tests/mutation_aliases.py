"""A pytest plugin for `make mutation` only: ``catcascade.serving.x`` is the module ``serving.x``.

mutmut names a mutant by its file's path under ``source_paths`` (``serving/batcher.py`` ->
``serving.batcher.xǁDynamicBatcherǁsubmit__mutmut_3``), and its trampolines switch a mutant on
only in a module whose ``__name__`` is that dotted path. The code imports itself as
``catcascade.serving.batcher`` (one installed namespace; ``catcascade/__init__.py`` extends its
path to the source root), so without this plugin no mutant is ever switched on and mutmut stops
("tests recorded trampoline hits but none match any mutant key").

Installed first on ``sys.meta_path``, the finder below answers every ``catcascade.<root>...``
import (``<root>`` one of the source folders) with the module ``<root>...`` itself: each module
exists once, under the name mutmut gave its mutants, and ``catcascade.serving.batcher`` is an
alias of it in ``sys.modules``. pyproject.toml's ``[tool.mutmut]`` loads it with ``-p``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

ROOTS = frozenset({"cnn_stage", "ensemble", "serving", "training", "vlm_stage"})
PREFIX = "catcascade."


class TopLevelAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``catcascade.serving.x`` -> the module ``serving.x`` (imported under that name)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(PREFIX) and fullname[len(PREFIX):].partition(".")[0] in ROOTS:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(spec.name[len(PREFIX):])

    def exec_module(self, module):
        """Nothing: ``create_module`` returned the module already executed under its own name."""


def install() -> None:
    if not any(isinstance(f, TopLevelAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, TopLevelAlias())


install()  # at import, as `-p tests.mutation_aliases` loads it: before any test module imports the code
