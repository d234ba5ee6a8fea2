"""Scoring held-out text: a stateful forward pass in large windows, no gradients."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .checkpoint import load_checkpoint, resolve_checkpoint
from .data import eval_windows, load_text_ids
from .model import CharRNN, token_nll

EVAL_BATCH = 64  # streams; bigger batches make the per-step GEMM more efficient
EVAL_SEQ = 256


@dataclass
class EvalResult:
    loss: float  # nats per character
    bpc: float  # bits per character
    perplexity: float
    chars: int  # characters predicted and scored
    unknown_chars: int  # occurrences of characters outside the vocabulary (skipped)

    def to_json(self) -> dict:
        return asdict(self)


def score(
    model: CharRNN, ids: np.ndarray, batch_size: int = EVAL_BATCH, seq_length: int = EVAL_SEQ
) -> tuple[float, int]:
    """Total NLL in nats and the number of characters scored: every id after the first of
    each evaluation stream is predicted once, with the state carried across windows."""
    total, count = 0.0, 0
    state = None
    for x, y, mask in eval_windows(ids, batch_size, seq_length):
        if state is None:
            state = model.zero_state(x.shape[1])
        logits, state, _ = model.forward(x, state)
        nll = token_nll(logits, y.reshape(-1))  # (T*B,)
        m = mask.reshape(-1)
        total += float(np.sum(nll[m], dtype=np.float64))
        count += int(m.sum())
    return total, count


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
