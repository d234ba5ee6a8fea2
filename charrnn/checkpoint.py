"""Checkpoints: safetensors files, written atomically, read without unpickling anything.

A checkpoint holds the model tensors under PyTorch's names (CONTRACT) and, in the file's
string metadata, the run's config, vocabulary, step and losses.  Files written during
training also carry the full training state so that `--resume` is exact:

    optim.<moment>.<param>   optimizer moments            (tensors)
    optim.t                  optimizer update count       (tensor)
    state.l{k}.h / .c        hidden state carried into the next window (tensors)
    metadata "train_state"   JSON: RNG state, data position, best loss, ...

Writing goes to a temporary file in the same directory (its name never ends in
.safetensors), is fsynced, then renamed over the target: a crash at any moment leaves
either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from .config import Config, config_from_dict, config_to_dict
from .errors import CharRNNError, CheckpointError
from .fileio import atomic_write_bytes
from .model import ModelShape, Params, param_shapes
from .vocab import Vocab

FORMAT = "charrnn"
FORMAT_VERSION = "1"
BEST = "best.safetensors"
_STEP_FILE = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
MAX_METADATA_CHARS = 64 << 20


@dataclass
class Checkpoint:
    path: Path
    config: Config
    vocab: Vocab
    params: Params
    step: int
    info: dict[str, Any] = field(default_factory=dict)  # losses, timestamps
    train_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> ModelShape:
        return model_shape(self.config, self.vocab.size)


def model_shape(cfg: Config, vocab_size: int) -> ModelShape:
    m = cfg.model
    return ModelShape(m.cell, vocab_size, m.hidden_size, m.num_layers, m.embedding_size, m.dropout)


# -- writing ----------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    params: Params,
    *,
    config: Config,
    vocab: Vocab,
    step: int,
    info: dict[str, Any] | None = None,
    train_tensors: dict[str, np.ndarray] | None = None,
    train_state: dict[str, Any] | None = None,
) -> None:
    tensors = {k: np.ascontiguousarray(v) for k, v in params.items()}
    for k, v in (train_tensors or {}).items():
        tensors[k] = np.ascontiguousarray(v)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": str(step),
        "config": json.dumps(config_to_dict(config)),
        "vocab": json.dumps(vocab.to_json()),
        "info": json.dumps(info or {}),
    }
    if train_state is not None:
        metadata["train_state"] = json.dumps(train_state)
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


# -- reading ----------------------------------------------------------------------------


def _json_field(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: not a charrnn checkpoint (metadata lacks {key!r})")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON") from None


def load_checkpoint(path: str | os.PathLike, training_state: bool = False) -> Checkpoint:
    """Read and validate a checkpoint file; every problem is a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > min(size - 8, MAX_METADATA_CHARS):
        raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a charrnn checkpoint (no charrnn metadata)")
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: checkpoint format version {meta.get('format_version')!r} "
                    f"is not supported (this charrnn reads {FORMAT_VERSION})"
                )
            wanted = [n for n in names if training_state or not n.startswith(("optim.", "state."))]
            tensors = {n: f.get_tensor(n) for n in wanted}
    except CharRNNError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, MemoryError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({msg})") from None

    try:
        config = config_from_dict(_json_field(meta, "config", path), source=f"{path} metadata")
        vocab = Vocab.from_json(_json_field(meta, "vocab", path))
        step = int(meta.get("step", "x"))
    except CheckpointError:
        raise
    except (CharRNNError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad metadata: {e}") from None
    if step < 0:
        raise CheckpointError(f"{path}: bad metadata: step {step} is negative")
    info = _json_field(meta, "info", path)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: bad metadata: 'info' is not a JSON object")
    train_state = _json_field(meta, "train_state", path) if training_state else {}
    if training_state and not train_state:
        raise CheckpointError(f"{path}: holds no training state to resume from")
    if not isinstance(train_state, dict):
        raise CheckpointError(f"{path}: bad metadata: 'train_state' is not a JSON object")

    shape = model_shape(config, vocab.size)
    params: Params = {}
    for name, expected in param_shapes(shape).items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is missing for a {config.model.cell}")
        t = tensors.pop(name)
        if t.shape != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {t.shape}, the config implies {expected}"
            )
        if t.dtype not in (np.float32, np.float64):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}")
        if not np.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf values")
        params[name] = np.ascontiguousarray(t, dtype=config.train.dtype)
    stray = [n for n in tensors if not n.startswith(("optim.", "state."))]
    if stray:
        raise CheckpointError(f"{path}: unexpected tensor {stray[0]!r}")
    return Checkpoint(path, config, vocab, params, step, info, tensors, train_state)


# -- the run directory -------------------------------------------------------------------


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The numbered checkpoints in a run directory, oldest first."""
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _STEP_FILE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as given, or for a run directory its best (else latest) checkpoint."""
    p = Path(path)
    if p.is_dir():
        if (p / BEST).is_file():
            return p / BEST
        steps = step_checkpoints(p)
        if not steps:
            raise CheckpointError(f"{p}: run directory holds no checkpoint")
        return steps[-1][1]
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or run directory")
    return p


class CheckpointManager:
    """Numbered checkpoints with keep_last rotation, plus best.safetensors."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.run_dir = run_dir
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.run_dir / f"ckpt-{step:08d}.safetensors"

    def save(self, step: int, params: Params, **kwargs: Any) -> Path:
        path = self.path_for(step)
        save_checkpoint(path, params, step=step, **kwargs)
        for _, old in step_checkpoints(self.run_dir)[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, step: int, params: Params, **kwargs: Any) -> Path:
        path = self.run_dir / BEST
        save_checkpoint(path, params, step=step, **kwargs)
        return path

    def latest(self) -> Path | None:
        steps = step_checkpoints(self.run_dir)
        return steps[-1][1] if steps else None

    def load_latest_resumable(self, echo: Callable[[str], None] | None = None) -> Checkpoint:
        """The newest numbered checkpoint that loads. Unreadable newer ones (damaged on disk:
        charrnn's own writes are atomic) are renamed to `<name>.corrupt`, so that neither
        this run's rotation nor a later resume takes them for checkpoints."""
        steps = step_checkpoints(self.run_dir)
        if not steps:
            raise CheckpointError(
                f"{self.run_dir}: nothing to resume (no checkpoint); start it without --resume"
            )
        errors = []
        for _, path in reversed(steps):
            try:
                ckpt = load_checkpoint(path, training_state=True)
            except CheckpointError as e:
                errors.append((path, str(e)))
                continue
            for bad, why in errors:
                bad.replace(bad.with_name(bad.name + ".corrupt"))
                if echo is not None:
                    echo(f"{why}; moved aside to {bad.name}.corrupt, resuming from {path.name}")
            return ckpt
        raise CheckpointError(f"{self.run_dir}: no readable checkpoint ({errors[0][1]})")
