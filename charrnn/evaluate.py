"""Scoring held-out text: a stateful forward pass in large windows, no gradients."""

from __future__ import annotations

import itertools
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np

from . import blas
from .checkpoint import load_checkpoint, resolve_checkpoint
from .data import eval_windows, load_text_ids
from .model import CharRNN, token_nll
from .parallel import run_groups, stream_groups

EVAL_BATCH = 64  # streams; bigger batches make the per-step GEMM more efficient
EVAL_SEQ = 256
# Each window goes through the model in slices of steps, the state carried (so the result
# is the same): a slice's gate activations, (steps, B, G*H) per layer, stay in the CPU cache
# between the gather, the step loop, the next layer's GEMM and the head, where a whole
# window's would go out to memory and back several times.  About this many bytes a slice:
SLICE_BYTES = 8 << 20


@dataclass
class EvalResult:
    """The scores of a held-out text, as `charrnn eval` reports them."""

    loss: float  # nats per character
    bpc: float  # bits per character
    perplexity: float
    chars: int  # characters predicted and scored
    unknown_chars: int  # occurrences of characters outside the vocabulary (skipped)

    def to_json(self) -> dict:
        """The fields as a dict: `charrnn eval --json`'s object."""
        return asdict(self)


class _StreamGroup:
    """Scores one contiguous group of the evaluation streams (the same columns of every
    window) with one of the model's replicas (its own buffers, the weights shared) and its own
    carried state."""

    def __init__(self, model: CharRNN, columns: slice):
        self.model = model
        self.columns = columns
        self.state: list | None = None
        self.total, self.count = 0.0, 0

    def score(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> None:
        x, y, mask = (np.ascontiguousarray(a[:, self.columns]) for a in (x, y, mask))
        model = self.model
        if self.state is None:
            self.state = model.zero_state(x.shape[1])
        G = model.cell.gates * model.shape.hidden_size
        steps = max(1, SLICE_BYTES // (x.shape[1] * G * model.dtype.itemsize))
        for s in range(0, len(x), steps):
            logits, self.state, _ = model.forward(x[s : s + steps], self.state)
            nll = token_nll(logits, y[s : s + steps].reshape(-1))  # (steps*B,)
            m = mask[s : s + steps].reshape(-1)
            self.total += float(np.sum(nll[m], dtype=np.float64))
            self.count += int(m.sum())


def score(
    model: CharRNN,
    ids: np.ndarray,
    batch_size: int = EVAL_BATCH,
    seq_length: int = EVAL_SEQ,
    threads: int | None = None,
    ranks: tuple[int, int] = (0, 1),
) -> tuple[float, int]:
    """Total NLL in nats and the number of characters scored: every id after the first of
    each evaluation stream is predicted once, with the state carried across windows.

    The streams are independent, so they are split into groups (default: one per core, see
    charrnn.parallel), each scored on its own thread, with its own carried state. The total
    differs between thread counts by float rounding only.

    `ranks` = (r, N): only the r-th of N contiguous blocks of the streams, an MPI rank's
    share (charrnn.distributed sums the ranks' totals), BLAS single-threaded as each group
    of one process has it."""
    windows = eval_windows(ids, batch_size, seq_length)
    first = next(windows, None)
    if first is None:
        return 0.0, 0
    rank, size = ranks
    b = first[0].shape[1]
    start, stop = b * rank // size, b * (rank + 1) // size
    if stop <= start:
        return 0.0, 0
    columns = [slice(start + c.start, start + c.stop)
               for c in stream_groups(stop - start, threads)]
    groups = [_StreamGroup(m, c) for m, c in zip(model.replicas(len(columns)), columns)]
    with model.frozen(), (blas.single_threaded() if size > 1 else nullcontext()):
        for window in itertools.chain([first], windows):
            run_groups(lambda g, window=window: groups[g].score(*window), len(groups))
    return sum(g.total for g in groups), sum(g.count for g in groups)


def summarize(total_nll: float, chars: int, unknown_chars: int = 0) -> EvalResult:
    loss = total_nll / chars if chars else float("nan")
    return EvalResult(
        loss=loss,
        bpc=loss / math.log(2),
        perplexity=math.exp(loss) if loss < 700 else float("inf"),
        chars=chars,
        unknown_chars=unknown_chars,
    )


def evaluate_file(
    checkpoint: str | os.PathLike,
    text: str | os.PathLike,
    unknown: str = "skip",
    batch_size: int = EVAL_BATCH,
    seq_length: int = EVAL_SEQ,
) -> EvalResult:
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    ids, n_unknown = load_text_ids(text, ckpt.vocab, unknown=unknown)
    model = CharRNN(ckpt.shape, ckpt.params)
    total, chars = score(model, ids, batch_size, seq_length)
    return summarize(total, chars, n_unknown)
