"""numba for the plan's compiled kernels, imported and compiled lazily.

Importing numba and loading a kernel from its on-disk cache costs ~0.7 s, most of it before
any row is read; :func:`warm_in_background` starts that on a thread when a plan begins (LLVM's
own work releases the GIL), so the box read finds the kernels ready. Modules with kernels
register an ``ensure`` function that swaps their plain-Python definitions for compiled ones.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["available", "compile_once", "njit", "warm_in_background"]

_lock = threading.RLock()
_done: set[str] = set()


def available() -> bool:
    """Whether numba is installed (checked without importing it)."""
    return importlib.util.find_spec("numba") is not None


def njit(fn: Callable[..., Any]) -> Any:
    """``numba.njit(nogil=True, cache=True)(fn)``."""
    import numba

    return numba.njit(nogil=True, cache=True)(fn)


def compile_once(name: str, build: Callable[[], None]) -> None:
    """Run ``build`` (compile and load one module's kernels) once per process, under a lock."""
    if name in _done:
        return
    with _lock:
        if name not in _done:
            build()
            _done.add(name)


def warm_in_background(*ensure: Callable[[], None]) -> threading.Thread | None:
    """Run each ``ensure`` on a daemon thread (None without numba); failures surface, and are
    logged, when the kernels are first used for real."""
    if not available():
        return None

    def run() -> None:
        for fn in ensure:
            try:
                fn()
            except Exception as exc:  # the caller's own call raises it again, with context
                log.debug("warming compiled kernels failed: %s", exc)

    t = threading.Thread(target=run, name="oiod-jit-warm", daemon=True)
    t.start()
    return t
