"""The character vocabulary: characters <-> integer ids, encoded and decoded with numpy.

Text is handled as arrays of Unicode code points (``str.encode("utf-32-le")`` viewed as
uint32), so encoding, decoding and counting never loop over characters in Python.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from charrnn.errors import VocabError
from charrnn.fileio import atomic_write_bytes

UNKNOWN_MODES = ("error", "skip")
_MAX_LISTED = 10  # unknown characters named in an error message


def code_points(text: str) -> np.ndarray:
    """The code points of `text` as a uint32 array (lone surrogates included)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")  # (N,)


def _text_of(codes: np.ndarray) -> str:
    return np.asarray(codes, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")


def _count_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct code points (ascending) and how often each occurs."""
    if codes.size and int(codes.max()) < 1 << 16:
        counts = np.bincount(codes)  # (max+1,)
        present = np.flatnonzero(counts)
        return present.astype(np.uint32), counts[present]
    return np.unique(codes, return_counts=True)


def describe_unknown(unknown: Mapping[str, int]) -> str:
    """One line naming the unknown characters (the first few, repr'd) and their count."""
    listed = ", ".join(repr(ch) for ch in list(unknown)[:_MAX_LISTED])
    more = len(unknown) - _MAX_LISTED
    if more > 0:
        listed += f" and {more} more"
    total = sum(unknown.values())
    return f"{len(unknown)} character(s) not in the vocabulary ({total} occurrence(s)): {listed}"


class Vocab:
    """A fixed set of characters; a character's id is its index in `chars`.

    `Vocab.build` sorts the characters by code point; a vocabulary loaded from JSON keeps
    the order it was saved in.
    """

    def __init__(self, chars: Sequence[str], counts: Sequence[int] | None = None) -> None:
        chars = list(chars)
        counts = [0] * len(chars) if counts is None else [int(c) for c in counts]
        if len(counts) != len(chars):
            raise VocabError(f"vocabulary has {len(chars)} chars but {len(counts)} counts")
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise VocabError(f"vocabulary entry {ch!r} is not a single character")
        if len(set(chars)) != len(chars):
            dupes = sorted({ch for ch in chars if chars.count(ch) > 1})
            raise VocabError(f"vocabulary repeats characters: {', '.join(map(repr, dupes))}")
        if any(c < 0 for c in counts):
            raise VocabError("vocabulary counts must not be negative")

        self.chars: list[str] = chars
        self.counts: list[int] = counts
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(chars)}
        self._codes = np.array([ord(ch) for ch in chars], dtype=np.uint32)  # (V,)
        max_code = int(self._codes.max()) if chars else 0
        # code point -> id, -1 where the code point is not in the vocabulary
        self._lookup = np.full(max_code + 1, -1, dtype=np.int32)  # (max_code+1,)
        self._lookup[self._codes] = np.arange(len(chars))

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        for dtype in (np.uint8, np.uint16):
            if self.size <= np.iinfo(dtype).max + 1:
                return np.dtype(dtype)
        return np.dtype(np.uint32)

    def __len__(self) -> int:
        return self.size

    def __contains__(self, ch: object) -> bool:
        return ch in self.stoi

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.chars == other.chars and self.counts == other.counts

    def __repr__(self) -> str:
        return f"Vocab(size={self.size})"

    # -- encoding -------------------------------------------------------------------

    def _ids_of(self, codes: np.ndarray) -> np.ndarray:
        """Ids of the code points, -1 for those outside the vocabulary."""
        in_range = codes < self._lookup.size  # (N,)
        return np.where(in_range, self._lookup[np.where(in_range, codes, 0)], -1)  # (N,)

    def encode(self, text: str, unknown: str = "error") -> tuple[np.ndarray, int]:
        """Ids of `text` (dtype `self.dtype`) and the number of unknown characters.

        unknown="error" raises VocabError naming the unknown characters; "skip" drops them.
        """
        if unknown not in UNKNOWN_MODES:
            raise ValueError(f"unknown must be one of {UNKNOWN_MODES}, not {unknown!r}")
        ids = self._ids_of(code_points(text))  # (N,)
        known = ids >= 0  # (N,)
        n_unknown = int(known.size - np.count_nonzero(known))
        if n_unknown:
            if unknown == "error":
                raise VocabError("text holds " + describe_unknown(self.unknown_chars(text)))
            ids = ids[known]  # (N - n_unknown,)
        return ids.astype(self.dtype), n_unknown

    def unknown_chars(self, text: str) -> dict[str, int]:
        """Characters of `text` outside the vocabulary -> occurrences, in order of appearance."""
        codes = code_points(text)  # (N,)
        unknown = codes[self._ids_of(codes) < 0]  # (U,)
        distinct, first, counts = np.unique(unknown, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        return {chr(int(distinct[i])): int(counts[i]) for i in order}

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = int(ids[(ids < 0) | (ids >= self.size)][0])
            raise VocabError(f"id {bad} is outside the vocabulary of {self.size} characters")
        return _text_of(self._codes[ids.reshape(-1)])

    # -- building -------------------------------------------------------------------

    @classmethod
    def build(cls, chunks: Iterable[str]) -> Vocab:
        """Counts the characters of a stream of text chunks; chars sorted by code point."""
        totals: dict[int, int] = {}
        for chunk in chunks:
            distinct, counts = _count_codes(code_points(chunk))
            for code, count in zip(distinct.tolist(), counts.tolist(), strict=True):
                totals[code] = totals.get(code, 0) + count
        codes = sorted(totals)
        return cls([chr(c) for c in codes], [totals[c] for c in codes])

    # -- persistence ----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"chars": list(self.chars), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, data: Any) -> Vocab:
        if not isinstance(data, dict) or not isinstance(data.get("chars"), list):
            raise VocabError('vocabulary must be an object with a "chars" list')
        counts = data.get("counts")
        if counts is not None and (
            not isinstance(counts, list)
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
        ):
            raise VocabError('vocabulary "counts" must be a list of integers')
        if not data["chars"]:
            raise VocabError("vocabulary has no characters")
        return cls(data["chars"], counts)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the JSON atomically (charrnn.fileio.atomic_write_bytes)."""
        data = self.to_json()
        try:
            text = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: fall back to \u escapes
            text = json.dumps(data, indent=1).encode("ascii")
        atomic_write_bytes(Path(path), text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocab:
        try:
            data = json.loads(Path(path).read_bytes())
        except OSError as e:
            raise VocabError(f"{path}: cannot read vocabulary ({e.strerror or e})") from e
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise VocabError(f"{path}: not a valid vocabulary JSON file ({e})") from e
        try:
            return cls.from_json(data)
        except VocabError as e:
            raise VocabError(f"{path}: {e}") from e
