"""Corpus loading (files -> text chunks -> ids) and truncated-BPTT batching.

A corpus is streamed twice in chunks, never held as one Python string: pass 1 counts the
characters into a `Vocab`, pass 2 encodes each chunk into one preallocated id array. The
ids may be cached as a `.npy` file and memory-mapped on the next run.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import json
import logging
import math
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from charrnn.errors import DataError, RunDirError, VocabError
from charrnn.fileio import remove_stale_temps, temp_path
from charrnn.vocab import UNKNOWN_MODES, Vocab, describe_unknown

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20
_OFFSET_TAG = 0x0FF5E7  # keeps the epoch-offset draws apart from other uses of the seed
_CACHE_FORMAT = 1  # bump when the cache layout changes


class DataSource(Protocol):
    """What `load_corpus` reads from a config (`charrnn.config.DataConfig` fits)."""

    path: str
    include: str
    encoding: str
    errors: str
    val_fraction: float
    test_fraction: float
    cache: bool


# -- finding and reading files -------------------------------------------------------


def expand_path(path: str) -> str:
    """Replaces "{stdlib}" with this Python's standard library folder and expands "~"."""
    return os.path.expanduser(str(path).replace("{stdlib}", sysconfig.get_paths()["stdlib"]))


def corpus_files(path: str, include: str = "*") -> list[Path]:
    """The files of a corpus, sorted: `path` is a file, a directory or a glob.

    A directory is searched recursively for files whose name matches `include`; a glob
    ("**" allowed) keeps the files it matches.
    """
    expanded = expand_path(path)
    p = Path(expanded)
    if p.is_file():
        return [p]
    if p.is_dir():
        found: list[Path] = []
        for root, dirs, names in os.walk(p):
            dirs.sort()
            found.extend(Path(root, name) for name in names if fnmatch.fnmatch(name, include))
        files = sorted(f for f in found if f.is_file())
        if not files:
            raise DataError(f"{expanded}: no files matching {include!r} in this directory")
        return files
    if p.exists():
        raise DataError(f"{expanded}: not a regular file or directory")
    if any(c in expanded for c in "*?["):
        matches = glob.glob(expanded, recursive=True)
        files = sorted(Path(m) for m in matches if os.path.isfile(m))
        if not files:
            raise DataError(f"{expanded}: no files match this pattern")
        return files
    raise DataError(f"{expanded}: no such file or directory")


def read_chunks(
    files: Iterable[str | os.PathLike[str]],
    encoding: str = "utf-8",
    errors: str = "strict",
    chunk_chars: int = CHUNK_CHARS,
) -> Iterator[str]:
    """Streams the text of `files`, one after the other, in chunks of at most `chunk_chars`.

    Each file is decoded incrementally, so a character split across two reads is kept
    whole. errors="strict" refuses bad bytes (DataError with the file and byte offset) and
    files that look binary; errors="replace" substitutes U+FFFD.
    """
    try:
        make_decoder = codecs.getincrementaldecoder(encoding)
        wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    except LookupError as e:
        raise DataError(f"unknown text encoding {encoding!r}") from e
    check_binary = errors == "strict" and not wide  # NUL bytes are normal in UTF-16/32
    for file in files:
        yield from _read_file(Path(file), make_decoder(errors), encoding, check_binary, chunk_chars)


def _read_file(
    path: Path,
    decoder: codecs.IncrementalDecoder,
    encoding: str,
    check_binary: bool,
    chunk_bytes: int,
) -> Iterator[str]:
    offset = 0  # bytes of the file decoded so far
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(chunk_bytes)
                if check_binary and offset == 0 and b"\0" in raw:
                    raise DataError(f"{path}: looks binary (holds NUL bytes), not {encoding} text")
                pending = len(decoder.getstate()[0])  # bytes held back from the last read
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    at = offset - pending + e.start
                    bad = e.object[e.start : e.end]
                    raise DataError(
                        f"{path}: invalid {encoding} at byte offset {at} ({bad!r}: {e.reason});"
                        " use errors: replace to substitute U+FFFD"
                    ) from None
                offset += len(raw)
                if text:
                    yield text
                if not raw:
                    return
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


# -- the corpus ----------------------------------------------------------------------


