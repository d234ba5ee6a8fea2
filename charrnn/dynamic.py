"""Dynamic evaluation (Krause et al. 2018): the model keeps learning from the text it scores.

The text is one stream, cut into segments of `seq_length` characters, the hidden state
carried from segment to segment. For each segment, in order:

1. it is scored (summed NLL of its characters) with the weights as adapted on the segments
   *before* it;
2. only then is its gradient taken and the weights updated.

So no character is ever predicted by weights that have seen it, and a text of one segment
scores exactly as static evaluation does. The checkpoint's parameters are never touched:
the updates go to a copy.

The update rule is RMS-normalised SGD with decay back to the trained weights theta0:

    g      = clip(d mean-NLL(segment) / d theta, global norm 5)      (as in training)
    MS     <- beta * MS + (1 - beta) * g**2,  MS_hat = MS / (1 - beta**t)   (t: updates so far)
    theta  <- theta - lr * g / (sqrt(MS_hat) + eps) + decay * (theta0 - theta)

with beta = 0.99 and eps = 1e-8. g is the gradient of the segment's *mean* NLL; the RMS
normalisation makes the step's size independent of that choice (the sum would only move eps).

MS, the per-parameter mean of squared gradients, is an online bias-corrected EMA over the
segments seen so far, not (as in Krause et al.) statistics of the training data. Why not the
checkpoint's Adam second moment (`optim.v.*`, which train.py does store): only adam/adamw
runs have one (sgd, momentum, adagrad, rmsprop differ or have none); it is the moment of a
training batch's mean gradient (batch_size x seq_length characters, dropout on, weights
still moving) under the optimizer's own beta2, a different scale from one B=1 segment's
gradient, so the right lr would depend on the training config; and it is often not the
moment of the weights evaluated (train.ema). The online MS needs nothing but the weights,
works for every checkpoint, calibrates itself to the segment gradients' scale, and only
ever uses gradients of characters already scored. The first update is a sign step of size
lr per parameter, like Adam's.

Defaults (tuned on a 2x256 LSTM trained on tiny-shakespeare, on a 20k-character slice of
its training part, chars 500000-520000, never the validation tail): lr = 3e-4, decay =
1e-2, segments of 50 characters (Krause et al. used 20-50 for characters: shorter segments
mean more updates, but each update costs a backward pass and the per-step overhead of B=1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError
from .evaluate import EvalResult, summarize
from .model import CharRNN, Params, cross_entropy_, token_nll

DEFAULT_LR = 3e-4
DEFAULT_DECAY = 1e-2
DEFAULT_SEQ = 50
BETA = 0.99  # EMA of the squared gradients
EPS = 1e-8
CLIP = 5.0  # global norm of a segment's gradient, as train.grad_clip's default


@dataclass
class DynamicEvalResult(EvalResult):
    """`charrnn eval --dynamic`'s numbers: loss/bpc/perplexity/chars/unknown_chars of the
    dynamic pass, and the static scores of the same one-stream segment layout beside them."""

    dynamic: bool
    static_loss: float
    static_bpc: float
    static_perplexity: float
    gain_bpc: float  # static_bpc - bpc: what the adaptation alone gains
    seq_length: int
    dynamic_lr: float
    dynamic_decay: float


def check_rate(name: str, value: object, high: float | None = None) -> float:
    """A finite float >= 0 (and <= high): the learning rate or the decay."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ArgumentError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (high is not None and v > high):
        limit = f"in [0, {high:g}]" if high is not None else "a finite number >= 0"
        raise ArgumentError(f"{name} must be {limit}, got {value}")
    return v


