"""The training loop: truncated BPTT over stateful windows, evaluation, checkpoints, resume.

Everything a resumed run needs to continue bit for bit is in the checkpoint: parameters,
optimizer moments, the update count, the data position, the hidden state carried into the
next window, and the dropout RNG.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import sys
import time
import types
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from .budget import TimeBudget
from .checkpoint import BEST, Checkpoint, CheckpointManager, model_shape
from .config import Config, config_to_dict, resolve_paths
from .data import Corpus, WindowStream, load_corpus
from .distributed import NoMetrics, quiet, rank_trainer
from .errors import (
    CheckpointError,
    DataError,
    NonFiniteError,
    RunDirError,
    TrainingInterrupted,
)
from .evaluate import score
from .fileio import atomic_write_bytes, pid_alive, remove_stale_temps
from .model import CharRNN
from .optim import Optimizer, WeightAverage, clip_by_global_norm_, learning_rate
from .signals import TrainingSignals

try:
    import fcntl
except ImportError:  # not POSIX: the pid in the lock file is the only guard
    fcntl = None

LOCK = ".lock"
# training stops (exit 1) when the loss per character exceeds this many times that of a
# uniform guess, ln(vocab size): the weights have blown up, the run will not recover
DIVERGED_LOSS_FACTOR = 50.0
# with train.on_nonfinite=skip, this many skipped steps in a row stop the run (exit 1)
MAX_SKIPPED_IN_A_ROW = 10


@dataclass
class TrainResult:
    """What a finished training run reports: where it is, how far it went, its losses."""

    run_dir: Path
    steps: int
    num_params: int
    best_val_loss: float | None
    best_train_loss: float | None
    final_train_loss: float
    chars_per_sec: float
    best_checkpoint: Path
    last_checkpoint: Path


# -- the run directory: lock, files --------------------------------------------------------


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "0")
    except (OSError, ValueError):
        return 0


def _flock(fd: int) -> bool:
    """Takes the OS lock on the open lock file; False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: the pid alone decides
        return True
    return True


@contextmanager
def run_dir_lock(run_dir: Path):
    """Holds `run_dir/.lock` (our pid, and an OS lock on it) for the duration.

    A lock left by a dead process (SIGKILL, power loss) is taken over; one whose OS lock
    is held, or whose pid is alive, is refused (RunDirError naming the pid and the file).
    """
    lock = run_dir / LOCK
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot write to {run_dir}: {e.strerror or e}") from None
        try:
            free = _flock(fd)
            pid = _read_pid(fd)
            if not free or (pid != os.getpid() and pid_alive(pid)):
                raise RunDirError(
                    f"{run_dir} is in use by another charrnn train (pid {pid or 'unknown'}, "
                    f"lock file {lock}); if no such run is alive, delete the lock file"
                )
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            if current is None or not os.path.samestat(current, os.fstat(fd)):
                os.close(fd)  # its owner removed it as we opened it: take a fresh one
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"cannot write the lock file {lock}: {e.strerror or e}") from None
        except BaseException:
            os.close(fd)
            raise
        break
    else:
        raise RunDirError(f"cannot take the lock {lock}")
    try:
        yield
    finally:
        try:
            lock.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)


def prepare_run_dir(path: str) -> Path:
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create output.dir {run_dir}: {e.strerror or e}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"output.dir {run_dir} is not writable")
    return run_dir


class MetricsLog:
    """metrics.jsonl, one JSON object per line, flushed as written."""

    def __init__(self, path: Path, resume_step: int | None,
                 listener: Callable[[dict[str, Any]], None] | None = None):
        """`listener`, when given, receives a copy of each row once it is written."""
        self.path = path
        self.listener = listener
        if resume_step is not None and path.exists():
            # drop rows logged after the checkpoint we resume from: they will be redone
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
                except ValueError:
                    continue
            atomic_write_bytes(path, "".join(kept).encode())
        elif resume_step is None:
            path.unlink(missing_ok=True)
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        except OSError as e:
            raise RunDirError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.listener is not None:
            self.listener(dict(row))

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # a row that could not be written was reported where it failed


def _signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"


