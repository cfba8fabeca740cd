"""catcascade: the one installed package.

The source keeps one folder per stage at the repository root (``cnn_stage/``, ``vlm_stage/``,
``ensemble/``, ``training/``, ``serving/``), as the design card lays them out; a wheel installs
them as ``catcascade.cnn_stage`` and so on (``setup.py`` maps the folders), so site-packages
gets one top-level name. In a source checkout the same names resolve to the root's folders:
this package's path is extended to the repository root below. ``benchmarks/``, ``tests/`` and
``tools/`` are not part of the package.

Here live the cross-cutting pieces: ``errors`` (every layer's base exception; imports nothing),
``cli`` (the ``catcascade`` command line) and ``client`` (the Python client).
"""
from __future__ import annotations

import os as _os

__version__ = "0.2.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "serving")) and _os.path.isfile(
        _os.path.join(_root, "serving", "__init__.py")):
    __path__.append(_root)  # noqa: F821 - a source checkout: catcascade.serving is <root>/serving
