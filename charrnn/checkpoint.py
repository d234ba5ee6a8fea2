"""Checkpoints: safetensors files, written atomically, read without unpickling anything.

A checkpoint holds the model tensors under PyTorch's names (CONTRACT) and, in the file's
string metadata, the run's config, vocabulary, step and losses.  Files written during
training also carry the full training state so that `--resume` is exact:

    optim.<moment>.<param>   optimizer moments            (tensors)
    optim.t                  optimizer update count       (tensor)
    state.l{k}.h / .c        hidden state carried into the next window (tensors)
    metadata "train_state"   JSON: RNG state, data position, best loss, ...

Every file written here also carries metadata "digest", a checksum of all its tensors and
metadata (`checkpoint_digest`), which every load checks: bit rot on disk is found, not
loaded. Files written before checksums have none and load as they always did.

Writing goes to a temporary file in the same directory (its name never ends in
.safetensors), is fsynced, then renamed over the target: a crash at any moment leaves
either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
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
DIGEST_KEY = "digest"
DIGEST_ALGORITHM = "sha256"  # the fastest in hashlib where the CPU has SHA instructions
_DIGEST_VALUE = re.compile(r"^(sha256|blake2b):([0-9a-f]+)$")  # both are checked on load


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
    return ModelShape(m.cell, vocab_size, m.hidden_size, m.num_layers, m.embedding_size,
                      m.dropout, m.weight_drop, m.input_dropout)


# -- the checksum -------------------------------------------------------------------------


def checkpoint_digest(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    algorithm: str = DIGEST_ALGORITHM,
) -> str:
    """The checksum stored in a checkpoint's metadata "digest": "<algorithm>:<hex digest>"
    of this byte stream:

    - for each tensor, in sorted name order: the line `json.dumps([name, dtype, shape])`
      and a newline (dtype as numpy's little-endian type string: "<f4", "<f8", "<i8"),
      then the tensor's bytes, C order, little-endian;
    - then for each metadata key but "digest", in sorted order: the line
      `json.dumps([key, value])` and a newline.

    It depends on the names, dtypes, shapes and values only, not on how safetensors lays
    them out. hashlib releases the GIL while it hashes, so it can run beside other work."""
    h = hashlib.new(algorithm)
    for name in sorted(tensors):
        t = tensors[name]
        le = t.dtype.newbyteorder("<")
        h.update((json.dumps([name, le.str, list(t.shape)]) + "\n").encode())
        h.update(np.ascontiguousarray(t, dtype=le).reshape(-1).view(np.uint8))
    for key in sorted(metadata):
        if key != DIGEST_KEY:
            h.update((json.dumps([key, metadata[key]]) + "\n").encode())
    return f"{algorithm}:{h.hexdigest()}"


def _stored_digest(meta: Mapping[str, str], path: Path) -> tuple[str, str] | None:
    """(algorithm, stored value) of a file's checksum; None for a file from before them."""
    value = meta.get(DIGEST_KEY)
    if value is None:
        # a checksum under another key: the name "digest" itself was damaged
        renamed = next((k for k, v in meta.items() if _DIGEST_VALUE.match(v)), None)
        if renamed is not None:
            raise CheckpointError(f"{path}: damaged: its checksum is under the key {renamed!r}")
        return None
    m = _DIGEST_VALUE.match(value)
    if not m or len(m.group(2)) != 2 * hashlib.new(m.group(1)).digest_size:
        raise CheckpointError(f"{path}: damaged: its checksum {value[:80]!r} is malformed")
    return m.group(1), value


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
    # The checksum is computed on a second thread while safetensors serializes the file
    # with a placeholder of the same length in its place, and the file is written; it is
    # put over the placeholder just before the fsync.
    algorithm = DIGEST_ALGORITHM
    placeholder = f"{algorithm}:" + "0" * (2 * hashlib.new(algorithm).digest_size)
    with ThreadPoolExecutor(1, thread_name_prefix="charrnn-digest") as pool:
        digest = pool.submit(checkpoint_digest, tensors, dict(metadata), algorithm)
        data = save(tensors, metadata={**metadata, DIGEST_KEY: placeholder})
        header = data[8 : 8 + int.from_bytes(data[:8], "little")]
        at = header.find(placeholder.encode())
        if at < 0 or header.find(placeholder.encode(), at + 1) >= 0:  # not found once: redo
            data = save(tensors, metadata={**metadata, DIGEST_KEY: digest.result()})
            atomic_write_bytes(Path(path), data)
        else:
            atomic_write_bytes(Path(path), data,
                               patch=lambda: (8 + at, digest.result().encode()))


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
            stored = _stored_digest(meta, path)
            wanted = [n for n in names if training_state or not n.startswith(("optim.", "state."))]
            # with a checksum every tensor is read, to check it; without, what is used
            tensors = {n: f.get_tensor(n) for n in (names if stored else wanted)}
    except CharRNNError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, MemoryError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({msg})") from None
    if stored is not None:
        algorithm, value = stored
        if checkpoint_digest(tensors, meta, algorithm) != value:
            raise CheckpointError(
                f"{path}: damaged: its tensor data or metadata does not match its checksum"
            )
        tensors = {n: tensors[n] for n in wanted}

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
    # beside the model: optimizer moments, carried states, raw weights (under train.ema)
    stray = [n for n in tensors if not n.startswith(("optim.", "state.", "raw."))]
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
                    echo(f"Warning: {why}; moved aside to {bad.name}.corrupt, "
                         f"resuming from {path.name}")
            return ckpt
        raise CheckpointError(f"{self.run_dir}: no readable checkpoint ({errors[0][1]})")
