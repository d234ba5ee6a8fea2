"""The BLAS thread count, for work that runs its own threads (charrnn.parallel).

numpy's GEMMs go to OpenBLAS, which splits each one over all cores.  Two of our threads
each calling a GEMM that wants both cores fight over them (slower than one thread alone),
so code that runs GEMMs on several threads first asks OpenBLAS for one thread per call.
numpy has no setter for this; OpenBLAS exports one, found here in the loaded library the
way threadpoolctl finds it.  Where there is no OpenBLAS (another BLAS, or not Linux)
`single_threaded()` yields False and the caller stays serial.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

_LOCK = threading.Lock()  # one thread-count change at a time


def _new_lock() -> None:
    """In a forked child: a thread of the parent may have held the lock at the fork."""
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


@cache
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get_num_threads, set_num_threads) of the OpenBLAS loaded in this process, or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    return get, set_
    return None


def controllable() -> bool:
    """Whether `single_threaded()` can set the BLAS thread count in this process."""
    return _openblas() is not None


@contextmanager
def single_threaded() -> Iterator[bool]:
    """Within: each BLAS call runs on its calling thread alone. Yields whether that could be
    arranged (False: no OpenBLAS found; nothing was changed)."""
    openblas = _openblas()
    if openblas is None:
        yield False
        return
    get, set_ = openblas
    with _LOCK:
        before = get()
        set_(1)
        try:
            yield True
        finally:
            set_(before)
