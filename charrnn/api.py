"""The Python API: `load` a trained model, sample, stream, score; `train` from a config.

Every call here does exactly what the matching command does (the CLI is a thin layer over
these functions): `Model.sample(..., rng_seed=S)` returns the text `charrnn sample
--rng-seed S` prints (without its final newline), `Model.score` gives `charrnn eval`'s
numbers, `train` is `charrnn train`. Bad arguments raise `charrnn.CharRNNError` subclasses
(`ArgumentError`, also a ValueError, for an argument out of range), never a bare traceback
from deep inside.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from .config import config_to_dict, load_config
from .data import load_text_ids
from .dynamic import DEFAULT_DECAY as DYNAMIC_DECAY
from .dynamic import DEFAULT_LR as DYNAMIC_LR
from .dynamic import DEFAULT_SEQ as DYNAMIC_SEQ
from .dynamic import dynamic_score
from .errors import ArgumentError, DataError, VocabError
from .evaluate import EVAL_BATCH, EVAL_SEQ, EvalResult, score, summarize
from .model import CharRNN
from .sample import encode_seed, generate
from .sample import next_char_probs as _tempered_probs
from .vocab import UNKNOWN_MODES, describe_unknown

if TYPE_CHECKING:
    from .train import StopSignals, Trainer, TrainResult

__all__ = ["Model", "load", "train"]


# -- arguments ---------------------------------------------------------------------------


def _int(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ArgumentError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise ArgumentError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _sampling(temperature: Any, top_k: Any, top_p: Any) -> tuple[float, int, float]:
    """The sampling options checked as `charrnn sample` checks them; None: no limit."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.number):
        raise ArgumentError(f"temperature must be a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ArgumentError(f"temperature must be a finite number >= 0, got {temperature}")
    k = 0 if top_k is None else _int("top_k", top_k)
    if top_p is None:
        p = 1.0
    elif isinstance(top_p, bool) or not isinstance(top_p, int | float | np.number) or not (
            math.isfinite(top_p) and 0 < top_p <= 1):
        raise ArgumentError(f"top_p must be a number in (0, 1], got {top_p!r}")
    else:
        p = float(top_p)
    return float(temperature), k, p


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be a str, got {type(value).__name__}")
    return value


# -- a trained model ---------------------------------------------------------------------


class Model:
    """A trained model, loaded from a checkpoint with `charrnn.load(path)`.

    It samples (`sample`, `stream`), scores text (`score`) and predicts the next character
    (`next_char_probs`) exactly as the `charrnn sample` and `charrnn eval` commands do.
    """

    def __init__(self, checkpoint: Checkpoint):
        """Wraps a loaded checkpoint; use `charrnn.load(path)` to make one."""
        self._ckpt = checkpoint
        self._model = CharRNN(checkpoint.shape, checkpoint.params)

    def __repr__(self) -> str:
        m = self._ckpt.config.model
        return (f"<charrnn.Model {m.cell} x{m.num_layers} hidden {m.hidden_size}, "
                f"{self.num_params:,} parameters, vocab {len(self._ckpt.vocab)}, "
                f"step {self.step}, from {str(self.path)!r}>")

    # -- what it is

    @property
    def vocab(self) -> list[str]:
        """The vocabulary: its characters in index order (a new list on every call)."""
        return list(self._ckpt.vocab.chars)

    @property
    def config(self) -> dict[str, dict[str, Any]]:
        """The run's resolved config as nested dicts, one per section (a fresh copy)."""
        return config_to_dict(self._ckpt.config)

    @property
    def num_params(self) -> int:
        """The number of parameters (every element of every tensor)."""
        return self._model.num_params

    @property
    def path(self) -> Path:
        """The checkpoint file this model was loaded from."""
        return self._ckpt.path

    @property
    def step(self) -> int:
        """The training step the checkpoint was written at."""
        return self._ckpt.step

    @property
    def info(self) -> dict[str, Any]:
        """The losses and other facts stored in the checkpoint (`charrnn info --json`)."""
        return dict(self._ckpt.info)

    # -- sampling

    def sample(
        self,
        seed: str = "",
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
        skip_unknown: bool = False,
    ) -> str:
        """The seed followed by `length` generated characters: the text `charrnn sample`
        prints with the same options (less its final newline).

        temperature 0 is greedy argmax; `top_k` keeps the K most likely characters and
        `top_p` the most likely ones holding P of the mass (None: no limit); the same
        `rng_seed` gives the same text (None: fresh randomness). Seed characters outside
        the vocabulary raise VocabError, or are dropped with `skip_unknown` (the seed is
        still returned as given)."""
        return "".join(self.stream(seed, length, temperature, top_k, top_p, rng_seed,
                                   skip_unknown))

    def stream(
        self,
        seed: str = "",
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
        skip_unknown: bool = False,
        *,
        include_seed: bool = True,
    ) -> Iterator[str]:
        """`sample`'s text piece by piece, as it is generated: the seed first (unless
        `include_seed` is False, or it is empty), then one piece per generated character;
        `"".join(stream(...)) == sample(...)` for the same arguments."""
        pieces = self.stream_samples(1, seed, length, temperature, top_k, top_p, rng_seed,
                                     skip_unknown)
        for n, (_, piece) in enumerate(pieces):
            if piece and (n or include_seed):  # piece 0 is the seed
                yield piece

    def samples(
        self,
        num_samples: int,
        seed: str = "",
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
        skip_unknown: bool = False,
    ) -> list[str]:
        """`num_samples` independent samples drawn as one batch, each the seed followed by
        `length` characters: the texts `charrnn sample --num-samples N` prints."""
        texts = [""] * _int("num_samples", num_samples, 1)
        for i, piece in self.stream_samples(num_samples, seed, length, temperature, top_k,
                                            top_p, rng_seed, skip_unknown):
            texts[i] += piece
        return texts

    def stream_samples(
        self,
        num_samples: int,
        seed: str = "",
        length: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng_seed: int | None = None,
        skip_unknown: bool = False,
    ) -> Iterator[tuple[int, str]]:
        """`samples` as (sample index, piece) pairs, in order: sample 0 streamed as the
        batch generates it (its seed, possibly empty, then one piece per character), then,
        once the batch is done (all samples finish together), every other sample whole."""
        n = _int("num_samples", num_samples, 1)
        seed = _text("seed", seed)
        length = _int("length", length)
        temperature, k, p = _sampling(temperature, top_k, top_p)
        if rng_seed is not None:
            rng_seed = _int("rng_seed", rng_seed)
        vocab = self._ckpt.vocab
        seed_ids = encode_seed(vocab, seed, bool(skip_unknown))  # refused before any output
        rng = np.random.default_rng(rng_seed)
        chars = vocab.chars
        yield 0, seed
        others: list[np.ndarray] = []
        for ids in generate(self._model, seed_ids, length, temperature=temperature, top_k=k,
                            top_p=p, num_samples=n, rng=rng):
            yield 0, chars[int(ids[0])]
            if n > 1:
                others.append(ids[1:])
        if n > 1:
            drawn = np.stack(others, axis=1) if others else np.empty((n - 1, 0), np.int64)
            for i in range(1, n):
                yield i, seed + vocab.decode(drawn[i - 1])

    def next_char_probs(
        self,
        context: str = "",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        skip_unknown: bool = False,
    ) -> dict[str, float]:
        """The distribution of the character after `context` (from the zero state; empty:
        the zero state's prediction), after temperature, top-k and top-p as sampling
        applies them: every vocabulary character, in index order, to its probability.

        temperature 0 puts all the mass on the most likely character."""
        context = _text("context", context)
        temperature, k, p = _sampling(temperature, top_k, top_p)
        ids = encode_seed(self._ckpt.vocab, context, bool(skip_unknown))
        model = self._model
        if len(ids):
            logits, _, _ = model.forward(ids[:, None], model.zero_state(1))
            logits = logits[-1:]  # (1, V) after the last context character
        else:
            logits = model.params["head.bias"][None, :]  # (1, V)
        if temperature == 0:
            probs = np.zeros(logits.shape[1])
            probs[int(np.argmax(logits[0]))] = 1.0
        else:
            probs = _tempered_probs(logits, temperature, k, p)[0]
        return dict(zip(self._ckpt.vocab.chars, probs.tolist(), strict=True))

    # -- scoring

    def score(
        self,
        text: str,
        unknown: str = "skip",
        *,
        batch_size: int = EVAL_BATCH,
        seq_length: int | None = None,
        dynamic: bool = False,
        dynamic_lr: float = DYNAMIC_LR,
        dynamic_decay: float = DYNAMIC_DECAY,
        progress: Callable[[int, int], None] | None = None,
    ) -> EvalResult:
        """Scores `text` as `charrnn eval` scores a UTF-8 file holding exactly these
        characters (no newline translation): loss in nats/char, bpc, perplexity, `chars`
        scored and `unknown_chars` (outside the vocabulary: skipped, or with
        unknown="error" refused with VocabError). At least 2 known characters are needed.

        `seq_length` defaults to 256, or 50 with `dynamic`. `dynamic=True` is `charrnn eval
        --dynamic` (charrnn.dynamic): one stream of `seq_length` segments, each scored
        before the copy of the weights learns from it; the result is a DynamicEvalResult,
        with the static scores of the same layout beside. `progress(done, total)` is
        then called after each segment: the characters scored so far, of how many."""
        text = _text("text", text)
        self._unknown_mode(unknown)
        vocab = self._ckpt.vocab
        ids, n_unknown = vocab.encode(text, unknown="skip")
        if n_unknown and unknown == "error":
            raise VocabError(f"text holds {describe_unknown(vocab.unknown_chars(text))}")
        if ids.size == 0 and n_unknown == 0:
            raise DataError("text is empty")
        if ids.size < 2:
            raise DataError(f"text has {ids.size} character(s) in the vocabulary ({n_unknown}"
                            " unknown skipped); at least 2 are needed to score")
        return self._score_ids(ids, n_unknown, batch_size, seq_length, dynamic, dynamic_lr,
                               dynamic_decay, progress)

    def score_file(
        self,
        path: str | os.PathLike,
        unknown: str = "skip",
        *,
        batch_size: int = EVAL_BATCH,
        seq_length: int | None = None,
        dynamic: bool = False,
        dynamic_lr: float = DYNAMIC_LR,
        dynamic_decay: float = DYNAMIC_DECAY,
        progress: Callable[[int, int], None] | None = None,
    ) -> EvalResult:
        """`score` of a UTF-8 text file, read in chunks: what `charrnn eval --text` runs."""
        self._unknown_mode(unknown)
        ids, n_unknown = load_text_ids(path, self._ckpt.vocab, unknown=unknown)
        return self._score_ids(ids, n_unknown, batch_size, seq_length, dynamic, dynamic_lr,
                               dynamic_decay, progress)

    @staticmethod
    def _unknown_mode(unknown: Any) -> None:
        if unknown not in UNKNOWN_MODES:
            raise ArgumentError(f"unknown must be 'skip' or 'error', not {unknown!r}")

    def _score_ids(self, ids: np.ndarray, n_unknown: int, batch_size: int,
                   seq_length: int | None, dynamic: bool = False,
                   dynamic_lr: float = DYNAMIC_LR, dynamic_decay: float = DYNAMIC_DECAY,
                   progress: Callable[[int, int], None] | None = None) -> EvalResult:
        batch_size = _int("batch_size", batch_size, 1)
        if seq_length is None:
            seq_length = DYNAMIC_SEQ if dynamic else EVAL_SEQ
        seq_length = _int("seq_length", seq_length, 1)
        if dynamic:
            return dynamic_score(self._model, ids, seq_length, dynamic_lr, dynamic_decay,
                                 n_unknown, progress)
        total, chars = score(self._model, ids, batch_size, seq_length)
        return summarize(total, chars, n_unknown)


def load(path: str | os.PathLike) -> Model:
    """A Model from a `.safetensors` checkpoint, or from a run directory (its best
    checkpoint, else its latest). A missing path, or a file that is not a sound charrnn
    checkpoint, raises CheckpointError."""
    if not isinstance(path, str | os.PathLike):
        raise ArgumentError(f"path must be a str or a path, got {type(path).__name__}")
    return Model(load_checkpoint(resolve_checkpoint(path)))


# -- training ------------------------------------------------------------------------------


def train(
    config: str | os.PathLike | Mapping[str, Any],
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    resume: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    on_start: Callable[[Trainer], None] | None = None,
    resume_hint: str = "",
    signals: StopSignals | None = None,
) -> TrainResult:
    """Trains a model: the same run as `charrnn train` (checkpoints, metrics.jsonl and
    config.yaml go to the config's output.dir).

    `config` is a YAML file or a dict of sections; `overrides` maps dotted keys to values
    like `--set` (`{"model.hidden_size": 128}`; a str value is read as `--set` reads it;
    the CLI's `KEY=VALUE` strings are taken too). `resume` continues the run in output.dir
    from its last checkpoint; `overwrite` starts over in one that holds checkpoints.
    `callback(row)` receives each metrics row as it is written to metrics.jsonl; an
    exception it raises stops the run (the checkpoints written so far stay).

    `progress` shows the bar on stderr; `echo` receives the run's messages (default: printed
    to stderr); `on_start(trainer)` is called once the run
    directory is taken; `signals` lets a caller install Ctrl-C/SIGTERM handling before
    the config loads. Ctrl-C stops after writing a checkpoint (TrainingInterrupted)."""
    from .train import StopSignals, Trainer

    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str) or not isinstance(overrides, Mapping | Sequence):
        raise ArgumentError("overrides must be a dict of dotted keys to values, "
                            f"got {type(overrides).__name__}")
    if not isinstance(config, str | os.PathLike | Mapping):
        raise ArgumentError("config must be a YAML file's path or a dict of sections, got "
                            f"{type(config).__name__}")
    if echo is None:
        def echo(message: str) -> None:
            import sys

            print(message, file=sys.stderr)

    if signals is None:
        with StopSignals() as own:
            return train(config, overrides, resume, callback, overwrite=overwrite,
                         progress=progress, echo=echo, on_start=on_start,
                         resume_hint=resume_hint, signals=own)
    trainer = Trainer(load_config(config, overrides), resume=bool(resume),
                      overwrite=bool(overwrite))
    start = (lambda: on_start(trainer)) if on_start is not None else None
    return trainer.run(progress=progress, resume_hint=resume_hint, echo=echo, signals=signals,
                       on_start=start, on_metrics=callback)
