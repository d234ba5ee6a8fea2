"""`charrnn lab cold-start`: how badly a model continues a seed such as "ROMEO:" from a cold
start (the zero hidden state), against the same predictions made with context.

A model trained with stateful carry-over almost never sees the zero state (only at the
start of each epoch), so sampling from a short seed such as "ROMEO:" starts from a state
it was not trained on. This measures the cost, the way a user samples: the model reads a
speaker line and is scored on how it continues it.

Definition:

- positions: the starts of the lines that follow a blank line (paragraph starts: in
  tiny-shakespeare, the speaker-name lines such as "ROMEO:"). A blank line is an empty
  line ("\\n\\n", or "\\r\\n\\r\\n"); the position p is the first character of the next,
  non-empty, line.
- the seed of a position p: that first line without its line ending, text[p:e], where e
  is the index of the line's "\\n" (of the "\\r" of a "\\r\\n"). Its length e - p is at
  least 1.
- candidates: the starts with at least `context` characters before them (p >= context)
  and `predictions` characters after their seed (e + predictions <= len(text)). Of these,
  those whose seed is longer than `max_seed` characters are not used, and counted apart
  (`long_seeds`; a long first line is prose, not a speaker's name, and truncating it would
  score predictions made from the middle of a line); of the rest, those whose window
  text[p - context .. e + predictions - 1] holds a character outside the model's
  vocabulary are skipped (and counted, `skipped`). Of the remaining, `lines` are taken,
  evenly spread over them in text order (the first and the last always, equally spaced in
  between), or all of them when there are no more than `lines`.
- for each position the same `predictions` characters after the seed,
  text[e .. e + predictions - 1] (the newline first, then the speech), are predicted with
  teacher forcing, twice:
    cold: from the model's zero state, the model reads the seed text[p .. e-1], then the
          inputs text[e], text[e+1], ... (the first prediction is text[e] given the seed
          alone);
    warm: from the zero state the model first reads the `context` characters
          text[p-context .. p-1], then the same seed and inputs.
  Only the predictions after the seed are scored, in both. With context 0 cold and warm
  are the same computation.
- reported, in nats per character: the mean NLL of cold and of warm over all positions and
  predictions, the gap cold - warm, the per-offset means (offset k: the prediction of
  text[e+k-1], k = 1 .. predictions; offset 1 is the seed's newline) of both, the largest
  per-position cold loss (the mean over its predictions), and the recovery offset: the
  first offset k from which the cold per-offset mean stays within RECOVERY_NATS (0.1) of
  the warm one at every offset k .. predictions (None when it is not within at the last
  offset).

Seeds differ in length, so the positions are grouped by seed length, and each group runs
as the streams of one batch: one forward pass of (context + length + predictions - 1,
streams) for warm and one of (length + predictions - 1, streams) for cold, both from
`CharRNN.zero_state`, with no padding (a pad character read before the seed would move
the cold state off zero). Nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import load_checkpoint, resolve_checkpoint
from ..data import read_chunks
from ..errors import ConfigError, DataError
from ..model import CharRNN, token_nll
from ..vocab import Vocab, code_points

DEFAULT_LINES = 64
DEFAULT_PREDICTIONS = 20
DEFAULT_CONTEXT = 200
DEFAULT_MAX_SEED = 40
RECOVERY_NATS = 0.1
NL, CR = ord("\n"), ord("\r")


# -- the positions -----------------------------------------------------------------------


def paragraph_starts(text: str) -> np.ndarray:
    """Indices of the first character of every non-empty line that follows an empty line,
    ascending. Lines end at "\\n"; a line is empty when it holds nothing but a final "\\r"
    ("\\r\\n" endings). The first line follows nothing, so it is never a start."""
    c = code_points(text).astype(np.int64)  # (N,)
    n = len(c)
    if n == 0:
        return np.empty(0, np.int64)
    nl = c == NL  # (N,)
    line_starts = np.concatenate(([0], np.flatnonzero(nl[:-1]) + 1))  # (L,) lines with a char
    # a line starting at s is empty when c[s] is its newline, or c[s] c[s+1] = "\\r\\n"
    s = line_starts
    after_cr = np.minimum(s + 1, n - 1)
    crlf = (c[s] == CR) & (s + 1 < n) & nl[after_cr]
    empty = nl[s] | crlf  # (L,)
    # the last line may end without a newline: a lone "\\r" there is empty too
    empty |= (c[s] == CR) & (s + 1 == n)
    following = empty[:-1] & ~empty[1:]  # line i+1 is non-empty and line i empty
    return line_starts[1:][following]


def encode_keeping_places(text: str, vocab: Vocab) -> np.ndarray:
    """The ids of every character of `text`, -1 for those outside the vocabulary (so that
    indices into the ids are indices into the text)."""
    codes = code_points(text).astype(np.int64)  # (N,)
    known = np.array([ord(ch) for ch in vocab.chars], np.int64)  # (V,)
    size = int(max(codes.max(initial=0), known.max(initial=0))) + 1
    table = np.full(size, -1, np.int64)
    table[known] = np.arange(len(known))
    return table[codes]  # (N,)


def seed_ends(text: str, starts: np.ndarray) -> np.ndarray:
    """For each paragraph start p, the index e where its line ending begins: the line's
    "\\n", or the "\\r" of its "\\r\\n"; len(text) when the line runs to the end of the
    text without a newline. The seed is text[p:e]."""
    c = code_points(text).astype(np.int64)  # (N,)
    n = len(c)
    starts = np.asarray(starts, np.int64)
    newlines = np.append(np.flatnonzero(c == NL), n)  # (M+1,) the end of the text last
    ends = newlines[np.searchsorted(newlines, starts)]  # the first newline at or after p
    before = np.maximum(ends - 1, 0)
    crlf = (ends < n) & (ends - 1 > starts) & (c[before] == CR)
    return (ends - crlf).astype(np.int64)  # (S,)


@dataclass
class Positions:
    positions: np.ndarray  # (B,) the chosen starts, ascending
    ends: np.ndarray  # (B,) where each one's seed ends: the seed is text[p:e]
    candidates: int  # paragraph starts with room for the context, the seed, the predictions
    long_seeds: int  # candidates whose seed is longer than max_seed (not used)
    skipped: int  # other candidates whose window holds a character outside the vocabulary
    paragraph_starts: int  # every paragraph start of the text

    @property
    def usable(self) -> int:
        return self.candidates - self.long_seeds - self.skipped


def choose_positions(starts: np.ndarray, ends: np.ndarray, ids: np.ndarray, context: int,
                     predictions: int, lines: int, max_seed: int = DEFAULT_MAX_SEED
                     ) -> Positions:
    """The positions (see the module docstring) among the paragraph `starts` (seeds ending
    at `ends`, see `seed_ends`) of a text whose ids (-1: unknown) are `ids`."""
    n = len(ids)
    starts = np.asarray(starts, np.int64)
    ends = np.asarray(ends, np.int64)
    room = (starts >= context) & (ends + predictions <= n)
    fits, fit_ends = starts[room], ends[room]
    long = fit_ends - fits > max_seed
    short, short_ends = fits[~long], fit_ends[~long]
    unknown = np.concatenate(([0], np.cumsum(ids < 0)))  # (N+1,) unknown before index i
    bad = unknown[short_ends + predictions] - unknown[short - context] > 0
    usable, usable_ends = short[~bad], short_ends[~bad]
    if len(usable) > lines:
        pick = np.round(np.linspace(0, len(usable) - 1, lines)).astype(np.int64)
        usable, usable_ends = usable[pick], usable_ends[pick]
    return Positions(usable, usable_ends, len(fits), int(long.sum()), int(bad.sum()),
                     len(starts))


# -- the measurement ---------------------------------------------------------------------


def cold_warm_nll(model: CharRNN, ids: np.ndarray, positions: np.ndarray, ends: np.ndarray,
                  context: int, predictions: int) -> tuple[np.ndarray, np.ndarray]:
    """NLL (positions, predictions) of text[e .. e+predictions-1] for every position p whose
    seed is text[p:e]: cold from the zero state reading the seed first, warm reading the
    `context` characters before p and then the seed. The positions are grouped by seed
    length; each group is one forward pass with its positions as the streams, from the
    zero state, with nothing padded (so cold starts from the exact zero state at the
    seed's first character)."""
    positions = np.asarray(positions, np.int64)
    ends = np.asarray(ends, np.int64)
    B, P, C = len(positions), predictions, context
    if B == 0:
        raise ValueError("no positions")
    if ends.shape != positions.shape or (ends <= positions).any():
        raise ValueError("every seed text[p:e] needs e > p")
    if (positions < C).any() or (ends + P > len(ids)).any():
        raise ValueError("a window runs outside the text")
    lengths = ends - positions  # (B,)
    cold = np.empty((B, P), np.float64)
    warm = np.empty((B, P), np.float64)
    with model.frozen():
        for L in np.unique(lengths).tolist():  # the few distinct seed lengths
            group = np.flatnonzero(lengths == L)  # (b,)
            b = len(group)
            offsets = np.arange(-C, L + P)  # (C+L+P,) text[p-C .. e+P-1]
            window = ids[positions[group][None, :] + offsets[:, None]]  # (C+L+P, b)
            if (window < 0).any():
                raise ValueError("a window holds a character outside the vocabulary")
            window = window.astype(np.int64)
            targets = window[C + L :].reshape(-1)  # (P*b,) text[e .. e+P-1], time-major
            # cold: inputs text[p .. e+P-2]; the output after text[e-1] predicts text[e]
            logits, _, _ = model.forward(window[C:-1], model.zero_state(b))  # ((L+P-1)*b, V)
            cold[group] = token_nll(logits[(L - 1) * b :], targets).reshape(P, b).T
            # warm: inputs text[p-C .. e+P-2]
            logits, _, _ = model.forward(window[:-1], model.zero_state(b))  # ((C+L+P-1)*b, V)
            warm[group] = token_nll(logits[(C + L - 1) * b :], targets).reshape(P, b).T
    return cold, warm  # (B, P) each


def recovery_offset(cold: np.ndarray, warm: np.ndarray, within: float = RECOVERY_NATS
                    ) -> int | None:
    """The first offset k (1-based) from which |cold[j] - warm[j]| <= within for every
    j >= k; None when the last offset is not within."""
    close = np.abs(np.asarray(cold) - np.asarray(warm)) <= within  # (P,)
    if not close[-1]:
        return None
    far = np.flatnonzero(~close)
    return int(far[-1]) + 2 if len(far) else 1


@dataclass
class ColdStartReport:
    cold: np.ndarray  # (B, P) NLL of each prediction from the zero state
    warm: np.ndarray  # (B, P) the same with `context` characters read first
    positions: np.ndarray  # (B,) character indices in the text
    seeds: list[str]  # (B,) the seed at each position, text[p:e]
    context: int
    predictions: int
    max_seed: int
    found: Positions
    checkpoint: str = ""
    text: str = ""

    @property
    def cold_loss(self) -> float:
        return float(self.cold.mean())

    @property
    def warm_loss(self) -> float:
        return float(self.warm.mean())

    @property
    def per_offset(self) -> tuple[np.ndarray, np.ndarray]:
        return self.cold.mean(axis=0), self.warm.mean(axis=0)  # (P,) each

    @property
    def worst(self) -> int:
        """The index of the position with the largest cold loss."""
        return int(np.argmax(self.cold.mean(axis=1)))

    def to_json(self) -> dict[str, Any]:
        cold, warm = self.per_offset
        return {
            "cold_loss": self.cold_loss,
            "warm_loss": self.warm_loss,
            "gap": self.cold_loss - self.warm_loss,
            "positions": len(self.positions),
            "predictions": self.predictions,
            "context": self.context,
            "per_offset": {"cold": cold.tolist(), "warm": warm.tolist()},
            "max_cold": float(self.cold.mean(axis=1).max()),
            "recovery_offset": recovery_offset(cold, warm),
            "skipped": self.found.skipped,
            "max_seed": self.max_seed,
            "long_seeds": self.found.long_seeds,
        }

    def table(self) -> str:
        d = self.to_json()
        cold, warm = self.per_offset
        P = self.predictions
        f = self.found
        spread = "all of them" if len(self.positions) == f.usable else "evenly spread"
        lengths = [len(s) for s in self.seeds]
        lines = [
            f"{self.checkpoint}: {d['positions']} positions ({spread}) of {f.usable} "
            f"paragraph starts in {self.text} ({f.long_seeds} not used for a first line "
            f"longer than {self.max_seed} characters, {f.skipped} skipped for characters "
            "outside the vocabulary)",
            f"each reads its seed, the paragraph's first line ({min(lengths)}-{max(lengths)} "
            f"characters, e.g. {self.seeds[0]!r}), then predicts the {P} characters after "
            "it (the newline first); only these are scored",
            f"cold: from the zero state; warm: after the {self.context} characters before "
            "the seed",
            "",
            f"{'offset':>6}  {'cold':>7}  {'warm':>7}  {'gap':>7}   (nats/char, mean over "
            "positions; offset 1: the seed's newline)",
        ]
        shown = sorted({*range(1, min(5, P) + 1), *range(5, P + 1, 5), P})
        for k in shown:
            lines.append(f"{k:>6}  {cold[k - 1]:>7.3f}  {warm[k - 1]:>7.3f}  "
                         f"{cold[k - 1] - warm[k - 1]:>7.3f}")
        rec = d["recovery_offset"]
        w = self.worst
        lines += [
            "",
            f"cold loss   {d['cold_loss']:.4f} nats/char (zero state)",
            f"warm loss   {d['warm_loss']:.4f} nats/char ({self.context} chars of context)",
            f"gap         {d['gap']:.4f} nats/char",
            f"max cold    {d['max_cold']:.4f} nats/char at char {int(self.positions[w])}, "
            f"seed {self.seeds[w]!r}",
            "recovery    " + (f"offset {rec}: cold stays within {RECOVERY_NATS} nats of "
                              "warm from there on" if rec is not None else
                              f"never: cold is not within {RECOVERY_NATS} nats of warm at "
                              f"offset {P}"),
        ]
        return "\n".join(lines)


def read_text(path: str | os.PathLike) -> str:
    """The whole UTF-8 text of a file; DataError (one line) when it is missing or unreadable."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if not p.is_file():
        raise DataError(f"{path}: not a regular file")
    return "".join(read_chunks([p]))


def check_options(lines: int, predictions: int, context: int,
                  max_seed: int = DEFAULT_MAX_SEED) -> None:
    for name, value, least in (("--lines", lines, 1), ("--predictions", predictions, 1),
                               ("--context", context, 0), ("--max-seed", max_seed, 1)):
        if value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")


def measure(checkpoint: str | os.PathLike, text: str | os.PathLike,
            lines: int = DEFAULT_LINES, predictions: int = DEFAULT_PREDICTIONS,
            context: int = DEFAULT_CONTEXT, max_seed: int = DEFAULT_MAX_SEED
            ) -> ColdStartReport:
    """The cold-start measurement of a checkpoint (a file or a run directory's best) on a
    text file. Reads both, writes nothing."""
    check_options(lines, predictions, context, max_seed)
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    chars = read_text(text)
    if not chars:
        raise DataError(f"{text}: is empty")
    need = max(context, 2) + 1 + predictions  # p >= 2 (after a blank line), a seed of 1+
    if len(chars) < need:
        raise DataError(f"{text}: {len(chars)} characters, too short for a position with "
                        f"--context {context} and --predictions {predictions} (at least "
                        f"{need} are needed)")
    starts = paragraph_starts(chars)
    if len(starts) == 0:
        raise DataError(f"{text}: no line follows a blank line, so there are no positions")
    ids = encode_keeping_places(chars, ckpt.vocab)
    ends = seed_ends(chars, starts)
    found = choose_positions(starts, ends, ids, context, predictions, lines, max_seed)
    if found.candidates == 0:
        raise DataError(f"{text}: none of its {len(starts)} paragraph starts has --context "
                        f"{context} characters before it and --predictions {predictions} "
                        "after its first line")
    if found.long_seeds == found.candidates:
        raise DataError(f"{text}: all {found.candidates} paragraph starts have a first line "
                        f"longer than --max-seed {max_seed} characters")
    if len(found.positions) == 0:
        raise DataError(f"{text}: all {found.candidates - found.long_seeds} paragraph starts "
                        "with a short enough first line have a character outside the "
                        "vocabulary within their window")
    model = CharRNN(ckpt.shape, ckpt.params)
    cold, warm = cold_warm_nll(model, ids, found.positions, found.ends, context, predictions)
    seeds = [chars[p:e] for p, e in zip(found.positions.tolist(), found.ends.tolist())]
    return ColdStartReport(cold, warm, found.positions, seeds, context, predictions,
                           max_seed, found, str(ckpt.path), str(text))
