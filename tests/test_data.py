from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.data import (
    WindowStream,
    batchify,
    corpus_files,
    eval_windows,
    load_corpus,
    load_text_ids,
    read_chunks,
    split_sizes,
)
from charrnn.errors import DataError, VocabError
from charrnn.vocab import Vocab


@dataclass
class Cfg:
    """Stands in for charrnn.config.DataConfig."""

    path: str
    include: str = "*"
    encoding: str = "utf-8"
    errors: str = "strict"
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    cache: bool = True


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", newline="")
    else:
        path.write_bytes(data)
    return path


# -- corpus_files --------------------------------------------------------------------


def test_corpus_files_single_file(tmp_path) -> None:
    f = write(tmp_path / "a.txt", "x")
    assert corpus_files(str(f)) == [f]


def test_corpus_files_directory_is_recursive_and_sorted(tmp_path) -> None:
    b = write(tmp_path / "b.txt", "b")
    a = write(tmp_path / "a.txt", "a")
    deep = write(tmp_path / "sub" / "deeper" / "c.txt", "c")
    other = write(tmp_path / "sub" / "d.md", "d")
    assert corpus_files(str(tmp_path)) == [a, b, other, deep]  # "d.md" < "deeper"
    assert corpus_files(str(tmp_path), include="*.txt") == [a, b, deep]


def test_corpus_files_glob(tmp_path) -> None:
    a = write(tmp_path / "a.txt", "a")
    deep = write(tmp_path / "sub" / "c.txt", "c")
    write(tmp_path / "sub" / "d.md", "d")
    (tmp_path / "dir.txt").mkdir()
    assert corpus_files(str(tmp_path / "*.txt")) == [a]
    assert corpus_files(str(tmp_path / "**" / "*.txt")) == [a, deep]


def test_corpus_files_stdlib() -> None:
    files = corpus_files("{stdlib}/json/*.py")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib / "json" / "__init__.py" in files
    assert corpus_files("{stdlib}/json", include="__init__.py")[0] == files[0]


def test_corpus_files_errors_name_path_and_pattern(tmp_path) -> None:
    with pytest.raises(DataError, match="nope.txt: no such file"):
        corpus_files(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"no files match"):
        corpus_files(str(tmp_path / "*.nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no files matching '\\*'"):
        corpus_files(str(empty))
    write(tmp_path / "x.md", "x")
    with pytest.raises(DataError, match=r"no files matching '\*\.txt'"):
        corpus_files(str(tmp_path), include="*.txt")


# -- read_chunks ---------------------------------------------------------------------


def test_read_chunks_keeps_characters_split_across_reads(tmp_path) -> None:
    text = "aé€😀b" * 20
    f = write(tmp_path / "a.txt", text)
    chunks = list(read_chunks([f], chunk_chars=3))
    assert "".join(chunks) == text
    assert len(chunks) > 10
    assert all(len(c) <= 3 for c in chunks)


def test_read_chunks_concatenates_files(tmp_path) -> None:
    a = write(tmp_path / "a.txt", "one\n")
    b = write(tmp_path / "b.txt", "two\r\n")
    empty = write(tmp_path / "c.txt", "")
    assert "".join(read_chunks([a, empty, b])) == "one\ntwo\r\n"


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 5, 1 << 20])
def test_read_chunks_strict_error_offset(tmp_path, chunk_chars: int) -> None:
    good = "aé€😀".encode()  # 1 + 2 + 3 + 4 bytes
    f = write(tmp_path / "bad.txt", good + b"\xe2\x82" + b"x")  # truncated euro sign
    with pytest.raises(DataError, match=rf"bad.txt: invalid utf-8 at byte offset {len(good)} "):
        list(read_chunks([f], chunk_chars=chunk_chars))


@pytest.mark.parametrize("chunk_chars", [1, 4, 1 << 20])
def test_read_chunks_strict_error_at_end_of_file(tmp_path, chunk_chars: int) -> None:
    f = write(tmp_path / "cut.txt", b"abcdef\xf0\x9f")  # truncated emoji at the very end
    with pytest.raises(DataError, match="cut.txt: invalid utf-8 at byte offset 6 "):
        list(read_chunks([f], chunk_chars=chunk_chars))


def test_read_chunks_replace_mode(tmp_path) -> None:
    f = write(tmp_path / "bad.txt", b"ab\xffcd\xe2\x82")
    text = "".join(read_chunks([f], errors="replace", chunk_chars=2))
    assert text == "ab\ufffdcd\ufffd"


def test_read_chunks_refuses_binary(tmp_path) -> None:
    f = write(tmp_path / "blob.bin", b"abc\x00\x01\x02")
    with pytest.raises(DataError, match="blob.bin: looks binary"):
        list(read_chunks([f]))


