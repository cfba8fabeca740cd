"""Compute threads below the event loop: under overload, taking in requests comes first.

The event loop takes in every request, refuses the excess and sends every answer; decode and
CNN threads only compute. When they share a few cores at equal priority, a burst's compute
starves the loop: requests wait inside gRPC until their deadlines pass instead of being
refused, and finished answers wait to be sent. Running the compute threads at a higher nice
value (Linux: per thread, ``setpriority`` on its native id; a thread inherits the nice value of
the thread that starts it, so ONNX Runtime's own pool, built from a lowered thread, is lowered
too) lets the loop run whenever it has work; compute gets the rest, and the admission
controller measures that rest. Raising a nice value needs no privilege; elsewhere than Linux
this is a no-op.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def lower_current_thread(increment: int) -> None:
    """Raises the calling thread's nice value by ``increment`` (capped at 19)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError as e:  # e.g. a sandbox forbidding it: keep serving at equal priority
        log.warning("could not lower compute thread priority: %s", e)


def thread_niceness() -> int:
    """The calling thread's nice value (0 where unknown)."""
    if not sys.platform.startswith("linux"):
        return 0
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def build_in_lowered_thread(build: Callable[[], T], increment: int) -> T:
    """Runs ``build`` in a fresh thread lowered by ``increment``, so threads it starts (an ONNX
    Runtime session's intra-op pool) inherit the lower priority; returns what it returned."""
    if increment <= 0:
        return build()
    out: dict = {}

    def target() -> None:
        lower_current_thread(increment)
        try:
            out["value"] = build()
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, name="lowered-build")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