class StopSignals:
    """SIGINT / SIGTERM handling for a whole `charrnn train`.

    While `deferred` is False (loading the config and the corpus: nothing to save yet) a
    signal raises TrainingInterrupted at once. While it is True (the training loop) a signal
    is only recorded; the loop checks `received` after each step, writes a checkpoint and
    then raises TrainingInterrupted. Outside the main thread signals are left alone.
    """

    def __init__(self, deferred: bool = False):
        self.deferred = deferred
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, _frame):
        self.received.append(signum)
        if not self.deferred:
            raise TrainingInterrupted(
                f"{_signal_name(signum)}: stopped while starting, before the first training "
                "step; nothing was trained",
                signum,
            )

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._previous.items():
            signal.signal(sig, h)
        self._previous.clear()


# -- the loop -------------------------------------------------------------------------------


def _lr(cfg: Config, step: int, horizon: float | None = None) -> float:
    """The learning rate of update `step`, the schedule spanning `horizon` steps (default
    train.max_steps; a time budget's planned steps, math.inf before they are known)."""
    t = cfg.train
    return learning_rate(
        step,
        base_lr=t.learning_rate,
        schedule=t.lr_schedule,
        max_steps=t.max_steps if horizon is None else horizon,
        warmup_steps=t.warmup_steps,
        decay=t.lr_decay,
        decay_every=t.lr_decay_every,
        lr_min=t.lr_min,
    )