def test_read_chunks_utf16_is_not_binary(tmp_path) -> None:
    f = write(tmp_path / "wide.txt", "hé😀".encode("utf-16"))
    assert "".join(read_chunks([f], encoding="utf-16", chunk_chars=1)) == "hé😀"


def test_read_chunks_unreadable(tmp_path) -> None:
    with pytest.raises(DataError, match="missing.txt: cannot read"):
        list(read_chunks([tmp_path / "missing.txt"]))
    with pytest.raises(DataError, match="cannot read"):
        list(read_chunks([tmp_path]))
    with pytest.raises(DataError, match="unknown text encoding"):
        list(read_chunks([tmp_path], encoding="no-such-codec"))


def test_read_chunks_permission_denied(unprivileged) -> None:
    """A real EACCES: read by nobody when the suite runs as root (conftest's unprivileged)."""
    f = unprivileged.deny(write(unprivileged.dir / "secret.txt", "x"))
    r = unprivileged.python(
        "import sys\n"
        "from charrnn.data import read_chunks\n"
        "from charrnn.errors import DataError\n"
        "try:\n"
        "    list(read_chunks([sys.argv[1]]))\n"
        "except DataError as e:\n"
        "    print(e)\n", f)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{f}: cannot read (Permission denied)"


# -- load_corpus ---------------------------------------------------------------------


def test_split_sizes_round_down() -> None:
    assert split_sizes(100, 0.05, 0.0) == (95, 5, 0)
    assert split_sizes(100, 0.29, 0.07) == (64, 29, 7)
    assert split_sizes(39, 0.05, 0.05) == (37, 1, 1)
    assert split_sizes(10, 0.0, 0.0) == (10, 0, 0)


def test_load_corpus_splits_are_consecutive(tmp_path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000)) + "é😀"
    write(tmp_path / "a.txt", text[:500])
    write(tmp_path / "b.txt", text[500:])
    corpus = load_corpus(Cfg(str(tmp_path), val_fraction=0.1, test_fraction=0.05))
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (852, 100, 50)
    whole = np.concatenate([corpus.train, corpus.val, corpus.test])
    assert corpus.vocab.decode(whole) == text
    assert corpus.num_chars == len(text)
    assert corpus.train.dtype == np.uint8
    assert corpus.files == [tmp_path / "a.txt", tmp_path / "b.txt"]


def test_load_corpus_cache_hit_is_memory_mapped(tmp_path) -> None:
    data = write(tmp_path / "corpus.txt", "hello wörld\n" * 50)
    cache = tmp_path / "cache"
    first = load_corpus(Cfg(str(data)), cache_dir=cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2 and entries[0].startswith("corpus-") and entries[0].endswith(".npy")
    second = load_corpus(Cfg(str(data)), cache_dir=cache)
    assert isinstance(second.train, np.memmap)
    assert second.vocab == first.vocab
    for a, b in [(first.train, second.train), (first.val, second.val)]:
        np.testing.assert_array_equal(a, b)
    uncached = load_corpus(Cfg(str(data), cache=False), cache_dir=cache)
    np.testing.assert_array_equal(uncached.train, first.train)


def test_load_corpus_cache_misses_when_the_file_changes(tmp_path) -> None:
    data = write(tmp_path / "corpus.txt", "abc" * 10)
    cache = tmp_path / "cache"
    load_corpus(Cfg(str(data), val_fraction=0.0), cache_dir=cache)
    write(data, "xyz" * 11)
    os.utime(data, ns=(0, 10**9))
    corpus = load_corpus(Cfg(str(data), val_fraction=0.0), cache_dir=cache)
    assert corpus.vocab.chars == ["x", "y", "z"]
    assert corpus.vocab.decode(corpus.train) == "xyz" * 11


def test_load_corpus_rebuilds_a_damaged_cache(tmp_path) -> None:
    data = write(tmp_path / "corpus.txt", "abc" * 10)
    cache = tmp_path / "cache"
    load_corpus(Cfg(str(data)), cache_dir=cache)
    for npy in cache.glob("*.npy"):
        npy.write_bytes(b"garbage")
    corpus = load_corpus(Cfg(str(data), val_fraction=0.0), cache_dir=cache)
    assert corpus.vocab.decode(corpus.train) == "abc" * 10


def test_load_corpus_empty_and_too_short(tmp_path) -> None:
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match="empty.txt: the corpus is empty"):
        load_corpus(Cfg(str(empty)))
    tiny = write(tmp_path / "tiny.txt", "ab")
    with pytest.raises(DataError, match="tiny.txt: 2 characters leave 1 for training"):
        load_corpus(Cfg(str(tiny), val_fraction=0.5))


