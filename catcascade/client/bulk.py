"""What many-image calls share: the progress bar."""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, desc: str = "classify"):
    """A tqdm bar on stderr (an object with ``update(n)`` that does nothing when disabled)."""
    from tqdm import tqdm

    with tqdm(total=total, disable=not enabled, desc=desc, unit="img", file=sys.stderr, leave=False) as bar:
        yield bar