def cache_dir() -> Path | None:
    base = os.environ.get("CHARRNN_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "charrnn"


def _check_resume_compatible(cfg: Config, ckpt: Checkpoint, corpus: Corpus,
                             planned_steps: int | None = None) -> None:
    if ckpt.config.model != cfg.model:
        raise CheckpointError(
            f"{ckpt.path}: its model section {config_to_dict(ckpt.config)['model']} differs "
            f"from the config's {config_to_dict(cfg)['model']}; resume needs the same model"
        )
    if ckpt.vocab.chars != corpus.vocab.chars:
        raise CheckpointError(
            f"{ckpt.path}: its vocabulary ({ckpt.vocab.size} chars) differs from the corpus "
            f"{cfg.data.path} ({corpus.vocab.size} chars); resume needs the same data"
        )
    if planned_steps is not None and ckpt.step >= planned_steps:
        raise CheckpointError(
            f"{ckpt.path}: already at step {ckpt.step}, the end of its train.max_minutes="
            f"{cfg.train.max_minutes:g} budget; to train further, resume with another "
            "train.max_minutes (a new plan) or train.max_minutes=0 and a train.max_steps"
        )
    if ckpt.step >= cfg.train.max_steps:
        raise CheckpointError(
            f"{ckpt.path}: already at step {ckpt.step} of train.max_steps={cfg.train.max_steps};"
            " raise it (e.g. --set train.max_steps=...) to train further"
        )


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg = resolve_paths(cfg)
        t = cfg.train
        # under mpiexec: this rank's streams, the reductions (charrnn.distributed); else None
        self.dist = rank_trainer(t.batch_size, t.reduce)
        self.local_batch = t.batch_size if self.dist is None else self.dist.local_batch
        self.run_dir = self._on_root(prepare_run_dir, cfg.output.dir)
        self.ckpts = CheckpointManager(self.run_dir, cfg.output.keep_last)
        self.resume = resume
        self.overwrite = overwrite
        self.corpus = self._on_root(load_corpus, cfg.data,
                                    cache_dir=cache_dir() if cfg.data.cache else None)
        self.vocab = self.corpus.vocab
        self.stream = WindowStream(self.corpus.train, t.batch_size, t.seq_length,
                                   name=f"{cfg.data.path}: the training split",
                                   columns=None if self.dist is None else self.dist.cols,
                                   offset_seed=t.seed if t.random_offset else None)
        shape = model_shape(cfg, self.vocab.size)
        self.model = CharRNN.create(shape, seed=t.seed, dtype=t.dtype)
        self.optimizer = Optimizer(
            t.optimizer,
            self.model.params,
            momentum=t.momentum,
            beta1=t.beta1,
            beta2=t.beta2,
            eps=t.eps,
            weight_decay=t.weight_decay,
        )
        self.rng = np.random.default_rng(t.seed + 1)  # dropout, weight-drop and reset draws
        # train.ema: evaluation, best.safetensors and the model tensors of every checkpoint
        # are the moving average's; the raw weights train on (and are saved beside it)
        self.ema = WeightAverage(self.model.params, t.ema) if t.ema > 0 else None
        self.eval_model = self.model if self.ema is None else CharRNN(shape, self.ema.params)
        self.budget = (TimeBudget(t.max_minutes, t.max_steps, t.eval_every)
                       if t.max_minutes > 0 else None)
        if self.budget is not None and self.dist is not None:
            self.budget = self.dist.root_budget(self.budget)  # rank 0's clock decides
        self.clock = time.perf_counter  # tests of the budget put a fake clock here
        self.state = self.model.zero_state(self.local_batch)
        self.step = 0
        self.best_loss: float | None = None  # validation loss (training loss without val)
        self.best_val: float | None = None
        self.elapsed = 0.0
        self.signals = TrainingSignals(t.grad_clip, cfg.model.cell)  # eval-row extras
        self.val_ids = self.corpus.val
        self.postfix: dict[str, str] = {}  # the progress bar's, latest values
        if t.eval_max_chars and len(self.val_ids) > t.eval_max_chars:
            self.val_ids = self.val_ids[: t.eval_max_chars]

    def _on_root(self, fn: Callable[..., Any], *args: Any, share: bool = True,
                 **kwargs: Any) -> Any:
        """fn(*args, **kwargs); under MPI on rank 0 alone, its result (with `share`) or its
        error on every rank (charrnn.distributed.World.root_call)."""
        if self.dist is None:
            return fn(*args, **kwargs)
        return self.dist.w.root_call(fn, *args, share=share, **kwargs)

    # -- state in and out of checkpoints ----------------------------------------------------

    def _train_tensors(self, state: list | None = None) -> dict[str, np.ndarray]:
        """The training tensors of a checkpoint; `state`: the whole batch's (default ours)."""
        tensors = {f"optim.{k}": v for k, v in self.optimizer.state_dict().items()}
        if self.ema is not None:  # the model tensors are the average: these train on
            tensors.update({f"raw.{k}": v for k, v in self.model.params.items()})
        for k, layer in enumerate(self.state if state is None else state):
            for name, s in zip("hc", layer, strict=False):
                tensors[f"state.l{k}.{name}"] = s
        return tensors

    def _train_state(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "data": self.stream.state_dict(),
            "best_loss": self.best_loss,
            "best_val": self.best_val,
            "elapsed_sec": self.elapsed,
            "signals": self.signals.state_dict(),
            "ema_updates": None if self.ema is None else self.ema.updates,
            "budget": None if self.budget is None else self.budget.state_dict(),
        }

    def _restore(self, ckpt: Checkpoint) -> None:
        if self.budget is not None:
            self.budget.load_state_dict(ckpt.train_state.get("budget"))
        _check_resume_compatible(self.cfg, ckpt, self.corpus,
                                 None if self.budget is None else self.budget.planned_steps)
        dtype = np.dtype(self.cfg.train.dtype)
        try:
            for name, t in ckpt.train_tensors.items():
                if t.dtype.kind not in "fiu" or not np.isfinite(t).all():
                    raise ValueError(f"tensor {name!r} holds {t.dtype} values, or NaN/Inf")
            raw = {k[len("raw.") :]: v for k, v in ckpt.train_tensors.items()
                   if k.startswith("raw.")}
            for k, p in self.model.params.items():
                # with train.ema the model tensors are the average, the raw weights apart
                # (a checkpoint made without it has only the one set: both start from it)
                p[...] = raw.get(k, ckpt.params[k])
                if self.ema is not None:
                    self.ema.params[k][...] = ckpt.params[k]
            self.optimizer.load_state_dict(
                {k[len("optim.") :]: v for k, v in ckpt.train_tensors.items()
                 if k.startswith("optim.")}
            )
            state = []
            for k, layer in enumerate(self.state):
                tensors = []
                for n, zero in zip("hc", layer, strict=False):
                    t = ckpt.train_tensors[f"state.l{k}.{n}"]
                    if t.shape != zero.shape:
                        raise ValueError(f"state.l{k}.{n} has shape {t.shape}, not {zero.shape}")
                    tensors.append(np.ascontiguousarray(t, dtype=dtype))
                state.append(tuple(tensors))
            self.state = state
            ts = ckpt.train_state
            self.rng.bit_generator.state = ts["rng"]
            self.stream.load_state_dict(ts["data"])
            best_loss, best_val = ts.get("best_loss"), ts.get("best_val")
            for v in (best_loss, best_val):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                    raise ValueError(f"best loss {v!r} is not a number")
            elapsed = float(ts.get("elapsed_sec", 0.0))
        except (KeyError, ValueError, TypeError, DataError) as e:
            raise CheckpointError(f"{ckpt.path}: incomplete training state ({e})") from None
        self.best_loss, self.best_val = best_loss, best_val
        self.elapsed = elapsed
        self.signals.load_state_dict(ts.get("signals"))
        if self.ema is not None:
            updates = ts.get("ema_updates")
            self.ema.updates = ckpt.step if updates is None else int(updates)
        self.step = ckpt.step

    def _save(self, best: bool = False) -> Path:
        params = self.eval_model.params  # the moving average's, with train.ema
        if not all(np.isfinite(p).all() for p in params.values()):
            raise NonFiniteError(
                f"step {self.step}: weights are not finite; checkpoint not written"
            )
        state = self.state if self.dist is None else self.dist.gather_state(self.state)
        if state is None:  # an MPI rank other than 0: its streams' state went to rank 0
            return self.run_dir / BEST if best else self.ckpts.path_for(self.step)
        kwargs: dict[str, Any] = dict(
            config=self.cfg,
            vocab=self.vocab,
            info={"best_val_loss": self.best_val, "best_loss": self.best_loss,
                  "train_loss": self.last_train_loss},
            train_tensors=self._train_tensors(state),
            train_state=self._train_state(),
        )
        if best:
            return self.ckpts.save_best(self.step, params, **kwargs)
        return self.ckpts.save(self.step, params, **kwargs)

    def _write_run_files(self) -> None:
        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        atomic_write_bytes(self.run_dir / "config.yaml", text.encode())
        self.vocab.save(self.run_dir / "vocab.json")

    # -- evaluation -------------------------------------------------------------------------

    def validate(self) -> float | None:
        if len(self.val_ids) < 2:
            return None
        if self.dist is not None:  # the evaluation streams split across the ranks
            total, count = self.dist.score(self.eval_model, self.val_ids)
        else:
            total, count = score(self.eval_model, self.val_ids)
        return total / count

    def _eval_row(self, val: float | None, **row: Any) -> dict[str, Any]:
        """The metrics row of an evaluation: `row` (step, train loss, lr, ...), the
        validation loss when there is a validation split, and the training signals."""
        if val is not None:
            row = {"step": row.pop("step"), "val_loss": val, "val_bpc": val / math.log(2), **row}
        val_ids = self.val_ids if val is not None else None
        return {**row, **self.signals.eval_signals(self.eval_model.params, val_ids)}

    # -- the loop ---------------------------------------------------------------------------

    def run(
        self,
        progress: bool = True,
        resume_hint: str = "",
        echo: Callable[[str], None] = print,
        signals: StopSignals | None = None,
        on_start: Callable[[], None] | None = None,
        on_metrics: Callable[[dict[str, Any]], None] | None = None,
    ) -> TrainResult:
        """Trains to train.max_steps; `on_start` is called once the run directory is taken,
        `on_metrics` with each metrics.jsonl row as it is written.

        `signals` (the CLI's, installed before loading) is switched to deferred mode here;
        without it SIGINT/SIGTERM are handled for the duration of the run."""
        if signals is None:
            with StopSignals() as own:
                return self.run(progress, resume_hint, echo, own, on_start, on_metrics)
        signals.deferred = True  # from here on a signal means: checkpoint, then stop
        received = signals.received
        if self.dist is not None:  # stop after the step that every rank agrees on
            received = self.dist.agreed_signals(signals.received)
            if not self.dist.is_root:  # rank 0 alone writes and reports
                progress, echo, on_start, on_metrics = False, quiet, None, None
        with ExitStack() as held:
            ckpt = self._on_root(self._take_run_dir, held, echo)  # the lock held in `held`
            resuming = ckpt is not None
            if resuming:
                self._restore(ckpt if self.dist is None else self.dist.local_checkpoint(ckpt))
            elif self.dist is not None:
                self.dist.sync_from_root(self)  # rank 0's initial weights everywhere
            self._on_root(self._write_run_files)
            if on_start is not None:
                on_start()
            metrics = self._on_root(MetricsLog, self.run_dir / "metrics.jsonl",
                                    self.step if resuming else None, listener=on_metrics,
                                    share=False) or NoMetrics()
            try:
                return self._loop(metrics, received, progress, resume_hint, echo)
            except RunDirError as e:
                if not resume_hint:
                    raise
                raise RunDirError(
                    f"{e}; the checkpoints already written are intact; once fixed, "
                    f"resume with: {resume_hint}"
                ) from None
            finally:
                metrics.close()

    def _take_run_dir(self, held: ExitStack, echo: Callable[[str], None]) -> Checkpoint | None:
        """Takes output.dir (its lock then held until `held` closes): the checkpoint to
        resume from, or None to start afresh (with --overwrite, its checkpoints deleted)."""
        held.enter_context(run_dir_lock(self.run_dir))
        remove_stale_temps(self.run_dir, dead_only=False)  # we hold the lock: all stale
        existing = self.ckpts.latest()
        resuming = self.resume
        if resuming and existing is None and (self.run_dir / "config.yaml").exists():
            # a run was started here but killed before its first checkpoint
            echo(f"{self.run_dir} holds no checkpoint yet: starting from step 0")
            resuming = False
        if resuming:
            return self.ckpts.load_latest_resumable(echo)
        if existing is not None:
            if not self.overwrite:
                raise RunDirError(
                    f"{self.run_dir} already holds checkpoints ({existing.name}); "
                    "continue with --resume, start over with --overwrite, "
                    "or set another output.dir"
                )
            for old in self.run_dir.glob("*.safetensors"):
                old.unlink()
        return None

    def _stop(self, step: int, what: str, last_ckpt: Path | None) -> NonFiniteError:
        t = self.cfg.train
        tips = [f"a lower train.learning_rate ({t.learning_rate:g} now, e.g. "
                f"{t.learning_rate / 10:g})"]
        if t.grad_clip == 0:
            tips.append("train.grad_clip=5")
        if t.on_nonfinite == "stop" and "weights" not in what:
            tips.append("train.on_nonfinite=skip")
        since = f"since {last_ckpt.name}" if last_ckpt else "(none yet)"
        return NonFiniteError(
            f"step {step}: {what}; training stopped, no checkpoint written {since}. Try "
            + " or ".join(tips)
        )

    def _postfix(self, bar: tqdm, **latest: str) -> None:
        """Updates the progress bar's postfix: the latest of each value shown."""
        self.postfix.update(latest)
        bar.set_postfix(self.postfix, refresh=False)

    def _report_val(self, val: float, train_loss: float, chars_per_sec: float, bar: tqdm,
                    progress: bool, echo: Callable[[str], None]) -> None:
        """An evaluation's validation loss: in the bar's postfix, or (no bar) one line."""
        if progress:
            self._postfix(bar, val=f"{val:.3f}", bpc=f"{val / math.log(2):.3f}")
        else:
            echo(f"step {self.step}/{self._end_step()}: train loss {train_loss:.4f}, "
                 f"val loss {val:.4f} ({val / math.log(2):.3f} bits/char), "
                 f"{chars_per_sec:,.0f} chars/s")

    # -- the steps of the loop ----------------------------------------------------------------

    def _end_step(self) -> int:
        """The step training ends at: train.max_steps, or what fits in train.max_minutes."""
        if self.budget is not None and self.budget.planned_steps is not None:
            return self.budget.planned_steps
        return self.cfg.train.max_steps

    def _next_window(self):
        """The next window's inputs and targets (T, B), with the state it starts from set
        and this window's random draws made, in a fixed order from the trainer's RNG: the
        streams to reset (train.reset_prob), the dropout masks, the weight-drop masks. Each
        is drawn for the whole batch, and only when its option is on."""
        t = self.cfg.train
        x, y, new_epoch = self.stream.next_window()
        if new_epoch or not t.stateful:
            self.state = self.model.zero_state(self.local_batch)
        if t.reset_prob > 0 and t.stateful:
            # a cold start (the zero state) is otherwise seen once per stream per epoch
            reset = self.rng.random(t.batch_size) < t.reset_prob  # (B,)
            if self.dist is not None:
                reset = self.dist.local(reset)  # this rank's streams
            for layer in self.state:
                for s in layer:
                    s[reset] = 0.0
        masks = self.model.dropout_masks(self.rng, t.batch_size)
        weight_masks = self.model.weight_drop_masks(self.rng)  # None (no draw) when off
        return x, y, masks, weight_masks

    def _loss_and_grads(self, x, y, masks, weight_masks):
        """The window's loss, gradients and new state; under MPI, this rank's streams and
        the loss and gradients summed over every rank (charrnn.distributed)."""
        if self.dist is not None:
            return self.dist.loss_and_grads(self.model, x, y, self.state, masks, weight_masks)
        return self.model.loss_and_grads(x, y, self.state, masks, weight_masks=weight_masks)

    def _after_update(self) -> None:
        """What follows an optimizer step: the moving average of the weights."""
        if self.ema is not None:
            self.ema.update(self.model.params)

    def _budget_step(self, bar: tqdm, say: Callable[[str], None]) -> bool:
        """train.max_minutes after a step: fixes the plan once the first steps are timed;
        True when the next step would end past the deadline."""
        budget = self.budget
        if budget is None:
            return False
        if budget.measured(self.step, self.elapsed):
            t0 = self.clock()
            self.validate()  # what an evaluation costs, for the plan
            planned = budget.plan(self.step, self.elapsed, self.clock() - t0)
            bar.total = planned
            bar.refresh()
            say(f"time budget {budget.minutes:g} min: {planned:,} steps fit "
                f"({budget.seconds_per_step:.3f} s/step over the first steps); the "
                f"learning-rate schedule spans them")
        return budget.expired(self.elapsed)

    def _loop(self, metrics, received, progress, resume_hint, echo) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        chars_per_step = t.batch_size * t.seq_length
        ckpt_every = t.checkpoint_every or t.eval_every
        diverged_loss = DIVERGED_LOSS_FACTOR * max(math.log(self.vocab.size), 1.0)
        start_step = self.step
        self.last_train_loss = float("nan")
        loss_sum, loss_n, norm_last = 0.0, 0, 0.0
        skipped_in_a_row = 0
        t_window = self.clock()
        chars_window = 0
        t_start = self.clock()
        elapsed0 = self.elapsed
        last_ckpt = self.ckpts.latest()
        best_path = self.run_dir / "best.safetensors"
        bar = tqdm(
            total=self._end_step() if self.budget is None or self.budget.planned_steps
            else None, initial=self.step, disable=not progress, unit="step",
            dynamic_ncols=True, leave=True, file=sys.stderr,
        )
        chars_per_sec = 0.0
        # overflow is detected below (loss, gradient norm, weights), not warned about
        with bar, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            while self.step < self._end_step():
                x, y, masks, weight_masks = self._next_window()
                loss, grads, new_state = self._loss_and_grads(x, y, masks, weight_masks)
                norm = clip_by_global_norm_(grads, t.grad_clip)
                lr = _lr(cfg, self.step, None if self.budget is None else self.budget.horizon())
                problem = None
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    problem = (f"the {what} became non-finite "
                               f"(loss={loss}, grad_norm={norm})")
                elif loss > diverged_loss:
                    problem = (f"training diverged: the loss is {loss:.4g} nats/char, "
                               f"a uniform guess is {math.log(self.vocab.size):.3g}")
                if problem is None:
                    self.optimizer.step(self.model.params, grads, lr)
                    if not all(np.isfinite(p).all() for p in self.model.params.values()):
                        raise self._stop(self.step + 1, "the weights became non-finite after "
                                         "the update (it cannot be skipped)", last_ckpt)
                    self._after_update()
                    self.state = new_state
                    skipped_in_a_row = 0
                else:
                    skipped_in_a_row += 1
                    if t.on_nonfinite == "stop":
                        raise self._stop(self.step + 1, problem, last_ckpt)
                    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        raise self._stop(self.step + 1, f"{problem}, {skipped_in_a_row} "
                                         "steps in a row: the run does not recover",
                                         last_ckpt)
                    echo(f"step {self.step + 1}: {problem}; update skipped")
                    self.state = self.model.zero_state(self.local_batch)
                self.step += 1
                now = self.clock()
                self.elapsed = elapsed0 + (now - t_start)
                out_of_time = self._budget_step(bar, bar.write if progress else echo)
                at_end = self.step == self._end_step() or out_of_time
                if problem is None:
                    loss_sum += loss
                    loss_n += 1
                    norm_last = norm
                    self.signals.record_step(norm)
                    chars_window += chars_per_step
                    self.last_train_loss = loss
                    if now - t_window > 0:
                        chars_per_sec = chars_window / (now - t_window)
                if loss_n and (self.step % t.log_every == 0 or at_end):
                    row = {
                        "step": self.step, "epoch": self.stream.epoch,
                        "train_loss": loss_sum / loss_n, "lr": lr, "grad_norm": norm_last,
                        "chars_per_sec": chars_per_sec, "elapsed_sec": self.elapsed,
                    }
                    metrics.write(row)
                    self._postfix(bar, loss=f"{row['train_loss']:.3f}",
                                  chars_s=f"{chars_per_sec:,.0f}")
                    loss_sum, loss_n = 0.0, 0
                    t_window, chars_window = self.clock(), 0
                bar.update(1)

                if self.step % t.eval_every == 0 or at_end:
                    val = self.validate()
                    train_loss = self.last_train_loss  # of the last update made
                    current = val if val is not None else train_loss
                    metrics.write(self._eval_row(
                        val, step=self.step, train_loss=train_loss, lr=lr, grad_norm=norm_last,
                        chars_per_sec=chars_per_sec, elapsed_sec=self.elapsed))
                    if val is not None:
                        self.best_val = val if self.best_val is None else min(self.best_val, val)
                        self._report_val(val, train_loss, chars_per_sec, bar, progress, echo)
                    # a skipped step's weights made the loss non-finite: not the best
                    if problem is None and math.isfinite(current) and (
                            self.best_loss is None or current < self.best_loss):
                        self.best_loss = current
                        self._save(best=True)
                if (self.step % ckpt_every == 0 and problem is None) or at_end or received:
                    last_ckpt = self._save()
                if received:
                    hint = f"; resume with: {resume_hint}" if resume_hint else ""
                    raise TrainingInterrupted(
                        f"{_signal_name(received[0])}: stopped at step {self.step}, "
                        f"checkpoint {last_ckpt}{hint}",
                        received[0],
                    )
                if out_of_time:
                    break
        if not self._on_root(best_path.exists):  # resumed at the very end, no evaluation
            self._save(best=True)
        total = self.elapsed - elapsed0
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            num_params=self.model.num_params,
            best_val_loss=self.best_val,
            best_train_loss=self.best_loss if self.best_val is None else None,
            final_train_loss=self.last_train_loss,
            chars_per_sec=(self.step - start_step) * chars_per_step / total if total else 0.0,
            best_checkpoint=best_path,
            last_checkpoint=last_ckpt,
        )


def train(cfg: Config, resume: bool = False, overwrite: bool = False, **run_kwargs) -> TrainResult:
    return Trainer(cfg, resume=resume, overwrite=overwrite).run(**run_kwargs)


class _CallableModule(types.ModuleType):
    """charrnn.train, both this module and the Python API's function: the submodule and the
    function share the name, so calling the module runs `charrnn.api.train`, while
    `charrnn.train.Trainer` and the rest stay reachable as before."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        from .api import train as api_train

        return api_train(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        from .api import train as api_train

        return inspect.signature(api_train)


sys.modules[__name__].__class__ = _CallableModule
