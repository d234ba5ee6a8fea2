"""`charrnn lab cold-start`: the positions (paragraph starts) and their seeds (the first
line), cold and warm losses of the predictions after the seed against an independent
one-step-at-a-time loop, seeds of different lengths in one call, context 0, a model whose
zero state is special, the JSON, the errors, and that the checkpoint is only read."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn.checkpoint import save_checkpoint
from charrnn.cli import cli
from charrnn.config import config_from_dict
from charrnn.lab.coldstart import (
    choose_positions,
    cold_warm_nll,
    encode_keeping_places,
    paragraph_starts,
    recovery_offset,
    seed_ends,
)
from charrnn.model import CharRNN, ModelShape, param_shapes
from charrnn.vocab import Vocab

NAMES = ("ROMEO", "JULIET", "NURSE", "TYBALT", "FRIAR", "PETER", "LADY CAPULET", "BOY")
BODY = ("the cat sat on the mat and the dog ran far.", "so it goes, and so it went on.",
        "a bird sang to the moon.")
TEXT = "".join(f"{NAMES[i % 8]}:\n{BODY[i % 3]}\n{BODY[(i + 1) % 3]}\n\n" for i in range(40))
VOCAB = Vocab.build([TEXT])


def reference_starts(text: str, with_seeds: bool = False) -> list:
    """Paragraph starts by walking the lines in Python: a non-empty line after an empty one;
    with_seeds: (start, seed) pairs, the seed being the line without its ending."""
    out, at, previous_blank = [], 0, False
    for line in text.split("\n"):
        body = line.removesuffix("\r")
        if previous_blank and body:
            out.append((at, body) if with_seeds else at)
        previous_blank = body == ""
        at += len(line) + 1
    return out


def test_paragraph_starts_on_a_constructed_text():
    text = ("HEAD\nbody\n\nA:\none\ntwo\n\n\nB:\nthree\n\nC:\r\n\r\nD:\nfour\n\n\n"
            " indented\n\n")
    got = paragraph_starts(text).tolist()
    expected = [text.index("A:"), text.index("B:"), text.index("C:"), text.index("D:"),
                text.index(" indented")]
    assert got == expected
    assert got == reference_starts(text)
    assert [text[p:p + 2] for p in got] == ["A:", "B:", "C:", "D:", " i"]
    # the real-looking text: every speaker line but the first (nothing blank before it)
    starts = paragraph_starts(TEXT).tolist()
    assert starts == reference_starts(TEXT)
    assert len(starts) == 39 and all(TEXT[p:].split("\n")[0].rstrip(":") in NAMES
                                     for p in starts)
    assert {TEXT[p:].index("\n") for p in starts} == {4, 6, 7, 13}  # several seed lengths
    assert paragraph_starts("").size == 0 and paragraph_starts("a\n\n").size == 0
    for odd in ("\nA", "\n\nA\n\n\n", "x\r\n\r\ny\r\n", "\r\nA\r\n\r", "a\n\r\n\rb\n\n",
                "\n", "\n\n", "a\nb\n\n c"):
        assert paragraph_starts(odd).tolist() == reference_starts(odd), repr(odd)


def test_seed_ends_are_the_first_line_without_its_ending():
    text = ("HEAD\nbody\n\nA:\none\ntwo\n\n\nB:\nthree\n\nC:\r\n\r\nD:\nfour\n\n\n"
            " indented\n\nLAST")
    starts = paragraph_starts(text)
    ends = seed_ends(text, starts)
    assert [text[p:e] for p, e in zip(starts, ends)] == ["A:", "B:", "C:", "D:", " indented",
                                                         "LAST"]
    assert [text[e] for e in ends[:-1]] == ["\n", "\n", "\r", "\n", "\n"]
    assert ends[-1] == len(text)  # the last line has no newline: no room after its seed
    for odd in (TEXT, "x\r\n\r\ny\r\n", "a\n\r\n\rb\n\n", "a\nb\n\n c", "\n\nA\n\n\n"):
        s = paragraph_starts(odd)
        got = [(int(p), odd[p:e]) for p, e in zip(s, seed_ends(odd, s))]
        assert got == reference_starts(odd, with_seeds=True), repr(odd)


def test_choose_positions_context_room_long_seeds_unknown_and_even_spread():
    text = TEXT.replace("far.", "far!", 1)  # '!' outside VOCAB, in the first paragraph
    ids = encode_keeping_places(text, VOCAB)
    assert (ids < 0).sum() == 1 and len(ids) == len(text)
    starts = paragraph_starts(text)
    ends = seed_ends(text, starts)
    bang = text.index("!")
    # all of them: every start with room, minus the one whose window holds the '!'
    found = choose_positions(starts, ends, ids, 60, 20, 1000)
    fits = [(p, e) for p, e in zip(starts, ends) if p >= 60 and e + 20 <= len(text)]
    bad = [p for p, e in fits if p - 60 <= bang < e + 20]
    assert found.candidates == len(fits) and found.skipped == len(bad) == 1
    assert found.long_seeds == 0 and found.usable == len(fits) - 1
    assert found.positions.tolist() == [p for p, _ in fits if p not in bad]
    assert found.ends.tolist() == [e for p, e in fits if p not in bad]
    # --max-seed: the seeds longer than it are not used and counted apart, not as skipped
    short = choose_positions(starts, ends, ids, 60, 20, 1000, max_seed=7)
    long = [p for p, e in fits if e - p > 7]
    assert len(long) > 0 and short.long_seeds == len(long) and short.skipped == 1
    assert short.positions.tolist() == [p for p, _ in fits if p not in bad and p not in long]
    assert all(e - p <= 7 for p, e in zip(short.positions, short.ends))
    # the predictions come after the seed: the room needed is counted from its end
    cut = text[: int(ends[-1]) + 20]
    s = paragraph_starts(cut)
    assert choose_positions(s, seed_ends(cut, s), encode_keeping_places(cut, VOCAB),
                            0, 20, 1000).positions[-1] == starts[-1]
    cut = cut[:-1]
    s = paragraph_starts(cut)
    assert choose_positions(s, seed_ends(cut, s), encode_keeping_places(cut, VOCAB),
                            0, 20, 1000).positions[-1] == starts[-2]
    # evenly spread, first and last included, distinct
    usable = found.positions.tolist()
    few = choose_positions(starts, ends, ids, 60, 20, 5)
    assert len(few.positions) == 5 and few.positions[0] == usable[0]
    assert few.positions[-1] == usable[-1]
    idx = [usable.index(p) for p in few.positions]
    assert np.ptp(np.diff(idx)) <= 1, idx
    assert few.ends.tolist() == [found.ends[i] for i in idx]
    assert choose_positions(starts, ends, ids, 60, 20, 1).positions.tolist() == [usable[0]]


def make_model(cell: str, layers: int = 2, embedding: int = 4, H: int = 7, seed: int = 1,
               dtype: str = "float64") -> CharRNN:
    model = CharRNN.create(ModelShape(cell, VOCAB.size, H, layers, embedding), seed, dtype)
    for k, w in model.params.items():  # some memory, so that the context matters
        if k.startswith("rnn.weight_hh"):
            w *= 1.5
    return model


def log_softmax_nll(logits: np.ndarray, target: int) -> float:
    z = np.asarray(logits, np.float64).ravel()
    m = z.max()
    return float(m + math.log(np.exp(z - m).sum()) - z[target])


def reference_cold_warm(model: CharRNN, text: str, ids, positions, context, predictions):
    """One position at a time, one character at a time, through the Stepper: find the seed
    (the line at p, up to its newline), read the context (warm only) and the seed, then
    score the predictions after it."""
    stepper = model.stepper()
    cold = np.zeros((len(positions), predictions))
    warm = np.zeros_like(cold)
    for b, p in enumerate(positions):
        e = text.index("\n", p)
        for out, first in ((cold, p), (warm, p - context)):
            state = model.zero_state(1)
            for t in range(first, e):  # the context (none for cold), then the seed
                logits, state = stepper.step(np.array([ids[t]]), state)
            for k in range(predictions):  # logits: after text[e+k-1]; target text[e+k]
                out[b, k] = log_softmax_nll(logits[0], int(ids[e + k]))
                logits, state = stepper.step(np.array([ids[e + k]]), state)
    return cold, warm


def chosen(text, ids, context, predictions, lines, max_seed=40):
    starts = paragraph_starts(text)
    return choose_positions(starts, seed_ends(text, starts), ids, context, predictions, lines,
                            max_seed)


@pytest.mark.parametrize("cell, layers, embedding", [
    ("lstm", 2, 4), ("gru", 2, 0), ("rnn", 1, 4), ("gru", 1, 5),
])
def test_cold_and_warm_agree_with_a_per_position_loop(cell, layers, embedding):
    model = make_model(cell, layers, embedding)
    ids = encode_keeping_places(TEXT, VOCAB)
    found = chosen(TEXT, ids, 50, 12, 13)
    assert len(found.positions) == 13
    assert len(set((found.ends - found.positions).tolist())) == 4  # seed lengths 4, 6, 7, 13
    cold, warm = cold_warm_nll(model, ids, found.positions, found.ends, 50, 12)
    ref_cold, ref_warm = reference_cold_warm(model, TEXT, ids, found.positions, 50, 12)
    np.testing.assert_allclose(cold, ref_cold, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(warm, ref_warm, rtol=1e-10, atol=1e-10)
    assert np.abs(cold - warm).max() > 1e-3  # the context did change something
    # each position alone gives the same: the groups by seed length do not interact
    for b in (0, 5, 12):
        c, w = cold_warm_nll(model, ids, found.positions[b:b + 1], found.ends[b:b + 1], 50, 12)
        np.testing.assert_allclose(c[0], cold[b], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(w[0], warm[b], rtol=1e-12, atol=1e-12)


def test_float32_agrees_to_float_rounding():
    model = make_model("lstm", dtype="float32")
    ids = encode_keeping_places(TEXT, VOCAB)
    found = chosen(TEXT, ids, 30, 8, 6)
    cold, warm = cold_warm_nll(model, ids, found.positions, found.ends, 30, 8)
    ref_cold, ref_warm = reference_cold_warm(model, TEXT, ids, found.positions, 30, 8)
    np.testing.assert_allclose(cold, ref_cold, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(warm, ref_warm, rtol=1e-4, atol=1e-5)


def test_context_zero_makes_cold_and_warm_identical(tmp_path, config_dict):
    model = make_model("gru")
    ids = encode_keeping_places(TEXT, VOCAB)
    found = chosen(TEXT, ids, 0, 20, 64)
    cold, warm = cold_warm_nll(model, ids, found.positions, found.ends, 0, 20)
    assert np.array_equal(cold, warm)
    ckpt, text = write_checkpoint(tmp_path, model, config_dict), write_text(tmp_path)
    d = run_json(ckpt, text, "--context", "0")
    assert d["gap"] == 0.0 and d["cold_loss"] == d["warm_loss"]
    assert d["per_offset"]["cold"] == d["per_offset"]["warm"]
    assert d["recovery_offset"] == 1
    assert d["positions"] == 39  # every speaker line after the first


LATCH_TEXT = "".join(f"{'X' * (1 + i % 3)}\nXXXXXXXXXX\nZ, Y Y Z. YYYYYYYYYYYY\n\n"
                     for i in range(30))
LATCH_VOCAB = Vocab.build([LATCH_TEXT])


def latch_model(sign: float) -> CharRNN:
    """A one-unit rnn whose unit is a latch: it stays exactly 0 from the zero state until a
    'Z' is read, then holds near +1 (recurrent weight 3). The head turns the unit into a
    logit for 'X' (every other logit is 0): sign +1, 8 u (the context helps: cold is
    uniform, ln V); sign -1, 8 - 8 u (the zero state is the good one: the bias does the
    predicting, the latch cancels it)."""
    V = LATCH_VOCAB.size
    shape = ModelShape("rnn", V, 1, 1, 0)
    x, z = LATCH_VOCAB.stoi["X"], LATCH_VOCAB.stoi["Z"]
    p = {k: np.zeros(s) for k, s in param_shapes(shape).items()}
    p["rnn.weight_ih_l0"][0, z] = 5.0
    p["rnn.weight_hh_l0"][0, 0] = 3.0
    if sign > 0:
        p["head.weight"][x, 0] = 8.0
    else:
        p["head.bias"][x] = 8.0
        p["head.weight"][x, 0] = -8.0
    return CharRNN(shape, p)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_model_whose_zero_state_is_special_gives_the_expected_sign(sign):
    """Seeds "X", "XX", "XXX" (three lengths, so three groups), then the predictions
    "\n" and 7 X's. No Z in the seed or the predictions: cold stays at the exact zero state
    throughout, as it would not after a pad character; warm's context holds a Z."""
    model = latch_model(sign)
    ids = encode_keeping_places(LATCH_TEXT, LATCH_VOCAB)
    found = chosen(LATCH_TEXT, ids, 24, 8, 64)
    assert len(found.positions) == 29
    assert {LATCH_TEXT[p:e] for p, e in zip(found.positions, found.ends)} == {"X", "XX", "XXX"}
    assert all("Z" in LATCH_TEXT[p - 24 : p] for p in found.positions)
    cold, warm = cold_warm_nll(model, ids, found.positions, found.ends, 24, 8)
    V = LATCH_VOCAB.size
    u = 1.0  # just after a Z
    for _ in range(60):  # the latch's fixed point, reading other characters after a Z
        u = math.tanh(3 * u)
    logit = 8.0 * u if sign > 0 else 8.0 - 8.0 * u  # warm's logit for X
    cold_logit = 0.0 if sign > 0 else 8.0
    # offset 1 predicts the newline (logit 0), offsets 2..8 an X
    for out, lx in ((cold, cold_logit), (warm, logit)):
        lse = math.log(V - 1 + math.exp(lx))
        np.testing.assert_allclose(out[:, 0], lse, rtol=1e-9)
        np.testing.assert_allclose(out[:, 1:], lse - lx, rtol=1e-9)
    if sign > 0:  # cold: all logits zero, uniform, exactly
        assert (cold == cold[0, 0]).all() and cold[0, 0] == pytest.approx(math.log(V), 1e-15)
        assert (cold[:, 1:] > warm[:, 1:] + 1).all()
        assert recovery_offset(cold.mean(0), warm.mean(0)) is None
    else:  # cold: the bias's margin of 8, warm: cancelled by the latch
        assert (cold[:, 1:] < warm[:, 1:] - 1).all()


