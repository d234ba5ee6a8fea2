"""Interpretable cells: which units track what, and how surprised the model is.

Karpathy, Johnson and Fei-Fei (2015) found single LSTM cells that turn on inside quotes,
count bracket depth or track the position in the line. This module finds such units on any
checkpoint automatically:

1. run the model statefully over the text from the zero state (the plain equations of
   `charrnn.inspect.equations`), keeping every unit's h, and tanh(c) for an lstm;
2. compute simple detectors from the text itself (`detectors`): inside quotes, inside a
   comment, bracket depth, indentation, position in the line, start of a word, after a
   newline, upper case;
3. rank all units by |Pearson correlation| between their activation after reading a
   character and the detector's value at that character (`correlations`, `rank_units`),
   leaving out the first line, the model's warm-up from the zero state (`warmup`).

It also scores every character: its surprisal -log p(char | prefix), from the prediction
made at the previous step, and that prediction's top 5. `charrnn.inspect.page` turns the
result into one self-contained HTML page.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CharRNNError, DataError
from .equations import PlainModel

TOP_PREDICTIONS = 5
STRING_PREFIXES = frozenset({"r", "b", "u", "f", "rb", "br", "fr", "rf"})

# name -> what it measures, in the order the page and the terminal list them
DETECTORS: dict[str, str] = {
    "quote": "inside a quoted string: '...' or \"...\" or a triple-quoted one (an apostrophe "
             "inside a word opens none; a single quote must close on its line)",
    "comment": "inside a # comment, to the end of the line (outside strings)",
    "depth": "bracket depth: the number of open (, [ and { (outside strings and comments)",
    "indent": "the indentation of the current line (its leading spaces and tabs)",
    "line_pos": "the position in the line: characters since the last newline",
    "word_start": "the first character of a word (a letter, digit or _ after anything else)",
    "after_newline": "the first character after a newline",
    "upper": "an upper-case letter",
}


# ---------------------------------------------------------------------------------------
# Detectors: one value per character, computed from the text alone
# ---------------------------------------------------------------------------------------


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _opens_single_quote(text: str, i: int) -> bool:
    """A ' at i opens a string when it does not sit inside a word (don't, o'er), or when the
    word before it is a Python string prefix (f'...', rb'...')."""
    if i == 0 or not _is_word(text[i - 1]):
        return True
    j = i
    while j > 0 and _is_word(text[j - 1]):
        j -= 1
    return text[j:i].lower() in STRING_PREFIXES


def _close_single_line(text: str, i: int, quote: str) -> int | None:
    """For a string opened by `quote` at i: the index just past its closing quote on the
    same line (backslash escapes skipped), or None when the line ends first. A closing ' must
    not be followed by a letter (so "'twas o'er" does not close at o'er)."""
    j, n = i + 1, len(text)
    while j < n and text[j] != "\n":
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == quote and (quote == '"' or j + 1 >= n or not _is_word(text[j + 1])):
            return j + 1
        j += 1
    return None


def _close_double(text: str, i: int) -> int:
    """A "..." string from i: closed by the next unescaped ", or else ended by a blank line
    (prose quotes may wrap lines; a stray " does not run to the end of the text)."""
    j, n = i + 1, len(text)
    while j < n:
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == '"':
            return j + 1
        if ch == "\n" and text.startswith("\n", j + 1):
            return j
        j += 1
    return n


def strings_and_comments(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(in_quote, in_comment), each (T,) bool: a scan over the text, left to right.

    A quoted string covers its quotes too. Triple quotes (''' and \"\"\") may span lines;
    "..." may wrap lines but ends at a blank line; '...' must close on its line, else the '
    is an apostrophe. # starts a comment, outside strings, up to (not including) the
    newline."""
    T = len(text)
    in_quote = np.zeros(T, bool)  # (T,)
    in_comment = np.zeros(T, bool)  # (T,)
    i = 0
    while i < T:
        ch = text[i]
        if ch == "#":
            end = text.find("\n", i)
            end = T if end < 0 else end
            in_comment[i:end] = True
            i = end
        elif text.startswith('"""', i) or text.startswith("'''", i):
            close = text.find(text[i : i + 3], i + 3)
            end = T if close < 0 else close + 3
            in_quote[i:end] = True
            i = end
        elif ch == '"':
            end = _close_double(text, i)
            in_quote[i:end] = True
            i = end
        elif ch == "'" and _opens_single_quote(text, i):
            end = _close_single_line(text, i, "'")
            if end is None:  # an apostrophe ('tis, the boys')
                i += 1
            else:
                in_quote[i:end] = True
                i = end
        else:
            i += 1
    return in_quote, in_comment


def bracket_depth(text: str, outside: np.ndarray | None = None) -> np.ndarray:
    """(T,) the number of brackets open at each character, never below 0 (a stray closing
    bracket closes nothing); an opening bracket counts itself, a closing one too (both sit
    inside). Only brackets where `outside` is True count (default: all)."""
    chars = np.array(list(text)) if text else np.empty(0, "<U1")  # (T,)
    opens = np.isin(chars, list("([{"))  # (T,)
    closes = np.isin(chars, list(")]}"))  # (T,)
    if outside is not None:
        opens &= outside
        closes &= outside
    d = np.cumsum(opens.astype(np.int64) - closes)  # (T,) depth after each char, unclipped
    floor = np.minimum.accumulate(np.minimum(d, 0)) if len(d) else d  # (T,) clipping at 0
    after = d - floor  # (T,) depth after each char, clipped at 0
    before = np.concatenate([[0], after[:-1]])  # (T,) depth before each char
    return np.maximum(before, after).astype(np.float64)


def line_features(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position in the line, indentation of the line, after a newline), each (T,).

    The newline that ends a line belongs to that line."""
    T = len(text)
    pos = np.empty(T, np.float64)  # (T,)
    indent = np.empty(T, np.float64)  # (T,)
    start = 0
    for line in text.split("\n"):
        n = min(len(line) + 1, T - start)  # the line and its newline
        pos[start : start + n] = np.arange(n)
        indent[start : start + n] = len(line) - len(line.lstrip(" \t"))
        start += n
    after_nl = np.zeros(T, np.float64)  # (T,)
    after_nl[1:] = [c == "\n" for c in text[:-1]]
    return pos, indent, after_nl


def detectors(text: str) -> dict[str, np.ndarray]:
    """Every detector of DETECTORS for `text`, each (T,) float64, in DETECTORS' order."""
    in_quote, in_comment = strings_and_comments(text)
    pos, indent, after_nl = line_features(text)
    word = np.array([_is_word(c) for c in text], bool)  # (T,)
    word_start = word.copy()
    word_start[1:] &= ~word[:-1]
    values = {
        "quote": in_quote,
        "comment": in_comment,
        "depth": bracket_depth(text, outside=~(in_quote | in_comment)),
        "indent": indent,
        "line_pos": pos,
        "word_start": word_start,
        "after_newline": after_nl,
        "upper": np.array([c.isupper() for c in text], bool),
    }
    return {name: np.asarray(values[name], np.float64) for name in DETECTORS}


# ---------------------------------------------------------------------------------------
# Ranking units by their correlation with the detectors
# ---------------------------------------------------------------------------------------


def warmup(text: str) -> int:
    """How many leading characters the correlations leave out: the first line, newline
    included, when it ends within the first quarter of the text. The model starts there from
    the zero state, and a text cut from a larger one often starts mid-line."""
    end = text.find("\n")
    return end + 1 if 0 <= end < len(text) // 4 else 0


def correlations(acts: np.ndarray, values: dict[str, np.ndarray]) -> np.ndarray:
    """Pearson r between every unit and every detector: acts (T, U), values name -> (T,);
    returns (D, U). A constant unit or detector has r = 0 (nothing to track)."""
    A = acts.astype(np.float64) - acts.mean(axis=0, dtype=np.float64)  # (T, U)
    X = np.stack(list(values.values()), axis=1)  # (T, D)
    X = X - X.mean(axis=0)  # (T, D)
    na = np.sqrt(np.einsum("tu,tu->u", A, A))  # (U,)
    nx = np.sqrt(np.einsum("td,td->d", X, X))  # (D,)
    denom = nx[:, None] * na[None, :]  # (D, U)
    cov = X.T @ A  # (D, U)
    return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)


@dataclass(frozen=True)
class UnitRef:
    """One unit: its layer, its state kind ("h", or "cell" = tanh(c) for an lstm), index."""

    layer: int
    kind: str
    unit: int

    def __str__(self) -> str:
        return f"L{self.layer} {self.kind} {self.unit}"


@dataclass(frozen=True)
class Block:
    """A (layer, kind) block of H units in the flattened unit axis."""

    layer: int
    kind: str
    size: int


def unit_refs(blocks: list[Block]) -> list[UnitRef]:
    """The flattened unit axis, block after block."""
    return [UnitRef(b.layer, b.kind, j) for b in blocks for j in range(b.size)]


def rank_units(corr: np.ndarray, names: list[str], top: int) -> dict[str, list[tuple[int, float]]]:
    """For each detector (a row of corr (D, U)): its `top` units by |r|, as (flat unit, r),
    best first. A detector whose row is all 0 (it never varies in the text) gets []."""
    order = np.argsort(-np.abs(corr), axis=1, kind="stable")[:, :top]  # (D, top)
    ranked = {}
    for d, name in enumerate(names):
        if not np.any(corr[d]):
            ranked[name] = []
            continue
        ranked[name] = [(int(u), float(corr[d, u])) for u in order[d]]
    return ranked


# ---------------------------------------------------------------------------------------
# Running the model: every unit's activation, and every character's surprisal
# ---------------------------------------------------------------------------------------


def collect(params: dict[str, np.ndarray], cell: str, ids: np.ndarray,
            layers: list[int] | None = None,
            chunk: int = 2048) -> tuple[list[Block], np.ndarray, np.ndarray]:
    """A stateful pass over ids (T,) from the zero state: (blocks, acts (T, U) float32 with
    the units of `blocks` side by side, logits (T, V)). Every layer's h, and for an lstm
    its tanh(c) ("cell"); only `layers` (default all)."""
    model = PlainModel.from_params(params, cell)
    L, H = len(model.layers), model.hidden_size
    layers = list(range(L)) if layers is None else layers
    kinds = ("h", "cell") if cell == "lstm" else ("h",)
    blocks = [Block(k, kind, H) for k in layers for kind in kinds]
    acts = np.empty((len(ids), len(blocks) * H), np.float32)  # (T, U)
    logits = np.empty((len(ids), model.head_W.shape[0]), np.float64)  # (T, V)
    s = 0
    for chunk_logits, caches in model.run(np.asarray(ids), chunk=chunk):
        n = len(chunk_logits)
        logits[s : s + n] = chunk_logits
        for b, block in enumerate(blocks):
            acts[s : s + n, b * H : (b + 1) * H] = np.concatenate(
                [c[block.kind] for c in caches[block.layer]])  # (n, H)
        s += n
    return blocks, acts, logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # (T, V)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def surprisal(logits: np.ndarray, ids: np.ndarray,
              k: int = TOP_PREDICTIONS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each character's surprisal -log p(char | prefix) in nats, from the prediction made
    at the previous step: (T,), NaN for the first character (no prediction). With it, that
    prediction's top k: ids (T, k) (-1 in row 0) and probabilities (T, k), best first."""
    T, V = logits.shape
    k = min(k, V)
    logp = log_softmax(logits[:-1])  # (T-1, V) the prediction for characters 1..T-1
    s = np.full(T, np.nan)  # (T,)
    s[1:] = -logp[np.arange(T - 1), ids[1:]]
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k]  # (T-1, k) unordered
    order = np.argsort(-np.take_along_axis(logp, part, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)  # (T-1, k)
    top_ids = np.full((T, k), -1, np.int64)  # (T, k)
    top_p = np.zeros((T, k))  # (T, k)
    top_ids[1:] = best
    top_p[1:] = np.exp(np.take_along_axis(logp, best, axis=1))
    return s, top_ids, top_p


# ---------------------------------------------------------------------------------------
# `charrnn inspect cells`
# ---------------------------------------------------------------------------------------


@dataclass
class CellsReport:
    """Everything the page shows."""

    cell: str
    num_layers: int
    hidden_size: int
    text: str  # the characters shown, T of them
    ids: np.ndarray  # (T,)
    vocab_chars: list[str]
    blocks: list[Block]
    acts: np.ndarray  # (T, U)
    surprisal: np.ndarray  # (T,) nats, NaN at 0
    top_ids: np.ndarray  # (T, k)
    top_p: np.ndarray  # (T, k)
    detector_values: dict[str, np.ndarray]  # name -> (T,)
    corr: np.ndarray  # (D, U)
    ranked: dict[str, list[tuple[int, float]]]
    warmup: int = 0  # leading characters the correlations leave out
    source: str = ""  # the checkpoint, for the page's header
    text_path: str = ""
    unknown: int = 0
    html_path: str = ""
    html_bytes: int = 0
    units: list[UnitRef] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.units:
            self.units = unit_refs(self.blocks)

    @property
    def mean_surprisal(self) -> float:
        return float(np.nanmean(self.surprisal)) if len(self.surprisal) > 1 else math.nan

    @property
    def support(self) -> dict[str, float]:
        """Per detector: the share of characters where it is nonzero (a detector that holds
        for a handful of characters gives correlations to read with care)."""
        return {name: float(np.mean(v[self.warmup :] != 0))
                for name, v in self.detector_values.items()}

    def summary(self) -> str:
        """What the terminal shows: the text, the top units per detector, the page."""
        kinds = "h and tanh(c)" if self.cell == "lstm" else "h"
        layers = sorted({b.layer for b in self.blocks})
        lines = [
            f"text        {self.text_path} ({len(self.ids):,} characters shown; "
            f"{self.unknown} outside the vocabulary skipped)",
            f"model       {self.cell} x{self.num_layers}, hidden {self.hidden_size}; "
            f"{len(self.units):,} units ranked ({kinds} of layer(s) "
            f"{', '.join(map(str, layers))})",
            f"surprisal   {self.mean_surprisal:.4f} nats/char "
            f"({self.mean_surprisal / math.log(2):.4f} bits/char) over "
            f"{len(self.ids) - 1:,} predictions",
            "top units per detector, by |Pearson r| (in brackets: the share of characters "
            "where the detector is nonzero):",
        ]
        support = self.support
        absent = []
        for name, ranked in self.ranked.items():
            if not ranked:
                absent.append(name)
                continue
            units = "  ".join(f"{self.units[u]!s:<12} {r:+.3f}" for u, r in ranked)
            lines.append(f"  {name:<14}({support[name]:>5.1%})  {units}")
        if absent:
            lines.append(f"  not in this text (constant): {', '.join(absent)}")
        if self.html_path:
            lines.append(f"wrote {self.html_path} ({self.html_bytes / 1e6:.1f} MB)")
        return "\n".join(lines)


def analyse(params: dict[str, np.ndarray], cell: str, ids: np.ndarray, vocab_chars: list[str],
            text: str, layers: list[int] | None = None, top: int = 5) -> CellsReport:
    """Activations, detectors, the ranking and the surprisal of ids (T,) = `text`."""
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} character(s) in the vocabulary; at least 2"
                        " are needed")
    L = sum(1 for k in params if k.startswith("rnn.weight_hh_l"))
    H = params["rnn.weight_hh_l0"].shape[1]
    if layers is not None:
        bad = [k for k in layers if not 0 <= k < L]
        if bad:
            raise CharRNNError(f"--layer {bad[0]}: the model has layers 0..{L - 1}")
        layers = sorted(set(layers))
    blocks, acts, logits = collect(params, cell, ids, layers)
    values = detectors(text)
    s0 = warmup(text)
    corr = correlations(acts[s0:], {k: v[s0:] for k, v in values.items()})  # (D, U)
    s, top_ids, top_p = surprisal(logits, np.asarray(ids))
    return CellsReport(cell, L, H, text, np.asarray(ids), list(vocab_chars), blocks, acts, s,
                       top_ids, top_p, values, corr, rank_units(corr, list(values), top),
                       warmup=s0)


def inspect_cells(checkpoint: str, text: str, html_path: str, max_chars: int = 5000,
                  layers: list[int] | tuple[int, ...] | None = None,
                  top: int = 5) -> CellsReport:
    """`charrnn inspect cells`: analyse the first `max_chars` known characters of a text
    file and write the page to `html_path` (atomically). Never writes to the checkpoint
    or its run directory."""
    from .inputs import open_inputs
    from .page import render_page, write_page

    ckpt, ids, n_unknown = open_inputs(checkpoint, text, html_path)
    ids = ids[:max_chars]  # (T,)
    report = analyse(ckpt.params, ckpt.config.model.cell, ids, ckpt.vocab.chars,
                     ckpt.vocab.decode(ids), None if layers is None else list(layers), top)
    report.source, report.text_path, report.unknown = str(ckpt.path), str(text), n_unknown
    page = render_page(report).encode("utf-8")
    write_page(Path(html_path), page)
    report.html_path, report.html_bytes = os.fspath(html_path), len(page)
    return report
