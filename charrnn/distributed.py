"""Data parallelism over MPI (mpi4py): one model trained by N processes, as one process would.

`mpiexec -n N charrnn train ...` starts N ranks. The batch's `batch_size` streams are cut
into N contiguous blocks; rank r owns block r, with its own hidden states and its own
threads inside it (CHARRNN_THREADS; by default this node's cores shared among its ranks):

    streams   0 . . . . . . . B/N . . . . . . . 2B/N . . .  B
              [    rank 0     |     rank 1      |   ...    ]
    step      every rank: its block's forward and backward (loss and gradients of the
              block's NLL / (T * batch_size), the whole batch's number of predictions)
              -> one flat gradient buffer, reduced across ranks in one collective
              -> every rank clips and updates identically: the weights stay the same

Everything random (dropout and weight-drop masks, state resets) is drawn for the whole
batch from the trainer's RNG, which every rank holds in the same state, and each rank takes
its columns: N ranks draw what one process draws.

Rank 0 alone touches the run directory (lock, checkpoints, metrics.jsonl, config.yaml),
reads the config's corpus and broadcasts it (the other nodes need neither the corpus nor a
cache directory), prints the banner, the progress bar and the summary. A checkpoint holds
the global state: every stream's hidden state gathered to rank 0, and the data position, so
a run resumes with any N that divides batch_size, one process included.

Two reductions (`train.reduce`):

- `allreduce` (default): MPI's Allreduce, in place: the sum in whatever order the MPI
  library takes, equal to one process's up to float rounding.
- `ordered`: an Allgather of every rank's buffer, then on every rank the sum in rank order,
  rank 0's buffer += rank 1's += rank 2's ..., exactly as `CharRNN.loss_and_grads` adds its
  thread groups' gradients (and losses) in group order. With CHARRNN_THREADS=1, rank r does
  what thread group r does in one process with CHARRNN_THREADS=N: bit for bit the same
  weights, moments and metrics.

Besides the gradients each step reduces three float64 scalars (the loss, whether the rank
received SIGINT or SIGTERM: a stop is agreed there, so every rank stops after the same
step), in a second small collective started with the first. `train.max_minutes` is rank
0's clock's: its decisions are broadcast (RootBudget).

Faults: an error that every rank raises at the same point (bad config or corpus, found by
rank 0 and broadcast; non-finite loss; an agreed Ctrl-C) is reported once, by rank 0. An
error on one rank only is reported by that rank, which then calls MPI_Abort: the job ends,
none hangs. Uncaught exceptions go through an excepthook that aborts the job, as under
`python -m mpi4py`.

Outside mpiexec (none of the launchers' environment variables is set, or the job has one
process) this module never imports mpi4py and `world()` is None: charrnn runs as before.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .errors import (
    CharRNNError,
    CheckpointError,
    ConfigError,
    MissingExtraError,
    TrainingInterrupted,
)
from .evaluate import score
from .model import apply_weight_masks_
from .parallel import available_cores

# set by the launchers: MPICH / Intel MPI (hydra), Open MPI, PMIx (srun --mpi=pmix)
LAUNCH_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
               "PMIX_RANK", "MPI_LOCALNRANKS")
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
# how long a failing rank waits for the others to fail too (then one message, from rank 0)
# before it reports alone and aborts the job
FAIL_TIMEOUT_S = float(os.environ.get("CHARRNN_MPI_FAIL_TIMEOUT", "5"))
REDUCE_MODES = ("allreduce", "ordered")
# the per-step scalars: this rank's loss, whether it received SIGINT, SIGTERM
_LOSS, _SIGINT, _SIGTERM = 0, 1, 2
ALIGN = 16  # elements: each tensor of the flat buffer starts 64-byte aligned (float32)


def launched() -> bool:
    """Whether an MPI launcher (mpiexec, mpirun, srun) started this process."""
    return any(v in os.environ for v in LAUNCH_VARS)


def declared_size() -> int | None:
    """The job's size as the launcher's environment states it, None when it does not."""
    for var in SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def declared_rank() -> int:
    for var in RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


_UNSET = object()
_WORLD: Any = _UNSET


def world() -> World | None:
    """This process's MPI job, or None in a single process (then nothing here is used).

    mpi4py is imported only when a launcher started a job of more than one process;
    launched with N > 1 and without mpi4py, MissingExtraError (every rank would otherwise
    train a model of its own)."""
    global _WORLD
    if _WORLD is _UNSET:
        _WORLD = _connect()
    return _WORLD


def _connect() -> World | None:
    if not launched():
        return None
    size = declared_size()
    if size == 1:
        return None
    try:
        import mpi4py
    except ImportError:
        if size is None:  # a launcher's variable, but no job size: take it for one process
            return None
        raise MissingExtraError(
            f"started by an MPI launcher as one of {size} processes, but mpi4py is not "
            'installed: pip install "charrnn[mpi]"'
        ) from None
    mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1:
        return None
    return World(MPI)


def nearest_batch_sizes(batch_size: int, ranks: int) -> list[int]:
    """The multiples of `ranks` nearest to `batch_size`, below and above."""
    below = batch_size // ranks * ranks
    return [b for b in (below, below + ranks) if b >= ranks]


def check_batch_size(batch_size: int, ranks: int) -> None:
    """ConfigError unless `ranks` divide train.batch_size (each rank takes batch/ranks);
    every rank finds it (the same config): marked collective, rank 0 alone reports it."""
    if batch_size % ranks:
        near = " or ".join(str(b) for b in nearest_batch_sizes(batch_size, ranks))
        raise mark_collective(ConfigError(
            f"train.batch_size={batch_size} does not split over {ranks} MPI ranks "
            f"(each takes batch_size / {ranks} streams): use a multiple of {ranks}, "
            f"e.g. --set train.batch_size={near.split(' or ')[-1]} (nearest: {near})"
        ))


def mark_collective(error: BaseException) -> BaseException:
    """Marks an error that every rank raises at the same point: reported once, by rank 0."""
    error._charrnn_collective = True  # type: ignore[attr-defined]
    return error


def is_collective(error: BaseException) -> bool:
    return bool(getattr(error, "_charrnn_collective", False))


def _rebuild_error(kind: type, message: str, exit_code: int) -> BaseException:
    """An error of class `kind` with `message` (what rank 0 raised), without calling its
    __init__ (TrainingInterrupted's takes a signal number)."""
    err = kind.__new__(kind)
    Exception.__init__(err, message)
    err.exit_code = exit_code
    return mark_collective(err)


class World:
    """The MPI job: this rank, the communicators, how ranks wait, the failure protocol."""

    def __init__(self, MPI: Any):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()  # training's collectives
        self.ctl = MPI.COMM_WORLD.Dup()  # the failure protocol, apart from training's
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        self.stop_agreed = False  # set once the ranks agree on a stop signal
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()  # ranks on this node
        node.Free()
        cores = available_cores()
        if not os.environ.get("CHARRNN_THREADS", "").strip():
            # the node's cores shared among its ranks (hydra and mpirun bind nothing)
            os.environ["CHARRNN_THREADS"] = str(max(1, cores // self.local_size))
        _install_excepthook(self)
        from .parallel import thread_count

        try:
            threads = thread_count()
        except ConfigError:  # refused by the command itself, inside guard(): the job ends
            threads = 1
        self.oversubscribed = self.local_size * threads > cores
        # a waiting rank: MPI's own busy polling, or Test and sleep (frees the core for the
        # ranks that still compute, when there are more threads than cores)
        wait = os.environ.get("CHARRNN_MPI_WAIT", "auto").strip().lower()
        self.spin = wait == "spin" or (wait != "sleep" and not self.oversubscribed)

    # -- small collectives ----------------------------------------------------------------

    def columns(self, batch_size: int) -> slice:
        """This rank's contiguous block of the batch's streams."""
        n = batch_size // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def wait(self, requests: list) -> None:
        if self.spin:
            self.MPI.Request.Waitall(requests)
            return
        pause = 20e-6
        while not self.MPI.Request.Testall(requests):
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def bcast(self, value: Any) -> Any:
        """Rank 0's `value` (pickled) on every rank."""
        return self.comm.bcast(value, root=0)

    def root_call(self, fn: Callable[..., Any], *args: Any, share: bool = True,
                  **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on rank 0 alone; its result (None elsewhere unless `share`),
        or the CharRNNError it raised, on every rank (then marked collective: every rank
        raises it, rank 0 reports it)."""
        if self.is_root:
            try:
                value = fn(*args, **kwargs)
            except CharRNNError as e:
                self.bcast((False, (type(e), str(e), e.exit_code)))
                raise mark_collective(e) from None
            self.bcast((True, value if share else None))
            return value
        ok, value = self.bcast(None)
        if not ok:
            raise _rebuild_error(*value)
        return value

    def bcast_arrays(self, arrays: list[np.ndarray]) -> None:
        """Rank 0's values of `arrays` (contiguous, the same shapes on every rank), in place."""
        for a in arrays:
            self.comm.Bcast(a, root=0)

    def gather_rows(self, local: np.ndarray) -> np.ndarray | None:
        """The ranks' (n, ...) blocks stacked in rank order, on rank 0 (None elsewhere)."""
        local = np.ascontiguousarray(local)
        out = np.empty((self.size * len(local), *local.shape[1:]), local.dtype) \
            if self.is_root else None
        self.comm.Gather(local, out, root=0)
        return out

    def sum_scalars(self, values: list[float], ordered: bool) -> list[float]:
        """The sum over ranks of a few float64s: in rank order (0 + r0 + r1 ...) or MPI's."""
        buf = np.asarray(values, dtype=np.float64)
        if not ordered:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf)
            return [float(v) for v in buf]
        rows = np.empty((self.size, len(buf)))
        self.comm.Allgather(buf, rows)
        out = [0.0] * len(buf)
        for r in range(self.size):
            for i in range(len(buf)):
                out[i] += float(rows[r, i])
        return out

    # -- the failure protocol ---------------------------------------------------------------

    def all_failing(self, timeout: float = FAIL_TIMEOUT_S) -> bool:
        """Whether every rank reaches this point (each with its own error) within `timeout`:
        a barrier on the communicator kept for it, which training never uses."""
        request = self.ctl.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def fail(self, error: BaseException) -> None:
        """A rank's error at the CLI boundary. Collective (every rank raised it, or they all
        fail together): rank 0 returns, to report it as one process would, the others exit
        quietly with its code. This rank's alone: one message naming the rank, then
        MPI_Abort ends the whole job with the error's exit code."""
        code = _exit_code(error)
        # the stop after an agreed signal: every rank raises it, rank 0 once its checkpoint
        # is written (which may take longer than the others would wait)
        agreed_stop = self.stop_agreed and isinstance(error, TrainingInterrupted)
        if is_collective(error) or agreed_stop or self.all_failing():
            if self.is_root:
                return
            raise SystemExit(code)
        _report_alone(self, error)
        self.abort(code)

    def abort(self, code: int) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            self.comm.Abort(code)


def _exit_code(error: BaseException) -> int:
    code = getattr(error, "exit_code", 1)
    if isinstance(error, KeyboardInterrupt):
        code = 130
    return code if isinstance(code, int) and 0 <= code < 256 else 1


def _report_alone(w: World, error: BaseException) -> None:
    where = f"rank {w.rank} of {w.size}"
    if isinstance(error, CharRNNError) or hasattr(error, "format_message"):
        msg = error.format_message() if hasattr(error, "format_message") else str(error)
        print(f"Error: {where}: {' '.join(msg.split())}; ending the MPI job", file=sys.stderr)
    else:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        print(f"{text}Error: {where}: {type(error).__name__}: {error}; ending the MPI job",
              file=sys.stderr)


def _install_excepthook(w: World) -> None:
    """An uncaught exception on any rank aborts the job (the others would wait forever)."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            previous(kind, value, tb)
            print(f"Error: rank {w.rank} of {w.size}: uncaught {kind.__name__}; ending the MPI "
                  "job", file=sys.stderr)
        finally:
            w.abort(1)

    sys.excepthook = hook


@contextmanager
def guard() -> Iterator[World | None]:
    """The CLI's boundary around a command under MPI (see World.fail); a no-op otherwise.

    Started with N > 1 but without mpi4py: the one-line MissingExtraError from rank 0,
    the other ranks exit with the same code quietly."""
    try:
        w = world()
    except MissingExtraError as e:
        if declared_rank() != 0:
            raise SystemExit(e.exit_code) from None
        raise
    if w is None:
        yield None
        return
    try:
        yield w
    except SystemExit:
        raise
    except BaseException as e:
        w.fail(e)  # returns on rank 0 when the error is everyone's: it is reported as usual
        raise


def cli_config(w: World, config_path: str, overrides: tuple[str, ...]):
    """What `charrnn train` passes on as its config under MPI: rank 0 reads the file (the
    others need none), applies the overrides and checks that the ranks divide
    train.batch_size, before any work; every rank gets rank 0's config, paths resolved.
    Rank 0 goes on with the file and overrides as given (its messages name them), the
    others with that config as a dict."""
    from .config import config_to_dict, load_config, resolve_paths

    cfg = w.root_call(lambda: resolve_paths(load_config(config_path, overrides)))
    check_batch_size(cfg.train.batch_size, w.size)
    if w.is_root:
        return config_path, overrides
    return config_to_dict(cfg), ()


# -- one step: this rank's streams, then the reduction -------------------------------------


class Reducer:
    """The per-step reduction: every rank's gradients into one flat, preallocated buffer,
    reduced across the ranks by one collective (Allreduce in place, or Allgather then the
    sum in rank order); beside it, a few float64 scalars."""

    def __init__(self, w: World, mode: str):
        if mode not in REDUCE_MODES:
            raise ConfigError(f"train.reduce must be one of {REDUCE_MODES}, not {mode!r}")
        self.w = w
        self.ordered = mode == "ordered"
        self.flat: np.ndarray | None = None
        self.views: dict[str, np.ndarray] = {}
        self.seconds = 0.0  # spent reducing (copy in, collectives, ordered sum), all steps
        self.steps = 0

    def _layout(self, grads: dict[str, np.ndarray]) -> None:
        dtype = next(iter(grads.values())).dtype
        offsets, n = [], 0
        for g in grads.values():
            offsets.append(n)
            n += -(-g.size // ALIGN) * ALIGN
        self.flat = np.zeros(n, dtype)
        self.views = {k: self.flat[o : o + g.size].reshape(g.shape)
                      for (k, g), o in zip(grads.items(), offsets)}
        self.gathered = np.empty((self.w.size, n), dtype) if self.ordered else None

    def reduce(self, loss: float, grads: dict[str, np.ndarray],
               signals: list[int]) -> tuple[float, dict, int]:
        """(the loss summed over ranks, the summed gradients (views of the flat buffer, in
        `grads`' order), the signal any rank received (0: none; SIGINT before SIGTERM))."""
        t0 = time.perf_counter()
        if self.flat is None:
            self._layout(grads)
        for k, g in grads.items():
            np.copyto(self.views[k], g)
        w, MPI = self.w, self.w.MPI
        scalars = np.zeros(3)
        scalars[_LOSS] = loss
        scalars[_SIGINT] = float(signal.SIGINT in signals)
        scalars[_SIGTERM] = float(signal.SIGTERM in signals)
        if self.ordered:
            rows = np.empty((w.size, len(scalars)))
            w.wait([w.comm.Iallgather(self.flat, self.gathered),
                    w.comm.Iallgather(scalars, rows)])
            np.copyto(self.flat, self.gathered[0])
            for r in range(1, w.size):  # rank 0's += rank 1's += ...: the groups' order
                self.flat += self.gathered[r]
            total = float(rows[0, _LOSS])
            for r in range(1, w.size):
                total += float(rows[r, _LOSS])
            summed = rows.sum(axis=0)
        else:
            w.wait([w.comm.Iallreduce(MPI.IN_PLACE, self.flat),
                    w.comm.Iallreduce(MPI.IN_PLACE, scalars)])
            total, summed = float(scalars[_LOSS]), scalars
        sig = signal.SIGINT if summed[_SIGINT] else signal.SIGTERM if summed[_SIGTERM] else 0
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        return total, self.views, int(sig)


# -- the trainer's MPI side ----------------------------------------------------------------


class AgreedSignals(list):
    """The trainer's view of the stop signals under MPI: filled only from the per-step
    reduction (what any rank received), so every rank stops after the same step. The
    signal handler appends to `local`, this rank's own list."""

    def __init__(self, local: list[int]):
        super().__init__()
        self.local = local


class RankTrainer:
    """What a Trainer needs under MPI: its columns, the step's reduction, the global state
    in and out of checkpoints, the validation split across ranks."""

    def __init__(self, w: World, batch_size: int, reduce: str):
        check_batch_size(batch_size, w.size)
        self.w = w
        self.batch_size = batch_size
        self.cols = w.columns(batch_size)
        self.local_batch = self.cols.stop - self.cols.start
        self.reducer = Reducer(w, reduce)
        self.ordered = self.reducer.ordered
        self.signals: AgreedSignals | None = None

    @property
    def is_root(self) -> bool:
        return self.w.is_root

    def agreed_signals(self, local: list[int]) -> AgreedSignals:
        self.signals = AgreedSignals(local)
        return self.signals

    def local(self, a: np.ndarray | None) -> np.ndarray | None:
        """This rank's rows of a whole-batch array (B, ...) drawn the same on every rank."""
        return None if a is None else a[self.cols]

    def loss_and_grads(self, model, x, y, state, masks=None, weight_masks=None):
        """One step's loss and gradients, summed over every rank; this rank's new state.
        x, y: this rank's streams (T, B_local); masks: the whole batch's dropout masks, or
        None; weight_masks: the window's weight-drop masks (the same on every rank), or
        None. The signals any rank received are agreed here (see AgreedSignals)."""
        local_masks = None if masks is None else [m[self.cols] for m in masks]
        T = x.shape[0]
        # the groups' NLL over the whole batch's T * batch_size; BLAS single-threaded even
        # for one group, as each thread group of one process has it
        loss, grads, new_state, weight_masks = model.summed_groups(
            x, y, state, local_masks, None, weight_masks, T * self.batch_size,
            single_blas=True)
        local = self.signals.local if self.signals is not None else []
        loss, grads, sig = self.reducer.reduce(loss, grads, local)
        apply_weight_masks_(grads, weight_masks)  # once for all the ranks, as for the groups
        if sig and self.signals is not None and not self.signals:
            self.signals.append(sig)
            self.w.stop_agreed = True
        return loss, grads, new_state

    def root_budget(self, budget):
        """`train.max_minutes` decided by rank 0 alone (its clock) and broadcast."""
        return RootBudget(budget, self.w)

    def gather_state(self, state):
        """Every stream's state, in stream order, on rank 0 (None on the others)."""
        layers = [tuple(self.w.gather_rows(s) for s in layer) for layer in state]
        return layers if self.is_root else None

    def local_checkpoint(self, ckpt):
        """A checkpoint (the same on every rank) with its saved states cut to this rank's
        streams; CheckpointError when they are not the whole batch's."""
        tensors = dict(ckpt.train_tensors)
        for name, t in ckpt.train_tensors.items():
            if name.startswith("state."):
                if t.ndim != 2 or t.shape[0] != self.batch_size:
                    raise mark_collective(CheckpointError(
                        f"{ckpt.path}: {name} holds the state of {t.shape[0] if t.ndim else 0}"
                        f" streams, train.batch_size is {self.batch_size}"))
                tensors[name] = np.ascontiguousarray(t[self.cols])
        ckpt.train_tensors = tensors
        return ckpt

    def sync_from_root(self, trainer) -> None:
        """Rank 0's weights, optimizer state, moving average and RNG state on every rank
        (a fresh start; a resume broadcasts rank 0's checkpoint instead)."""
        params, optimizer = trainer.model.params, trainer.optimizer
        sd = optimizer.state_dict()  # the moments themselves, and a copy of t
        arrays = [params[k] for k in sorted(params)] + [sd[k] for k in sorted(sd) if k != "t"]
        if trainer.ema is not None:
            arrays += [trainer.ema.params[k] for k in sorted(trainer.ema.params)]
        self.w.bcast_arrays(arrays)
        optimizer.t, trainer.rng.bit_generator.state = self.w.bcast(
            (optimizer.t, trainer.rng.bit_generator.state))

    def score(self, model, ids: np.ndarray) -> tuple[float, int]:
        """`charrnn.evaluate.score` split across the ranks: rank r scores block r of the
        evaluation streams (its threads split it further), the totals are summed."""
        total, count = score(model, ids, ranks=(self.w.rank, self.w.size))
        total, count = self.w.sum_scalars([total, float(count)], self.ordered)
        return total, int(count)


class NoMetrics:
    """metrics.jsonl on the ranks other than 0: nothing written."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def quiet(message: str) -> None:
    """The messages of the ranks other than 0: rank 0 says them."""


class RootBudget:
    """A `charrnn.budget.TimeBudget` whose decisions (whether the speed is measured, the
    plan, whether time is up) are rank 0's, broadcast: the ranks' clocks differ, and every
    rank must plan the same steps and stop after the same one."""

    def __init__(self, budget, w: World):
        self._budget = budget
        self._w = w

    def __getattr__(self, name: str) -> Any:
        return getattr(self._budget, name)

    def measured(self, step: int, elapsed: float) -> bool:
        mine = self._budget.measured(step, elapsed) if self._w.is_root else None
        return bool(self._w.bcast(mine))

    def plan(self, step: int, elapsed: float, eval_seconds: float) -> int:
        b = self._budget
        mine = b.plan(step, elapsed, eval_seconds) if self._w.is_root else None
        b.planned_steps, b.seconds_per_step = self._w.bcast(
            (mine, b.seconds_per_step) if self._w.is_root else None)
        return b.planned_steps

    def expired(self, elapsed: float) -> bool:
        return bool(self._w.bcast(self._budget.expired(elapsed) if self._w.is_root else None))


def rank_trainer(batch_size: int, reduce: str) -> RankTrainer | None:
    """The trainer's MPI side in an MPI job of several ranks, else None."""
    w = world()
    return None if w is None else RankTrainer(w, batch_size, reduce)

