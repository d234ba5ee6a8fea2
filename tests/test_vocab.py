from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.errors import VocabError
from charrnn.vocab import Vocab

# any characters but surrogates, non-BMP ones included
texts = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=200)


@settings(max_examples=200, deadline=None)
@given(texts)
def test_build_encode_decode_round_trip(text: str) -> None:
    vocab = Vocab.build([text])
    ids, n_unknown = vocab.encode(text)
    assert n_unknown == 0
    assert ids.dtype == vocab.dtype
    assert len(ids) == len(text)
    assert vocab.decode(ids) == text
    assert vocab.chars == sorted(set(text), key=ord)
    assert sum(vocab.counts) == len(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(texts, max_size=5))
def test_build_counts_chunk_by_chunk(chunks: list[str]) -> None:
    whole = "".join(chunks)
    vocab = Vocab.build(chunks)
    assert vocab == Vocab.build([whole])
    assert dict(zip(vocab.chars, vocab.counts, strict=True)) == {
        ch: whole.count(ch) for ch in set(whole)
    }


@settings(max_examples=100, deadline=None)
@given(texts, texts)
def test_vectorized_encode_matches_naive_loop(known: str, text: str) -> None:
    vocab = Vocab.build([known])
    naive = [vocab.stoi[ch] for ch in text if ch in vocab.stoi]
    ids, n_unknown = vocab.encode(text, unknown="skip")
    assert ids.tolist() == naive
    assert n_unknown == sum(ch not in vocab.stoi for ch in text)


def test_dtype_fits_size() -> None:
    assert Vocab([chr(i) for i in range(256)]).dtype == np.uint8
    assert Vocab([chr(i) for i in range(257)]).dtype == np.uint16
    assert Vocab([chr(i) for i in range(65536 + 1) if not 0xD800 <= i < 0xE000]).dtype == (
        np.uint16
    )
    assert Vocab([chr(i) for i in range(70000)]).dtype == np.uint32
    big = Vocab([chr(i) for i in range(300)])
    ids, _ = big.encode(chr(299) + chr(0))
    assert ids.dtype == np.uint16 and ids.tolist() == [299, 0]


def test_encode_unknown_error_lists_characters() -> None:
    vocab = Vocab.build(["abc"])
    with pytest.raises(VocabError) as info:
        vocab.encode("abxzx€\n")
    message = str(info.value)
    assert "\n" not in message
    assert "'x'" in message and "'z'" in message and "'€'" in message and "'\\n'" in message
    assert "5 occurrence" in message


def test_encode_unknown_error_names_at_most_ten() -> None:
    vocab = Vocab.build(["a"])
    with pytest.raises(VocabError, match="and 5 more"):
        vocab.encode("".join(chr(0x100 + i) for i in range(15)))


def test_encode_unknown_skip_counts() -> None:
    vocab = Vocab.build(["abc"])
    ids, n_unknown = vocab.encode("a😀bxxc", unknown="skip")
    assert vocab.decode(ids) == "abc"
    assert n_unknown == 3
    assert vocab.unknown_chars("a😀bxxc") == {"😀": 1, "x": 2}
    with pytest.raises(ValueError):
        vocab.encode("abc", unknown="ignore")


def test_encode_empty_text() -> None:
    ids, n_unknown = Vocab.build(["ab"]).encode("")
    assert ids.shape == (0,) and n_unknown == 0


def test_decode_refuses_out_of_range_ids() -> None:
    vocab = Vocab.build(["ab"])
    assert vocab.decode([1, 0]) == "ba"
    with pytest.raises(VocabError, match="id 2"):
        vocab.decode([0, 2])
    with pytest.raises(VocabError, match="id -1"):
        vocab.decode(np.array([-1]))


def test_json_round_trip(tmp_path) -> None:
    vocab = Vocab.build(["héllo wörld 😀\n\t\"'\\"])
    assert Vocab.from_json(vocab.to_json()) == vocab
    assert Vocab.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocab.load(path) == vocab
    assert json.loads(path.read_text("utf-8"))["chars"] == vocab.chars
    assert list(tmp_path.iterdir()) == [path]


def test_json_keeps_the_saved_order() -> None:
    vocab = Vocab.from_json({"chars": ["b", "a"], "counts": [1, 2]})
    assert vocab.encode("ab")[0].tolist() == [1, 0]


def test_save_handles_lone_surrogates(tmp_path) -> None:
    vocab = Vocab(["a", "\ud800"], [1, 1])
    vocab.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == vocab
    assert vocab.decode(vocab.encode("\ud800a")[0]) == "\ud800a"


@pytest.mark.parametrize(
    "data",
    [
        [],
        {},
        {"chars": "abc"},
        {"chars": []},
        {"chars": ["a", "bc"]},
        {"chars": ["a", 1]},
        {"chars": ["a", "a"]},
        {"chars": ["a", "b"], "counts": [1]},
        {"chars": ["a"], "counts": ["1"]},
        {"chars": ["a"], "counts": [-1]},
        {"chars": ["a"], "counts": [True]},
    ],
)
def test_from_json_refuses_malformed(data) -> None:
    with pytest.raises(VocabError):
        Vocab.from_json(data)


def test_load_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(VocabError, match="missing.json"):
        Vocab.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(VocabError, match="bad.json"):
        Vocab.load(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(VocabError, match="binary.json"):
        Vocab.load(binary)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"chars": ["a", "a"]}')
    with pytest.raises(VocabError, match="wrong.json.*repeats"):
        Vocab.load(wrong)