@dataclass
class Corpus:
    """A corpus encoded as ids; train, val and test are consecutive slices of one stream."""

    vocab: Vocab
    train: np.ndarray  # (N_train,)
    val: np.ndarray  # (N_val,)
    test: np.ndarray  # (N_test,)
    files: list[Path]

    @property
    def num_chars(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) lengths: val and test are their fraction of `n`, rounded down."""
    n_val = math.floor(n * val_fraction + 1e-6)  # 1e-6 absorbs float error (0.29 * 100)
    n_test = math.floor(n * test_fraction + 1e-6)
    return n - n_val - n_test, n_val, n_test


def load_corpus(cfg: DataSource, cache_dir: Path | None = None, min_train_chars: int = 2) -> Corpus:
    """Reads, encodes and splits the corpus that `cfg.path` names.

    With a `cache_dir` and `cfg.cache`, the ids are stored there (keyed by the files'
    paths, sizes and mtimes, the encoding and the error mode) and memory-mapped next time.
    """
    files = corpus_files(cfg.path, cfg.include)
    use_cache = cache_dir is not None and cfg.cache
    key = _cache_key(files, cfg.encoding, cfg.errors) if use_cache else ""
    cached = _load_cached(Path(cache_dir), key) if use_cache else None
    if cached is not None:
        vocab, ids = cached
    else:
        vocab, ids = _encode_files(files, cfg.encoding, cfg.errors, expand_path(cfg.path))
        if use_cache and _cache_key(files, cfg.encoding, cfg.errors) == key:
            ids = _store_cached(Path(cache_dir), key, vocab, ids)

    n_train, n_val, _ = split_sizes(len(ids), cfg.val_fraction, cfg.test_fraction)
    if n_train < min_train_chars:
        raise DataError(
            f"{expand_path(cfg.path)}: {len(ids)} characters leave {n_train} for training"
            f" after the validation and test splits; at least {min_train_chars} are needed"
        )
    train = ids[:n_train]  # (N_train,)
    val = ids[n_train : n_train + n_val]  # (N_val,)
    test = ids[n_train + n_val :]  # (N_test,)
    return Corpus(vocab=vocab, train=train, val=val, test=test, files=files)


def _encode_files(
    files: list[Path], encoding: str, errors: str, label: str
) -> tuple[Vocab, np.ndarray]:
    vocab = Vocab.build(read_chunks(files, encoding, errors))
    total = sum(vocab.counts)
    if total == 0:
        raise DataError(f"{label}: the corpus is empty")
    changed = DataError(f"{label}: the corpus changed while it was being read")
    ids = np.empty(total, dtype=vocab.dtype)  # (N,)
    pos = 0
    for chunk in read_chunks(files, encoding, errors):
        chunk_ids, n_unknown = vocab.encode(chunk, unknown="skip")
        if n_unknown or pos + len(chunk_ids) > total:
            raise changed
        ids[pos : pos + len(chunk_ids)] = chunk_ids
        pos += len(chunk_ids)
    if pos != total:
        raise changed
    return vocab, ids


def _cache_key(files: list[Path], encoding: str, errors: str) -> str:
    entries = []
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e.strerror or e})") from e
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_FORMAT, encoding, errors, entries])
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"corpus-{key}.npy", cache_dir / f"corpus-{key}.vocab.json"


def _load_cached(cache_dir: Path, key: str) -> tuple[Vocab, np.ndarray] | None:
    npy, vocab_json = _cache_paths(cache_dir, key)
    if not (npy.is_file() and vocab_json.is_file()):
        return None
    try:
        vocab = Vocab.load(vocab_json)
        ids = np.load(npy, mmap_mode="r")  # (N,)
    except Exception as e:  # a damaged cache is rebuilt, never fatal
        log.warning("ignoring the damaged corpus cache %s (%s)", npy, e)
        return None
    if ids.ndim != 1 or ids.dtype != vocab.dtype or len(ids) != sum(vocab.counts):
        log.warning("ignoring the inconsistent corpus cache %s", npy)
        return None
    return vocab, ids


def _store_cached(cache_dir: Path, key: str, vocab: Vocab, ids: np.ndarray) -> np.ndarray:
    """Writes the cache atomically and returns the ids memory-mapped from it."""
    npy, vocab_json = _cache_paths(cache_dir, key)
    tmp = temp_path(npy)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cache_dir)  # left by runs killed while writing their cache
        vocab.save(vocab_json)
        with open(tmp, "wb") as f:
            np.save(f, ids)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, npy)  # the .npy appears last: its presence marks a complete entry
        return np.load(npy, mmap_mode="r")
    except (OSError, RunDirError) as e:  # RunDirError: Vocab.save's atomic write failed
        log.warning("cannot write the corpus cache in %s (%s); going on without it", cache_dir, e)
        return ids
    finally:
        tmp.unlink(missing_ok=True)


def load_text_ids(
    path: str | os.PathLike[str],
    vocab: Vocab,
    unknown: str = "skip",
    encoding: str = "utf-8",
    errors: str = "strict",
) -> tuple[np.ndarray, int]:
    """Ids of one held-out text file and the number of unknown characters in it.

    unknown="skip" drops characters outside the vocabulary; "error" raises VocabError
    naming the file and the characters. At least 2 known characters are needed to score.
    """
    if unknown not in UNKNOWN_MODES:
        raise ValueError(f"unknown must be one of {UNKNOWN_MODES}, not {unknown!r}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if not p.is_file():
        raise DataError(f"{path}: not a regular file")
    parts: list[np.ndarray] = []
    n_unknown = 0
    missing: Counter[str] = Counter()
    for chunk in read_chunks([p], encoding, errors):
        ids, n = vocab.encode(chunk, unknown="skip")
        if n and unknown == "error":
            missing.update(vocab.unknown_chars(chunk))
        parts.append(ids)
        n_unknown += n
    if missing:
        raise VocabError(f"{path}: holds {describe_unknown(missing)}")
    ids = np.concatenate(parts) if parts else np.empty(0, dtype=vocab.dtype)  # (N,)
    if ids.size == 0 and n_unknown == 0:
        raise DataError(f"{path}: is empty")
    if ids.size < 2:
        raise DataError(
            f"{path}: has {ids.size} character(s) in the vocabulary ({n_unknown} unknown"
            " skipped); at least 2 are needed to score"
        )
    return ids, n_unknown


# -- batching for truncated backpropagation through time -----------------------------
#
# ids = a b c ... z (N = 26), batch_size B = 5, seq_length T = 2.
# batchify cuts the stream into B contiguous rows of L = N // B = 5 ids ("z" is dropped):
#
#              window 0   window 1
#            +---------+---------+
#    row 0   | a   b   | c   d   | e
#    row 1   | f   g   | h   i   | j
#    row 2   | k   l   | m   n   | o
#    row 3   | p   q   | r   s   | t
#    row 4   | u   v   | w   x   | y
#            +---------+---------+
#
# Window k: inputs x = rows[:, kT : kT+T], targets y = rows[:, kT+1 : kT+T+1], the next
# character of each input (window 1: x rows "cd", "hi", ...; y rows "de", "ij", ...).
# An epoch has (L - 1) // T windows; a ragged tail shorter than T is dropped. Each row is
# one continuous text, so the hidden state of row b carries over from window k to k+1.
# x and y are handed out time-major, (T, B).
#
# With a random offset (train.random_offset), epoch e > 0 reads the same rows from a point
# o_e of the training text, drawn from (seed, e): row b starts at (o_e + b L) mod N and
# wraps past the end. The rows then hold other text side by side, and the cuts between
# windows, where truncated BPTT stops the gradient, move by o_e mod T. Epoch 0 is o = 0.


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """The id stream cut into `batch_size` contiguous rows (a view; the tail is dropped)."""
    length = len(ids) // batch_size
    return ids[: batch_size * length].reshape(batch_size, length)  # (B, L)


class WindowStream:
    """Hands out the (x, y) windows of `ids` in order, epoch after epoch.

    `epoch` and `position` (the index of the next window) are the whole state;
    `state_dict`/`load_state_dict` let a resumed run continue on exactly the next window.
    """

    def __init__(
        self, ids: np.ndarray, batch_size: int, seq_length: int, name: str = "the training split",
        columns: slice | None = None, offset_seed: int | None = None,
    ) -> None:
        """`columns`: hand out only these streams of the batch (an MPI rank's block, see
        charrnn.distributed); the windows and the position are the whole batch's.
        `offset_seed`: start each epoch after the first at a random offset of `ids` drawn
        from (offset_seed, epoch), the same on every rank (see the diagram above)."""
        if batch_size < 1 or seq_length < 1:
            raise ValueError("batch_size and seq_length must be positive")
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.ids = ids
        self.offset_seed = offset_seed
        self._offset = (0, 0)  # (epoch, its offset): drawn once an epoch, not every window
        self.rows = batchify(ids, batch_size)  # (B, L)
        # first id of each of this stream's rows at offset 0
        self.row_starts = np.arange(batch_size, dtype=np.int64) * self.rows.shape[1]  # (B,)
        if columns is not None:
            self.rows = self.rows[columns]  # (B_rank, L)
            self.row_starts = self.row_starts[columns]  # (B_rank,)
        self.num_windows = (self.rows.shape[1] - 1) // seq_length
        if self.num_windows < 1:
            need = batch_size * (seq_length + 1)
            raise DataError(
                f"{name} has {len(ids)} characters, fewer than one window of"
                f" batch_size x (seq_length + 1) = {batch_size} x {seq_length + 1} = {need}"
            )
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.num_windows

    def epoch_offset(self, epoch: int) -> int:
        """Where epoch `epoch` starts reading the text: 0 without an offset seed, and
        for epoch 0."""
        if self.offset_seed is None or epoch == 0:
            return 0
        rng = np.random.default_rng([self.offset_seed, epoch, _OFFSET_TAG])
        return int(rng.integers(len(self.ids)))

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Window k of the current epoch: inputs x and targets y, each (T, B) int64."""
        s = k * self.seq_length
        if self._offset[0] != self.epoch:
            self._offset = (self.epoch, self.epoch_offset(self.epoch))
        offset = self._offset[1]
        if offset:
            t = np.arange(s, s + self.seq_length + 1)  # (T+1,)
            at = (offset + self.row_starts[None, :] + t[:, None]) % len(self.ids)  # (T+1, B)
            xy = self.ids[at].astype(np.int64)  # (T+1, B)
            return np.ascontiguousarray(xy[:-1]), np.ascontiguousarray(xy[1:])
        x = np.ascontiguousarray(self.rows[:, s : s + self.seq_length].T, dtype=np.int64)
        y = np.ascontiguousarray(self.rows[:, s + 1 : s + self.seq_length + 1].T, dtype=np.int64)
        return x, y  # (T, B), (T, B)

    def next_window(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """The next (x, y) and whether it starts an epoch (then the hidden state is reset)."""
        new_epoch = self.position == 0
        x, y = self.window(self.position)
        self.position += 1
        if self.position == self.num_windows:
            self.position = 0
            self.epoch += 1
        return x, y, new_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        windows = int(state.get("windows", self.num_windows))
        if windows != self.num_windows or not 0 <= position < self.num_windows or epoch < 0:
            raise DataError(
                f"the saved data position (epoch {epoch}, window {position} of {windows})"
                f" does not fit this corpus, which has {self.num_windows} windows per epoch"
            )
        self.epoch, self.position = epoch, position


def eval_windows(
    ids: np.ndarray, batch_size: int, seq_length: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Windows (x, y, mask), each (T, B), that score every target of `ids` exactly once.

    The targets ids[1:] are cut into B = min(batch_size, max(1, (N - 1) // seq_length))
    contiguous streams, whose lengths differ by at most one; stream b starts from the id
    just before its first target, so the streams overlap by one input and the characters
    scored are exactly N - 1. A stream's hidden state starts at zero and carries over from
    window to window. The last window may be shorter than seq_length; mask is False on the
    padding of the shorter streams (x and y are 0 there). Yields nothing when N < 2.
    """
    n_targets = len(ids) - 1
    if n_targets < 1:
        return
    b = min(batch_size, max(1, n_targets // seq_length))
    lengths = np.full(b, n_targets // b)  # (B,)
    lengths[: n_targets % b] += 1
    starts = 1 + np.concatenate(([0], np.cumsum(lengths)[:-1]))  # (B,) first target of each
    longest = int(lengths[0])
    for s in range(0, longest, seq_length):
        t = np.arange(s, min(s + seq_length, longest))[:, None]  # (T, 1)
        mask = t < lengths  # (T, B)
        target = np.where(mask, starts + t, 1)  # (T, B) index into ids
        x = np.where(mask, ids[target - 1], 0).astype(np.int64)  # (T, B)
        y = np.where(mask, ids[target], 0).astype(np.int64)  # (T, B)
        yield x, y, mask
