"""All cores on one batch: its independent streams split into groups, a thread each.

The streams (columns) of a batch never interact: each carries its own hidden state, and the
loss is a sum over them.  So a batch is cut into one contiguous group of streams per thread,
and each group is run by its own replica of the model (the weights shared, the work buffers
its own) on its own thread:

    streams   0 . . . . . . . . . . B/2 . . . . . . . . . . B
              [       group 0        |       group 1        ]
    thread         the caller               the pool
    result    loss_0, grads_0, state_0   loss_1, grads_1, state_1
              -> loss_0 + loss_1,  grads_0 + grads_1,  [state_0; state_1]

The compiled loops release the GIL, and so do numpy's GEMMs and large ufuncs, so the groups
really run at the same time; each thread calls BLAS single-threaded (charrnn.blas), so that
the threads do not fight over the cores.  Results are combined in group order, so they do not
depend on the threads' timing; they depend on the number of groups by float rounding only.

The number of threads is CHARRNN_THREADS where set, else the number of cores this process may
run on; one where BLAS's own thread count cannot be set.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import numpy as np

from . import blas
from .errors import ConfigError

R = TypeVar("R")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_count() -> int:
    """Threads to run a batch on: CHARRNN_THREADS, else the available cores."""
    value = os.environ.get("CHARRNN_THREADS", "").strip()
    if not value:
        return available_cores()
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ConfigError(f"CHARRNN_THREADS must be a whole number >= 1, not {value!r}")
    return int(value)


def stream_groups(batch_size: int, threads: int | None = None) -> list[slice]:
    """The batch's streams 0..batch_size-1 cut into contiguous groups, one per thread
    (`threads`, default (None or 0) thread_count(); one without a BLAS whose thread count
    can be set), as equal as they come."""
    n = threads or thread_count()
    n = max(1, min(n if blas.controllable() else 1, batch_size))
    return [slice(batch_size * i // n, batch_size * (i + 1) // n) for i in range(n)]


def serial_note() -> str | None:
    """Why batches run on one thread whatever the thread count, for the training banner:
    None where BLAS's thread count can be set."""
    if blas.controllable():
        return None
    return f"BLAS threads not controllable ({blas.numpy_blas()}): running serially"


def columns(state: list[tuple[np.ndarray, ...]], cols: slice) -> list[tuple[np.ndarray, ...]]:
    """A group's part of a recurrent state (one tuple of (B, H) arrays per layer): views."""
    return [tuple(s[cols] for s in layer) for layer in state]


def concatenate(states: list[list[tuple[np.ndarray, ...]]]) -> list[tuple[np.ndarray, ...]]:
    """The groups' states, in group order, as one state of the whole batch."""
    return [tuple(np.concatenate(parts) for parts in zip(*layers)) for layers in zip(*states)]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_IN_GROUP = threading.local()  # set while a thread runs a group's work


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:  # threads are started as they are first needed, and reused
            _POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="charrnn")
        return _POOL


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forget_pool)


def _as_group(fn: Callable[[int], R], g: int, err: dict[str, str] | None = None) -> R:
    _IN_GROUP.active = True
    try:
        if err is None:
            return fn(g)
        with np.errstate(**err):  # numpy 1.x: the error state is per thread, not inherited
            return fn(g)
    finally:
        _IN_GROUP.active = False


def run_groups(fn: Callable[[int], R], n: int) -> list[R]:
    """[fn(0), ..., fn(n-1)], each call on its own thread (the first on the caller's), with
    BLAS single-threaded meanwhile. Waits for every call before it returns or raises.

    Each call runs in a copy of the caller's context and in the caller's numpy error state
    (np.geterr(): numpy 2 keeps it in a context variable, numpy 1.x per thread). Called
    from within a group's work, it runs the calls one after another, on that thread."""
    if n == 1 or getattr(_IN_GROUP, "active", False):
        return [fn(g) for g in range(n)]
    err = np.geterr()
    with blas.single_threaded():
        futures = [
            _pool().submit(contextvars.copy_context().run, _as_group, fn, g, err)
            for g in range(1, n)
        ]
        try:
            first = _as_group(fn, 0)
        finally:
            wait(futures)
        return [first, *(f.result() for f in futures)]