class DynamicEvaluator:
    """Scores segments one after another, adapting a copy of the weights after each.

    `peek=True` is for the tests only: it updates on a segment *before* scoring it (the
    mistake this module exists to avoid), so a test can show its check would catch that."""

    def __init__(self, model: CharRNN, lr: float, decay: float, *, peek: bool = False):
        self.lr = check_rate("dynamic_lr", lr)
        self.decay = check_rate("dynamic_decay", decay, 1.0)
        self.peek = peek
        self.theta0: Params = model.params  # read only
        self.model = CharRNN(model.shape, {k: v.copy() for k, v in model.params.items()})
        self.ms: Params = {k: np.zeros_like(v) for k, v in self.theta0.items()}
        self.t = 0  # updates made
        self.state = self.model.zero_state(1)

    def segment(self, x: np.ndarray, y: np.ndarray) -> float:
        """x, y (T, 1) ids: the segment's summed NLL in nats (scored, then learned from)."""
        if self.peek:  # test only: learn first, then score from the same starting state
            state = self.state
            self._learn(x, y)
            self.state = state
            total, self.state = _score(self.model, x, y, self.state)
            return total
        model = self.model
        with model.frozen():
            logits, new_state, cache = model.forward(x, self.state)  # (T, V)
            total = _nll_sum(logits, y)
            if self.lr > 0 or self.decay > 0:
                _, dlogits = cross_entropy_(logits, y.reshape(-1))  # mean NLL's gradient
                grads, _ = model.backward(dlogits, cache)
        self.state = new_state
        if self.lr > 0 or self.decay > 0:
            self._update(grads)
        return total

    def _learn(self, x: np.ndarray, y: np.ndarray) -> None:
        model = self.model
        with model.frozen():
            logits, self.state, cache = model.forward(x, self.state)
            _, dlogits = cross_entropy_(logits, y.reshape(-1))
            grads, _ = model.backward(dlogits, cache)
        self._update(grads)

    def _update(self, grads: Params) -> None:
        """One RMS-normalised step, clipped, with decay toward theta0 (module docstring)."""
        norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
        scale = CLIP / norm if norm > CLIP else 1.0
        self.t += 1
        correction = 1.0 - BETA**self.t
        params = self.model.params
        for name, theta in params.items():
            g = grads[name] * scale if scale != 1.0 else grads[name]
            ms = self.ms[name]
            ms *= BETA
            ms += (1.0 - BETA) * g * g
            step = self.lr * g / (np.sqrt(ms / correction) + EPS)
            pull = self.decay * (self.theta0[name] - theta)
            theta -= step
            theta += pull


def _nll_sum(logits: np.ndarray, y: np.ndarray) -> float:
    """Summed NLL of (T, V) logits against y (T, 1), as charrnn.evaluate sums it."""
    nll = token_nll(logits, y.reshape(-1))  # (T,)
    return float(np.sum(nll, dtype=np.float64))


def _score(model: CharRNN, x: np.ndarray, y: np.ndarray, state: list) -> tuple[float, list]:
    with model.frozen():
        logits, new_state, _ = model.forward(x, state)  # (T, V)
        return _nll_sum(logits, y), new_state


def segments(ids: np.ndarray, seq_length: int):
    """(x, y) pairs, each (T, 1), T <= seq_length: the whole text as one stream, every id
    after the first predicted once."""
    for s in range(0, len(ids) - 1, seq_length):
        chunk = ids[s : s + seq_length + 1]
        yield chunk[:-1, None].astype(np.int64), chunk[1:, None].astype(np.int64)  # (T, 1)


def dynamic_score(
    model: CharRNN,
    ids: np.ndarray,
    seq_length: int = DEFAULT_SEQ,
    lr: float = DEFAULT_LR,
    decay: float = DEFAULT_DECAY,
    unknown_chars: int = 0,
    progress: Callable[[int, int], None] | None = None,
    *,
    peek: bool = False,
) -> DynamicEvalResult:
    """Dynamic evaluation of `ids` (N,) with `model`'s weights as theta0 (left unchanged),
    and the static score of the same segments, the state carried, beside it.

    `progress(done, total)` is called after each segment: the characters scored so far, of
    how many."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, int | np.integer) \
            or seq_length < 1:
        raise ArgumentError(f"seq_length must be a whole number >= 1, got {seq_length!r}")
    evaluator = DynamicEvaluator(model, lr, decay, peek=peek)
    static_state = model.zero_state(1)
    dynamic_total = static_total = 0.0
    chars, total = 0, max(len(ids) - 1, 0)
    for x, y in segments(ids, int(seq_length)):
        static_nll, static_state = _score(model, x, y, static_state)
        static_total += static_nll
        dynamic_total += evaluator.segment(x, y)
        chars += len(y)
        if progress is not None:
            progress(chars, total)
    r = summarize(dynamic_total, chars, unknown_chars)
    s = summarize(static_total, chars, unknown_chars)
    return DynamicEvalResult(
        loss=r.loss, bpc=r.bpc, perplexity=r.perplexity, chars=chars,
        unknown_chars=unknown_chars, dynamic=True, static_loss=s.loss, static_bpc=s.bpc,
        static_perplexity=s.perplexity, gain_bpc=s.bpc - r.bpc, seq_length=int(seq_length),
        dynamic_lr=evaluator.lr, dynamic_decay=evaluator.decay,
    )
