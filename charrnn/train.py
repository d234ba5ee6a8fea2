"""The training loop: truncated BPTT over stateful windows, evaluation, checkpoints, resume.

Everything a resumed run needs to continue bit for bit is in the checkpoint: parameters,
optimizer moments, the update count, the data position, the hidden state carried into the
next window, and the dropout RNG.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from .checkpoint import Checkpoint, CheckpointManager, atomic_write_bytes, model_shape
from .config import Config, config_to_dict, resolve_paths
from .data import Corpus, WindowStream, load_corpus
from .errors import CharRNNError, CheckpointError, NonFiniteError, RunDirError
from .evaluate import score
from .model import CharRNN
from .optim import Optimizer, clip_by_global_norm_, learning_rate

LOCK = ".lock"


class TrainingInterrupted(CharRNNError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143), raised once the checkpoint is on disk."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class TrainResult:
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


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_dir_lock(run_dir: Path):
    """Holds `run_dir/.lock` (our pid) for the duration; a stale lock of a dead process is
    taken over, a live one is refused."""
    lock = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid != os.getpid() and _pid_alive(pid):
                raise RunDirError(
                    f"{run_dir} is in use by another charrnn train (pid {pid}, lock file {lock})"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        except OSError as e:
            raise RunDirError(f"cannot write to {run_dir}: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise RunDirError(f"cannot take the lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


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

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
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
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


@contextmanager
def stop_signals():
    """SIGINT / SIGTERM set a flag that the loop checks after each step."""
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield received
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


# -- the loop -------------------------------------------------------------------------------


def _lr(cfg: Config, step: int) -> float:
    t = cfg.train
    return learning_rate(
        step,
        base_lr=t.learning_rate,
        schedule=t.lr_schedule,
        max_steps=t.max_steps,
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


def _check_resume_compatible(cfg: Config, ckpt: Checkpoint, corpus: Corpus) -> None:
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
    if ckpt.step >= cfg.train.max_steps:
        raise CheckpointError(
            f"{ckpt.path}: already at step {ckpt.step} of train.max_steps={cfg.train.max_steps};"
            " raise it (e.g. --set train.max_steps=...) to train further"
        )


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg = resolve_paths(cfg)
        t = cfg.train
        self.run_dir = prepare_run_dir(cfg.output.dir)
        self.ckpts = CheckpointManager(self.run_dir, cfg.output.keep_last)
        self.resume = resume
        self.overwrite = overwrite
        self.corpus = load_corpus(cfg.data, cache_dir=cache_dir() if cfg.data.cache else None)
        self.vocab = self.corpus.vocab
        self.stream = WindowStream(self.corpus.train, t.batch_size, t.seq_length)
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
        self.rng = np.random.default_rng(t.seed + 1)  # dropout masks
        self.state = self.model.zero_state(t.batch_size)
        self.step = 0
        self.best_loss: float | None = None  # validation loss (training loss without val)
        self.best_val: float | None = None
        self.elapsed = 0.0
        self.val_ids = self.corpus.val
        if t.eval_max_chars and len(self.val_ids) > t.eval_max_chars:
            self.val_ids = self.val_ids[: t.eval_max_chars]

    # -- state in and out of checkpoints ----------------------------------------------------

    def _train_tensors(self) -> dict[str, np.ndarray]:
        tensors = {f"optim.{k}": v for k, v in self.optimizer.state_dict().items()}
        for k, layer in enumerate(self.state):
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
        }

    def _restore(self, ckpt: Checkpoint) -> None:
        _check_resume_compatible(self.cfg, ckpt, self.corpus)
        try:
            for k, p in self.model.params.items():
                p[...] = ckpt.params[k]
            self.optimizer.load_state_dict(
                {k[len("optim.") :]: v for k, v in ckpt.train_tensors.items()
                 if k.startswith("optim.")}
            )
            self.state = [
                tuple(ckpt.train_tensors[f"state.l{k}.{n}"] for n in "hc"[: len(layer)])
                for k, layer in enumerate(self.state)
            ]
            ts = ckpt.train_state
            self.rng.bit_generator.state = ts["rng"]
            self.stream.load_state_dict(ts["data"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: incomplete training state ({e})") from None
        self.best_loss, self.best_val = ts.get("best_loss"), ts.get("best_val")
        self.elapsed = float(ts.get("elapsed_sec", 0.0))
        self.step = ckpt.step

    def _save(self, best: bool = False) -> Path:
        if not all(np.isfinite(p).all() for p in self.model.params.values()):
            raise NonFiniteError(
                f"step {self.step}: weights are not finite; checkpoint not written"
            )
        kwargs: dict[str, Any] = dict(
            config=self.cfg,
            vocab=self.vocab,
            info={"best_val_loss": self.best_val, "best_loss": self.best_loss,
                  "train_loss": self.last_train_loss},
            train_tensors=self._train_tensors(),
            train_state=self._train_state(),
        )
        if best:
            return self.ckpts.save_best(self.step, self.model.params, **kwargs)
        return self.ckpts.save(self.step, self.model.params, **kwargs)

    def _write_run_files(self) -> None:
        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        atomic_write_bytes(self.run_dir / "config.yaml", text.encode())
        vocab = json.dumps(self.vocab.to_json(), ensure_ascii=False, indent=0)
        atomic_write_bytes(self.run_dir / "vocab.json", vocab.encode())

    # -- evaluation -------------------------------------------------------------------------

    def validate(self) -> float | None:
        if len(self.val_ids) < 2:
            return None
        total, count = score(self.model, self.val_ids)
        return total / count

    # -- the loop ---------------------------------------------------------------------------

    def run(
        self, progress: bool = True, resume_hint: str = "", echo: Callable[[str], None] = print
    ) -> TrainResult:
        with run_dir_lock(self.run_dir):
            existing = self.ckpts.latest()
            if self.resume:
                self._restore(self.ckpts.load_latest_resumable())
            elif existing is not None:
                if not self.overwrite:
                    raise RunDirError(
                        f"{self.run_dir} already holds checkpoints ({existing.name}); "
                        "continue with --resume, start over with --overwrite, "
                        "or set another output.dir"
                    )
                for old in self.run_dir.glob("*.safetensors"):
                    old.unlink()
            self._write_run_files()
            metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.step if self.resume else None)
            try:
                with stop_signals() as received:
                    return self._loop(metrics, received, progress, resume_hint, echo)
            finally:
                metrics.close()

    def _loop(self, metrics, received, progress, resume_hint, echo) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        chars_per_step = t.batch_size * t.seq_length
        ckpt_every = t.checkpoint_every or t.eval_every
        start_step = self.step
        self.last_train_loss = float("nan")
        loss_sum, loss_n, norm_last = 0.0, 0, 0.0
        t_window = time.perf_counter()
        chars_window = 0
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        last_ckpt = self.ckpts.latest()
        best_path = self.run_dir / "best.safetensors"
        bar = tqdm(
            total=t.max_steps, initial=self.step, disable=not progress, unit="step",
            dynamic_ncols=True, leave=True, file=sys.stderr,
        )
        chars_per_sec = 0.0
        try:
            while self.step < t.max_steps:
                x, y, new_epoch = self.stream.next_window()
                if new_epoch or not t.stateful:
                    self.state = self.model.zero_state(t.batch_size)
                masks = self.model.dropout_masks(self.rng, t.batch_size)
                loss, grads, new_state = self.model.loss_and_grads(x, y, self.state, masks)
                norm = clip_by_global_norm_(grads, t.grad_clip)
                lr = _lr(cfg, self.step)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    if t.on_nonfinite == "stop":
                        raise NonFiniteError(
                            f"step {self.step + 1}: the {what} became non-finite "
                            f"(loss={loss}, grad_norm={norm}); nothing was saved past the last "
                            f"good checkpoint ({last_ckpt.name if last_ckpt else 'none'}). "
                            "Try a lower train.learning_rate, a smaller train.grad_clip, "
                            "or train.on_nonfinite=skip"
                        )
                    echo(f"step {self.step + 1}: non-finite {what}, update skipped")
                    self.state = self.model.zero_state(t.batch_size)
                    self.step += 1
                    bar.update(1)
                    continue
                self.optimizer.step(self.model.params, grads, lr)
                self.state = new_state
                self.step += 1
                loss_sum += loss
                loss_n += 1
                norm_last = norm
                chars_window += chars_per_step
                self.last_train_loss = loss
                now = time.perf_counter()
                self.elapsed = elapsed0 + (now - t_start)
                if now - t_window > 0:
                    chars_per_sec = chars_window / (now - t_window)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    if not all(np.isfinite(p).all() for p in self.model.params.values()):
                        raise NonFiniteError(
                            f"step {self.step}: the weights became non-finite; the last good "
                            f"checkpoint is {last_ckpt.name if last_ckpt else 'none'}. "
                            "Try a lower train.learning_rate"
                        )
                    row = {
                        "step": self.step, "epoch": self.stream.epoch,
                        "train_loss": loss_sum / loss_n, "lr": lr, "grad_norm": norm_last,
                        "chars_per_sec": chars_per_sec, "elapsed_sec": self.elapsed,
                    }
                    metrics.write(row)
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                                    chars_s=f"{chars_per_sec:,.0f}", refresh=False)
                    loss_sum, loss_n = 0.0, 0
                    t_window, chars_window = time.perf_counter(), 0
                bar.update(1)

                at_end = self.step == t.max_steps
                if self.step % t.eval_every == 0 or at_end:
                    val = self.validate()
                    current = val if val is not None else loss
                    if val is not None:
                        metrics.write({
                            "step": self.step, "val_loss": val, "val_bpc": val / math.log(2),
                            "train_loss": loss, "lr": lr, "grad_norm": norm,
                            "chars_per_sec": chars_per_sec, "elapsed_sec": self.elapsed,
                        })
                        self.best_val = val if self.best_val is None else min(self.best_val, val)
                        if not progress:
                            echo(f"step {self.step}/{t.max_steps}: train loss {loss:.4f}, "
                                 f"val loss {val:.4f} ({val / math.log(2):.3f} bits/char), "
                                 f"{chars_per_sec:,.0f} chars/s")
                    if self.best_loss is None or current < self.best_loss:
                        self.best_loss = current
                        self._save(best=True)
                if self.step % ckpt_every == 0 or at_end or received:
                    last_ckpt = self._save()
                if received:
                    signum = received[0]
                    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                    hint = f"; resume with: {resume_hint}" if resume_hint else ""
                    raise TrainingInterrupted(
                        f"{name}: stopped at step {self.step}, checkpoint {last_ckpt}{hint}",
                        signum,
                    )
        finally:
            bar.close()
        if not best_path.exists():  # resumed at the very end of a run with no evaluation
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
