"""Stopping background work when the interpreter exits.

A thread still inside a torch call when the interpreter finalises takes the process down
("terminate called without an active exception"). :func:`run_at_exit` registers a stop function
once, both with ``atexit`` and where ``concurrent.futures`` registers its own hook
(``threading._register_atexit``: run before ``atexit``, latest first), so that background work
stops before the thread pools it may write through (zarr's) are shut down under it.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable

_REGISTERED: set[Callable[[], None]] = set()


def run_at_exit(fn: Callable[[], None]) -> None:
    """Call ``fn()`` at interpreter exit, before the thread pools shut down (once per function)."""
    if fn in _REGISTERED:
        return
    _REGISTERED.add(fn)
    atexit.register(fn)
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(fn)
