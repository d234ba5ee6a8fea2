"""Character n-gram baselines with interpolated modified Kneser-Ney smoothing.

The yardstick a recurrent model must beat (Karpathy et al. 2015 compare an LSTM with n-gram
models on the same text). `ngram_baseline` fits models of orders 1..N on the training split
of a corpus and scores them on the same contiguous validation tail that `charrnn train`
scores, for the same `data.val_fraction` and `data.test_fraction`: the corpus is read with
`charrnn.data.load_corpus`, so the files, the vocabulary (built over the whole corpus) and
the split are exactly training's.

Orders. The order-n model predicts a character from the n - 1 characters before it: order
1 is the unigram model, order 2 looks one character back, and so on.

Smoothing: interpolated modified Kneser-Ney (Chen & Goodman 1998). For a
context h of n - 1 characters, its suffix h' (h without its first character) and a
character w,

    p_n(w | h) = (c(hw) - D(c(hw))) / c(h.)  +  gamma(h) * q_{n-1}(w | h')
    gamma(h)   = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / c(h.)

where c(hw) is the training count of the n-gram hw, c(h.) = sum_w c(hw), D(0) = 0, D(1) =
D1, D(2) = D2, D(c >= 3) = D3+, and N1(h.), N2(h.), N3+(h.) are the numbers of characters
w with c(hw) = 1, = 2, >= 3. A context never seen before a character (c(h.) = 0) backs off
entirely: p_n(w | h) = q_{n-1}(w | h'). The lower orders q_m are the same formula with the
count c replaced by the continuation count N1+(.gw), the number of distinct characters
seen before the m-gram gw, so a lower order says how likely w is in a new context rather
than how frequent it is. The recursion ends with the uniform distribution over the
vocabulary, q_0(w) = 1 / V, so every character of the vocabulary has p > 0. The order-n
model uses raw counts at its own order and continuation counts below it.

The discounts of each order and count type come from its count-of-counts n_k (the number of
distinct n-grams with count k):

    Y = n1 / (n1 + 2 n2),  D1 = 1 - 2Y n2/n1,  D2 = 2 - 3Y n3/n2,  D3+ = 3 - 4Y n4/n3.

Where one of n1..n4 is 0 (tiny or degenerate tables, e.g. unigram counts of a large
corpus) this falls back to one discount D = Y (plain interpolated Kneser-Ney), or 0.5 when Y
is undefined too; each D_k is kept within [0.01, k].

Encoding and counting. An m-gram is the integer key rank(its (m-1)-gram prefix) * V + (its
last character), where rank is the index in the sorted table of distinct (m-1)-grams.
The keys are collision-free, sort in the lexicographic order of the m-grams, and stay below
(number of distinct (m-1)-grams) * V < 2^63 for any vocabulary and any order, where base-V
keys of 8 characters would overflow int64 once V > 234. Counting one order is three
vectorised passes over the training ids, in chunks of `chunk` positions: np.unique with
counts per chunk, merged (the m-gram table); np.searchsorted of each position's key into
the table (each position's m-gram rank, kept in one int32 array and updated in place for
the next order); np.unique of (rank of the m-gram at i + 1, character at i), the distinct
(m+1)-grams, whose per-m-gram totals are the continuation counts. No loop runs over
characters in Python.

Scoring is vectorised the same way over all validation positions, order by order: each
position's context rank and n-gram rank are looked up with np.searchsorted, and the
interpolation recursion runs as arrays. The first characters of the validation tail take
their context from the training characters before it (the text is one stream), so every
validation character is scored with a full context of n - 1 characters.

Memory. The corpus is never a Python string: load_corpus streams the files into one id
array (1-2 bytes a character, memory-mapped from its cache after the first run). The model
keeps about 40 bytes per distinct n-gram, summed over the orders (key, count and
continuation count, 8 bytes each, and the context statistics c(h.) and gamma(h)). Fitting
adds 4 bytes per training character (the rank array), about 32 bytes per position of a
chunk (default 2^24 positions, about 0.5 GB) and, while one order's chunk tables are
merged, 16 bytes per distinct n-gram of that order. Tiny-shakespeare to order 8 has 1.5 M
distinct n-grams: a 53 MB model, 130 MB peak for the whole process. A 200 MB corpus takes
0.8 GB for the ranks plus 40 bytes for each of its distinct n-grams (for English text on
the order of 10^8 over orders 1..8, so several GB: lower --order where memory is short).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from charrnn.data import DataSource, _cache_key, load_corpus
from charrnn.errors import ConfigError, DataError

SMOOTHING = "interpolated modified Kneser-Ney (Chen & Goodman 1998)"
DEFAULT_ORDER = 8
CHUNK = 1 << 24  # positions per counting chunk
SCORE_CHUNK = 1 << 20  # validation positions scored at once
_MIN_DISCOUNT = 0.01


# -- discounts -----------------------------------------------------------------------


def kn_discounts(counts: np.ndarray) -> np.ndarray:
    """[0, D1, D2, D3+]: the modified Kneser-Ney discounts of a table of counts.

    Indexed by min(count, 3), so D(c) = table[min(c, 3)] with D(0) = 0.
    """
    counts = np.asarray(counts)
    n = [int(np.count_nonzero(counts == k)) for k in (1, 2, 3, 4)]  # n1..n4
    if min(n) > 0:
        y = n[0] / (n[0] + 2 * n[1])
        d = [k - (k + 1) * y * n[k] / n[k - 1] for k in (1, 2, 3)]
    else:
        y = n[0] / (n[0] + 2 * n[1]) if n[0] > 0 and n[1] > 0 else 0.5
        d = [y, y, y]
    d = [min(max(dk, _MIN_DISCOUNT), k) for k, dk in zip((1, 2, 3), d)]
    return np.array([0.0, *d])  # (4,)


# -- one order of the model ----------------------------------------------------------


@dataclass
class _Counts:
    """One count type (raw or continuation) of one order, with its context statistics."""

    counts: np.ndarray  # (K_m,) int64, per m-gram
    discount: np.ndarray  # (4,) [0, D1, D2, D3+]
    denom: np.ndarray  # (K_{m-1},) float64 c(h.) per context (the (m-1)-gram's rank)
    gamma_num: np.ndarray  # (K_{m-1},) float64 D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)

    @classmethod
    def build(cls, counts: np.ndarray, context: np.ndarray, n_contexts: int) -> _Counts:
        discount = kn_discounts(counts)  # (4,)
        d = discount[np.minimum(counts, 3)]  # (K_m,) D(c) per m-gram
        denom = np.bincount(context, weights=counts, minlength=n_contexts)  # (K_{m-1},)
        gamma_num = np.bincount(context, weights=d, minlength=n_contexts)  # (K_{m-1},)
        return cls(counts, discount, denom, gamma_num)

    def prob(self, ctx: np.ndarray, gram: np.ndarray, lower: np.ndarray) -> np.ndarray:
        """p(w | h) = (c(hw) - D(c)) / c(h.) + gamma(h) lower(w | h'), or lower where c(h.) = 0.

        `ctx`: rank of each context h (-1: never seen); `gram`: rank of each hw (-1: never
        seen); `lower`: the next lower order's probabilities. All three of one shape.
        """
        if self.counts.size == 0:  # nothing of this order in training
            return lower
        h = np.maximum(ctx, 0)  # (...,)
        denom = np.where(ctx >= 0, self.denom[h], 0.0)  # (...,)
        c = np.where(gram >= 0, self.counts[np.maximum(gram, 0)], 0)  # (...,)
        kept = c - self.discount[np.minimum(c, 3)]  # (...,) c(hw) - D(c(hw))
        interpolated = (kept + self.gamma_num[h] * lower) / np.maximum(denom, 1.0)  # (...,)
        return np.where(denom > 0, interpolated, lower)  # (...,)


@dataclass
class _Order:
    """The distinct m-grams of one order m seen in training."""

    keys: np.ndarray  # (K_m,) int64 sorted: rank of the (m-1)-gram prefix * V + last char
    raw: _Counts
    cont: _Counts | None  # None at the model's highest order, which needs raw counts only

    def lookup(self, query: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Rank of each m-gram whose key is `query` (-1 if unseen or if `prefix` < 0)."""
        if self.keys.size == 0:
            return np.full(query.shape, -1, dtype=np.int64)
        idx = np.minimum(np.searchsorted(self.keys, query), self.keys.size - 1)  # (...,)
        return np.where((self.keys[idx] == query) & (prefix >= 0), idx, -1)  # (...,)


# -- counting ------------------------------------------------------------------------


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and summed counts of several (distinct keys, counts) tables."""
    if len(parts) == 1:
        return parts[0]
    keys = np.unique(np.concatenate([k for k, _ in parts]))  # (K,)
    counts = np.zeros(keys.size, dtype=np.int64)  # (K,)
    for k, c in parts:
        counts[np.searchsorted(keys, k)] += c  # keys are distinct within a part
    return keys, counts


def _count(
    n: int, keys_of: Callable[[int, int], np.ndarray], chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and counts of keys_of(0, n), computed chunk by chunk."""
    parts = []
    for lo in range(0, n, chunk):
        keys, counts = np.unique(keys_of(lo, min(lo + chunk, n)), return_counts=True)
        parts.append((keys, counts.astype(np.int64)))
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return _merge(parts)


# -- the model -----------------------------------------------------------------------


@dataclass
class NGramModel:
    """Interpolated modified Kneser-Ney character models of orders 1..`order`."""

    vocab_size: int
    order: int
    orders: list[_Order] = field(default_factory=list)  # orders[m - 1] is order m

    @classmethod
    def fit(
        cls,
        train: np.ndarray,
        vocab_size: int,
        order: int = DEFAULT_ORDER,
        chunk: int = CHUNK,
        on_order: Callable[[int], None] | None = None,
    ) -> NGramModel:
        """Counts the n-grams of `train` (ids < vocab_size) for every order up to `order`.

        `on_order(m)` is called after each order is counted (a progress bar hook).
        """
        if order < 1:
            raise ConfigError(f"the n-gram order must be at least 1, not {order}")
        v = int(vocab_size)
        n = len(train)
        model = cls(vocab_size=v, order=order)
        # rank[i]: rank of the (m-1)-gram starting at i (0 = the empty prefix for m = 1)
        rank = np.zeros(n, dtype=np.int32 if n < 2**31 else np.int64)  # (N_train,)
        n_contexts = 1
        for m in range(1, order + 1):
            count = max(n - m + 1, 0)  # m-grams in the training split

            def gram_keys(lo: int, hi: int, m: int = m) -> np.ndarray:
                return rank[lo:hi].astype(np.int64) * v + train[lo + m - 1 : hi + m - 1]  # (c,)

            keys, raw = _count(count, gram_keys, chunk)  # (K_m,), (K_m,)
            for lo in range(0, count, chunk):  # rank[i] becomes the m-gram's rank
                hi = min(lo + chunk, count)
                rank[lo:hi] = np.searchsorted(keys, gram_keys(lo, hi))
            context = keys // v  # (K_m,) rank of each m-gram's (m-1)-gram prefix
            cont = None
            if m < order:

                def extended(lo: int, hi: int) -> np.ndarray:
                    return rank[lo + 1 : hi + 1].astype(np.int64) * v + train[lo:hi]  # (c,)

                pairs, _ = _count(max(count - 1, 0), extended, chunk)  # distinct (m+1)-grams
                n_before = np.bincount(pairs // v, minlength=keys.size)  # (K_m,) N1+(. g)
                cont = _Counts.build(n_before.astype(np.int64), context, n_contexts)
            model.orders.append(_Order(keys, _Counts.build(raw, context, n_contexts), cont))
            n_contexts = keys.size
            if on_order is not None:
                on_order(m)
        return model

    def log_probs(self, window: np.ndarray, first: int) -> np.ndarray:
        """ln p_n(window[..., t] | the chars before it) for t >= first, per order n.

        `window` (..., L) holds ids; each position is predicted from up to n - 1 characters
        before it inside the window. Returns (order, ..., L - first).
        """
        window = np.asarray(window, dtype=np.int64)
        length = window.shape[-1]
        t = np.arange(first, length)  # (T,) scored positions
        lower = np.full(window.shape[:-1] + t.shape, 1.0 / self.vocab_size)  # q_0, (..., T)
        out = np.empty((self.order,) + lower.shape)  # (order, ..., T)
        if t.size == 0:
            return out
        prev = np.zeros(window.shape, dtype=np.int64)  # R_0 = 0, the empty prefix, (..., L)
        for m, level in enumerate(self.orders, start=1):
            # R_m[..., s]: rank of the m-gram window[..., s : s+m]; -1 if unseen or s > L-m
            cur = np.full(window.shape, -1, dtype=np.int64)  # (..., L)
            head = prev[..., : max(length - m + 1, 0)]  # (..., L-m+1)
            cur[..., : head.shape[-1]] = level.lookup(
                head * self.vocab_size + window[..., m - 1 :], head)
            s = t - m + 1  # (T,) where the n-gram ending at t starts
            inside = s >= 0  # (T,) False: fewer than m - 1 chars before t in the window
            sc = np.maximum(s, 0)  # (T,)
            ctx = np.where(inside, prev[..., sc], -1)  # (..., T) rank of the context
            gram = np.where(inside, cur[..., sc], -1)  # (..., T) rank of the n-gram
            out[m - 1] = np.log(level.raw.prob(ctx, gram, lower))
            if level.cont is not None:
                lower = level.cont.prob(ctx, gram, lower)  # q_m, (..., T)
            prev = cur
        return out

    def distribution(self, context: Sequence[int], order: int | None = None) -> np.ndarray:
        """p_order(w | context) for every w of the vocabulary, (V,); order defaults to the
        model's; only the last order - 1 characters of `context` are used."""
        order = self.order if order is None else order
        if not 1 <= order <= self.order:
            raise ConfigError(f"order {order} is outside this model's 1..{self.order}")
        v = self.vocab_size
        ctx = np.asarray(context, dtype=np.int64)[max(len(context) - order + 1, 0) :]
        if order == 1:
            ctx = ctx[:0]
        window = np.empty((v, ctx.size + 1), dtype=np.int64)  # (V, k+1)
        window[:, :-1] = ctx
        window[:, -1] = np.arange(v)
        return np.exp(self.log_probs(window, first=ctx.size)[order - 1, :, 0])  # (V,)

    def grams(self, m: int) -> np.ndarray:
        """The distinct m-grams seen in training as rows of ids, (K_m, m), in key order."""
        rows = np.empty((1, 0), dtype=np.int64)  # the empty 0-gram
        for level in self.orders[:m]:
            rows = np.concatenate(
                [rows[level.keys // self.vocab_size], (level.keys % self.vocab_size)[:, None]],
                axis=1,
            )
        return rows


# -- scoring a corpus ----------------------------------------------------------------


@dataclass
class OrderResult:
    order: int
    val_loss: float  # nats/char
    val_bpc: float  # bits/char


@dataclass
class NGramReport:
    orders: list[OrderResult]
    train_chars: int
    val_chars: int
    vocab_size: int
    smoothing: str = SMOOTHING
    context: str = "the val tail's first chars take their context from the training chars before it"

    @property
    def best(self) -> OrderResult:
        return min(self.orders, key=lambda r: r.val_loss)

    def to_dict(self) -> dict:
        return {
            "orders": [asdict(r) for r in self.orders],
            "best": asdict(self.best),
            "train_chars": self.train_chars,
            "val_chars": self.val_chars,
            "vocab_size": self.vocab_size,
            "smoothing": self.smoothing,
            "context": self.context,
        }


def _before(train: np.ndarray, val: np.ndarray, lo: int, k: int) -> np.ndarray:
    """The (up to) k characters of the text just before val[lo]; val continues train."""
    from_val = np.asarray(val[max(lo - k, 0) : lo])  # (<=k,)
    need = k - from_val.size
    from_train = np.asarray(train[max(len(train) - need, 0) :] if need > 0 else train[:0])
    return np.concatenate([from_train, from_val])  # (<=k,)


def score(model: NGramModel, train: np.ndarray, val: np.ndarray,
          chunk: int = SCORE_CHUNK) -> list[OrderResult]:
    """Mean -ln p_n of every char of `val` for each order n, in chunks of `chunk` chars;
    `val` continues `train` in the text, so its first chars see training context."""
    k = model.order - 1  # context characters a scored position needs
    total = np.zeros(model.order)  # (order,)
    for lo in range(0, len(val), chunk):
        before = _before(train, val, lo, k)  # (<=k,)
        window = np.concatenate([before, np.asarray(val[lo : lo + chunk])])  # (k'+c,)
        total -= model.log_probs(window, first=before.size).sum(axis=1)
    loss = total / len(val)  # (order,)
    return [OrderResult(m, float(x), float(x / math.log(2))) for m, x in enumerate(loss, 1)]


def ngram_baseline(
    path: str,
    order: int = DEFAULT_ORDER,
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    include: str = "*",
    encoding: str = "utf-8",
    errors: str = "strict",
    progress: bool | None = None,
    store: bool = True,
) -> NGramReport:
    """Fits orders 1..`order` on the training split of the corpus `path` (a file, a
    directory or a glob, "{stdlib}" allowed, as data.path) and scores them on its
    validation split, split as `charrnn train` splits it. With `store`, the report is kept
    in the corpus cache folder, where the training summary finds it.

    `progress`: a tqdm bar on stderr (None: when stderr is a terminal).
    """
    from charrnn.config import DataConfig
    from charrnn.train import cache_dir

    if order < 1:
        raise ConfigError(f"--order must be at least 1, not {order}")
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must lie in (0, 1)"
            " and [0, 1) with a sum below 1"
        )
    cfg = DataConfig(path=path, include=include, encoding=encoding, errors=errors,
                     val_fraction=val_fraction, test_fraction=test_fraction)
    corpus = load_corpus(cfg, cache_dir=cache_dir())
    if len(corpus.val) == 0:
        raise DataError(
            f"{path}: {corpus.num_chars} characters leave an empty validation split at"
            f" val_fraction {val_fraction}; raise --val-fraction"
        )
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=order + 1, desc="n-gram orders", unit="order", file=sys.stderr, delay=2,
              disable=not show, leave=False) as bar:
        model = NGramModel.fit(corpus.train, corpus.vocab.size, order,
                               on_order=lambda _m: bar.update())
        results = score(model, corpus.train, corpus.val)
        bar.update()
    report = NGramReport(results, len(corpus.train), len(corpus.val), corpus.vocab.size)
    if store:
        _store(corpus.files, cfg, report)
    return report


# -- remembered results, for the training summary ------------------------------------


def _result_path(files: list[Path], cfg: DataSource) -> Path | None:
    from charrnn.train import cache_dir

    base = cache_dir()
    if base is None:
        return None
    key = _cache_key(files, cfg.encoding, cfg.errors)
    return base / f"ngram-{key}-val{cfg.val_fraction:g}-test{cfg.test_fraction:g}.json"


def _store(files: list[Path], cfg: DataSource, report: NGramReport) -> None:
    from charrnn.fileio import atomic_write_bytes

    try:
        path = _result_path(files, cfg)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(report.to_dict(), indent=1).encode())
    except Exception:  # a cache that cannot be written costs nothing but the summary line
        pass


def stored_baseline(files: list[Path], cfg: DataSource) -> dict | None:
    """The report `ngram_baseline` stored for these files and this data config, if any
    (the corpus files unchanged since); None otherwise. Never raises."""
    try:
        path = _result_path(files, cfg)
        if path is None or not path.is_file():
            return None
        report = json.loads(path.read_text())
        return report if "best" in report else None
    except Exception:
        return None