def test_load_corpus_bad_encoding_names_file(tmp_path) -> None:
    write(tmp_path / "a.txt", "fine")
    write(tmp_path / "b.txt", b"ok\xff")
    with pytest.raises(DataError, match="b.txt: invalid utf-8 at byte offset 2"):
        load_corpus(Cfg(str(tmp_path)))
    corpus = load_corpus(Cfg(str(tmp_path), errors="replace", val_fraction=0.0))
    assert corpus.vocab.decode(corpus.train) == "fineok\ufffd"


def test_load_text_ids(tmp_path) -> None:
    vocab = Vocab.build(["abc"])
    f = write(tmp_path / "held.txt", "abxcyya")
    ids, n_unknown = load_text_ids(f, vocab)
    assert vocab.decode(ids) == "abca" and n_unknown == 3
    with pytest.raises(VocabError, match=r"held.txt: .*'x', 'y'"):
        load_text_ids(f, vocab, unknown="error")
    with pytest.raises(DataError, match="gone.txt: no such file"):
        load_text_ids(tmp_path / "gone.txt", vocab)
    with pytest.raises(DataError, match="empty.txt: is empty"):
        load_text_ids(write(tmp_path / "empty.txt", ""), vocab)
    with pytest.raises(DataError, match="one.txt: has 1 character"):
        load_text_ids(write(tmp_path / "one.txt", "axyz"), vocab)
    with pytest.raises(DataError, match="bad.txt: invalid utf-8"):
        load_text_ids(write(tmp_path / "bad.txt", b"ab\xff"), vocab)
    with pytest.raises(DataError, match="not a regular file"):
        load_text_ids(tmp_path, vocab)


# -- batching ------------------------------------------------------------------------


def test_batchify_rows_are_contiguous() -> None:
    ids = np.arange(26)
    rows = batchify(ids, 5)
    assert rows.shape == (5, 5)
    np.testing.assert_array_equal(rows[1], np.arange(5, 10))
    assert np.shares_memory(rows, ids)


def test_windows_are_the_expected_slices() -> None:
    ids = np.arange(103, dtype=np.uint8)  # 4 rows of 25, 3 dropped
    stream = WindowStream(ids, batch_size=4, seq_length=6)
    assert len(stream) == (25 - 1) // 6 == 4
    rows = ids[:100].reshape(4, 25)
    for k in range(4):
        x, y, new_epoch = stream.next_window()
        assert new_epoch == (k == 0)
        assert x.shape == y.shape == (6, 4)
        assert x.dtype == y.dtype == np.int64
        assert x.flags.c_contiguous and y.flags.c_contiguous
        np.testing.assert_array_equal(x, rows[:, 6 * k : 6 * k + 6].T)
        np.testing.assert_array_equal(y, x + 1)  # targets are the next characters
    assert (stream.epoch, stream.position) == (1, 0)
    x, _, new_epoch = stream.next_window()
    assert new_epoch
    np.testing.assert_array_equal(x, rows[:, :6].T)


def test_window_stream_reads_a_memmap(tmp_path) -> None:
    np.save(tmp_path / "ids.npy", np.arange(200, dtype=np.uint8))
    ids = np.load(tmp_path / "ids.npy", mmap_mode="r")
    x, y, _ = WindowStream(ids, 2, 10).next_window()
    np.testing.assert_array_equal(x[:, 1], np.arange(100, 110))
    assert not isinstance(x, np.memmap)


@pytest.mark.parametrize("offset_seed", [None, 11])  # 11: a random offset per epoch
def test_state_dict_resumes_on_the_next_window(offset_seed: int | None) -> None:
    ids = np.random.default_rng(0).integers(0, 50, size=500).astype(np.uint8)
    straight = WindowStream(ids, 3, 7, offset_seed=offset_seed)
    expected = [straight.next_window() for _ in range(60)]  # 23 windows an epoch
    first = WindowStream(ids, 3, 7, offset_seed=offset_seed)
    for _ in range(37):
        first.next_window()
    resumed = WindowStream(ids, 3, 7, offset_seed=offset_seed)
    resumed.load_state_dict(dict(first.state_dict()))
    for x, y, flag in expected[37:]:
        rx, ry, rflag = resumed.next_window()
        np.testing.assert_array_equal(rx, x)
        np.testing.assert_array_equal(ry, y)
        assert rflag == flag
    assert resumed.state_dict() == straight.state_dict()


