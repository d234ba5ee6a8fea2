"""The BLAS thread count, for work that runs its own threads (charrnn.parallel).

numpy's GEMMs go to its BLAS (OpenBLAS in the wheels; MKL, BLIS or FlexiBLAS in other
builds), which splits each one over all cores.  Two of our threads each calling a GEMM that
wants both cores fight over them (slower than one thread alone), so code that runs GEMMs on
several threads first asks the BLAS for one thread per call.  numpy has no setter for this;
threadpoolctl finds the BLAS libraries loaded in the process and sets their thread counts.
Where it controls none (Apple's Accelerate, a BLAS it does not know) `single_threaded()`
yields False and the caller stays serial.

The libraries are looked up once, on first use (numpy imported first: it loads its BLAS),
and kept: a lookup inspects every loaded library (a fraction of a millisecond, more with
many), a thread-count change with the kept controller costs microseconds, and
`single_threaded()` is entered for every training and evaluation window.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from threadpoolctl import ThreadpoolController

_LOCK = threading.RLock()  # one thread-count change at a time; the holder may nest


def _new_lock() -> None:
    """In a forked child: a thread of the parent may have held the lock at the fork."""
    global _LOCK
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_new_lock)


@cache
def _controller() -> ThreadpoolController:
    """threadpoolctl's controller of the BLAS libraries loaded in this process (maybe none)."""
    import numpy  # noqa: F401  (loads numpy's BLAS, so that it is found)

    return ThreadpoolController().select(user_api="blas")


def controllable() -> bool:
    """Whether `single_threaded()` can set the BLAS thread count in this process."""
    return len(_controller().lib_controllers) > 0


def numpy_blas() -> str:
    """The BLAS numpy was built with, from its build configuration ("unknown" when it does
    not say; numpy < 1.26 has no machine-readable one)."""
    import numpy as np

    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # no `mode` (numpy < 1.26), or another layout
        return "unknown"
    if not info.get("found", True):
        return "none"
    return f"{info.get('name', 'unknown')} {info.get('version', '')}".strip()


@contextmanager
def single_threaded() -> Iterator[bool]:
    """Within: each BLAS call runs on its calling thread alone. Yields whether that could be
    arranged (False: threadpoolctl controls no BLAS here; nothing was changed).

    One thread at a time holds it (others wait); the holder may enter it again."""
    controller = _controller()
    if not controller.lib_controllers:
        yield False
        return
    with _LOCK, controller.limit(limits=1, user_api="blas"):
        # threadpoolctl >= 3.8 leaves OpenBLAS (pthreads) alone while another live thread
        # holds a limit it set: then nothing changed
        yield all(lib.get_num_threads() == 1 for lib in controller.lib_controllers)