def test_recovery_offset():
    warm = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    assert recovery_offset(np.array([3.0, 1.05, 1.5, 1.09, 0.95]), warm) == 4
    assert recovery_offset(warm, warm) == 1
    assert recovery_offset(np.array([1.0, 1.0, 1.0, 1.0, 1.2]), warm) is None


# -- the command line ------------------------------------------------------------------------


def write_checkpoint(tmp_path: Path, model: CharRNN, config_dict, vocab: Vocab = VOCAB,
                     name: str = "m.safetensors") -> Path:
    s = model.shape
    cfg = config_from_dict(config_dict(tmp_path / "corpus.txt", tmp_path / "run", model={
        "cell": s.cell, "hidden_size": s.hidden_size, "num_layers": s.num_layers,
        "embedding_size": s.embedding_size}, train={"dtype": str(model.dtype)}))
    path = tmp_path / name
    save_checkpoint(path, model.params, config=cfg, vocab=vocab, step=1)
    return path


def write_text(tmp_path: Path, text: str = TEXT, name: str = "val.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run(*args: str):
    return CliRunner().invoke(cli, ["lab", "cold-start", *map(str, args)],
                              catch_exceptions=False)


def run_json(ckpt, text, *args):
    result = run("--checkpoint", ckpt, "--text", text, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


KEYS = {"cold_loss", "warm_loss", "gap", "positions", "predictions", "context", "per_offset",
        "max_cold", "recovery_offset", "skipped", "max_seed", "long_seeds"}


def test_json_keys_and_values_match_the_measurement(tmp_path, config_dict):
    model = make_model("lstm")
    ckpt = write_checkpoint(tmp_path, model, config_dict)
    text = write_text(tmp_path, TEXT.replace("far.", "far!", 2))  # two windows skipped
    d = run_json(ckpt, text, "--lines", "10", "--predictions", "7", "--context", "40",
                 "--max-seed", "12")  # not "LADY CAPULET:", 13 characters
    assert set(d) == KEYS and set(d["per_offset"]) == {"cold", "warm"}
    assert (d["positions"], d["predictions"], d["context"], d["max_seed"]) == (10, 7, 40, 12)
    assert d["skipped"] >= 1
    chars = text.read_text(encoding="utf-8")
    ids = encode_keeping_places(chars, VOCAB)
    found = chosen(chars, ids, 40, 7, 10, max_seed=12)
    assert found.skipped == d["skipped"] and found.long_seeds == d["long_seeds"] == 5
    cold, warm = cold_warm_nll(model, ids, found.positions, found.ends, 40, 7)
    assert d["cold_loss"] == pytest.approx(cold.mean(), rel=1e-12)
    assert d["warm_loss"] == pytest.approx(warm.mean(), rel=1e-12)
    assert d["gap"] == pytest.approx(d["cold_loss"] - d["warm_loss"], abs=1e-12)
    np.testing.assert_allclose(d["per_offset"]["cold"], cold.mean(0), rtol=1e-12)
    np.testing.assert_allclose(d["per_offset"]["warm"], warm.mean(0), rtol=1e-12)
    assert d["max_cold"] == pytest.approx(cold.mean(1).max(), rel=1e-12)
    assert d["recovery_offset"] == recovery_offset(cold.mean(0), warm.mean(0))


def test_table(tmp_path, config_dict):
    ckpt = write_checkpoint(tmp_path, latch_model(1.0), config_dict, LATCH_VOCAB)
    text = write_text(tmp_path, LATCH_TEXT)
    result = run("--checkpoint", ckpt, "--text", text, "--context", "24", "--predictions", "8")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "29 positions (all of them)" in out and "0 skipped" in out
    assert "0 not used for a first line longer than 40 characters" in out
    assert "first line (1-3 characters" in out and "predicts the 8 characters after it" in out
    assert f"cold loss   {math.log(LATCH_VOCAB.size):.4f}" in out
    assert "recovery    never" in out
    assert [ln.split()[0] for ln in out.splitlines() if ln[:6].strip().isdigit()] == \
        ["1", "2", "3", "4", "5", "8"]


def test_the_checkpoint_is_only_read(tmp_path, config_dict):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = write_checkpoint(run_dir, make_model("gru"), config_dict, name="best.safetensors")
    before = (hashlib.sha256(ckpt.read_bytes()).hexdigest(), ckpt.stat().st_mtime_ns)
    listing = sorted(p.name for p in run_dir.iterdir())
    text = write_text(tmp_path)
    d = run_json(run_dir, text)  # a run directory: its best; the defaults
    assert (d["positions"], d["context"], d["predictions"]) == (
        sum(p >= 200 for p in reference_starts(TEXT)), 200, 20)
    assert (hashlib.sha256(ckpt.read_bytes()).hexdigest(), ckpt.stat().st_mtime_ns) == before
    assert sorted(p.name for p in run_dir.iterdir()) == listing


@pytest.mark.parametrize("case, args, words", [
    ("missing text", ["--text", "{tmp}/nope.txt"], ["nope.txt", "no such file"]),
    ("missing checkpoint", ["--checkpoint", "{tmp}/nope.safetensors"], ["nope.safetensors"]),
    ("no blank line", ["--text", "{tmp}/flat.txt"], ["flat.txt", "blank line"]),
    ("too short", ["--text", "{tmp}/short.txt"], ["short.txt", "too short"]),
    ("no room", ["--context", "{noroom}", "--predictions", "1"], ["none of its 39"]),
    ("all seeds long", ["--max-seed", "3"], ["all 37", "longer than --max-seed 3"]),
    ("all unknown", ["--text", "{tmp}/unknown.txt"], ["outside the vocabulary"]),
])
def test_errors_exit_2_in_one_line(tmp_path, config_dict, case, args, words):
    ckpt = write_checkpoint(tmp_path, make_model("rnn", 1), config_dict)
    text = write_text(tmp_path)
    write_text(tmp_path, "ROMEO:\nthe cat sat on the mat.\n" * 20, "flat.txt")
    write_text(tmp_path, "\n\nROMEO:\nthe cat\n", "short.txt")
    write_text(tmp_path, TEXT.replace("\n\n", "\n\n%"), "unknown.txt")
    base = {"--checkpoint": str(ckpt), "--text": str(text)}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1].format(tmp=tmp_path, noroom=len(TEXT) - 30)
    result = run(*[a for kv in base.items() for a in kv])
    assert result.exit_code == 2, (case, result.output)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error:"), err
    for w in words:
        assert w in err[0], err
    assert result.stdout == ""


def test_help_shows_every_option_and_its_default():
    result = run("--help")
    assert result.exit_code == 0
    out = result.output
    for option in ("--checkpoint", "--text", "--lines", "--predictions", "--context",
                   "--max-seed", "--json"):
        assert option in out
    for default in ("default: 64", "default: 20", "default: 200", "default: 40",
                    "default: off"):
        assert default in out
    assert "blank line" in out and "zero state" in out and "recovery" in out
    assert "seed" in out and "after the seed" in out