def test_random_offset_reads_each_epoch_from_its_own_point() -> None:
    """Epoch 0 is the plain layout; epoch e > 0 is the plain layout of the text rotated to
    start at its offset (np.roll, an independent computation), drawn from (seed, epoch)."""
    ids = np.arange(1003, dtype=np.int64)  # every id unique: a window says where it read
    B, T = 5, 7
    plain = WindowStream(ids, B, T)
    stream = WindowStream(ids, B, T, offset_seed=3)
    n = len(stream)
    for _ in range(n):
        (x0, y0, _), (x, y, _) = plain.next_window(), stream.next_window()
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    offsets = [stream.epoch_offset(e) for e in range(1, 9)]
    assert all(0 <= o < len(ids) for o in offsets) and len(set(offsets)) == len(offsets)
    assert offsets == [WindowStream(ids, B, T, offset_seed=3).epoch_offset(e) for e in range(1, 9)]
    assert offsets != [WindowStream(ids, B, T, offset_seed=4).epoch_offset(e) for e in range(1, 9)]
    assert stream.epoch_offset(0) == plain.epoch_offset(5) == 0
    for epoch in range(1, 4):
        rows = batchify(np.roll(ids, -stream.epoch_offset(epoch)), B)  # (B, L)
        for k in range(n):
            x, y, new_epoch = stream.next_window()
            assert new_epoch == (k == 0) and stream.epoch == epoch + (k == n - 1)
            assert x.dtype == y.dtype == np.int64 and x.flags.c_contiguous
            np.testing.assert_array_equal(x, rows[:, k * T : k * T + T].T)
            np.testing.assert_array_equal(y, rows[:, k * T + 1 : k * T + T + 1].T)


def test_random_offset_splits_by_columns() -> None:
    """An MPI rank's block of streams reads its columns of the whole batch's windows."""
    ids = np.random.default_rng(0).integers(0, 50, size=500).astype(np.uint8)
    whole = WindowStream(ids, 4, 7, offset_seed=11)
    half = WindowStream(ids, 4, 7, offset_seed=11, columns=slice(2, 4))
    for _ in range(60):  # 17 windows an epoch
        (x, y, flag), (hx, hy, hflag) = whole.next_window(), half.next_window()
        np.testing.assert_array_equal(hx, x[:, 2:4])
        np.testing.assert_array_equal(hy, y[:, 2:4])
        assert hflag == flag


def test_load_state_dict_refuses_a_different_layout() -> None:
    ids = np.arange(500) % 7
    state = WindowStream(ids, 3, 7).state_dict()
    with pytest.raises(DataError, match="does not fit"):
        WindowStream(ids, 4, 7).load_state_dict(state)
    with pytest.raises(DataError, match="does not fit"):
        WindowStream(ids, 3, 7).load_state_dict({"epoch": 0, "position": 10**6})


def test_short_corpus_is_refused_with_the_numbers() -> None:
    ids = np.arange(20) % 3
    with pytest.raises(DataError, match=r"20 characters.*4 x 6 = 24"):
        WindowStream(ids, batch_size=4, seq_length=5)
    assert len(WindowStream(np.arange(24) % 3, batch_size=4, seq_length=5)) == 1


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 300),
    batch_size=st.integers(1, 9),
    seq_length=st.integers(1, 20),
)
def test_eval_windows_score_every_target_once(n: int, batch_size: int, seq_length: int) -> None:
    ids = np.arange(n, dtype=np.int64)  # id == position, so y tells which target is scored
    scored: list[int] = []
    streams = None
    for x, y, mask in eval_windows(ids, batch_size, seq_length):
        assert x.shape == y.shape == mask.shape
        assert 1 <= x.shape[0] <= seq_length and x.shape[1] <= batch_size
        assert mask.dtype == bool
        streams = x.shape[1] if streams is None else streams
        assert x.shape[1] == streams
        np.testing.assert_array_equal(y[mask], x[mask] + 1)  # each input predicts the next
        assert not x[~mask].any() and not y[~mask].any()
        scored.extend(y[mask].tolist())
    assert sorted(scored) == list(range(1, n))
    assert len(scored) == max(n - 1, 0)
    if n >= 2:
        assert streams == min(batch_size, max(1, (n - 1) // seq_length))


def test_eval_windows_streams_are_contiguous() -> None:
    ids = np.arange(12)
    windows = list(eval_windows(ids, batch_size=3, seq_length=2))
    y = np.concatenate([w[1] for w in windows])  # (T_total, B)
    mask = np.concatenate([w[2] for w in windows])
    # 11 targets in 3 streams of 4, 4, 3
    assert y[:, 0].tolist() == [1, 2, 3, 4]
    assert y[:, 1].tolist() == [5, 6, 7, 8]
    assert y[:, 2][mask[:, 2]].tolist() == [9, 10, 11]
    assert mask[:, 2].tolist() == [True, True, True, False]
