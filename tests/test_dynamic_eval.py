"""Dynamic evaluation (`charrnn eval --dynamic`, charrnn.dynamic): it never learns from a
character before scoring it, it does learn, lr 0 is static, the checkpoint is untouched."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
from charrnn.cli import cli
from charrnn.dynamic import DEFAULT_SEQ, DynamicEvaluator, dynamic_score
from charrnn.errors import ArgumentError
from charrnn.evaluate import score
from charrnn.model import CharRNN, ModelShape

V = 48
TEXT = "".join(f"{w} the cat sat on a mat, and then it ran.\n"
               for w in ("Then", "So", "And", "But", "Yet", "Now") * 60)


def random_model(dtype: str = "float32", cell: str = "lstm") -> CharRNN:
    shape = ModelShape(cell=cell, vocab_size=V, hidden_size=32, num_layers=1, embedding_size=8)
    return CharRNN.create(shape, seed=0, dtype=dtype)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LSTM trained through charrnn.train: (its best checkpoint, a held-out file)."""
    tmp = tmp_path_factory.mktemp("dyn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE_DIR", str(tmp / "cache"))
        (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
        charrnn.train({
            "data": {"path": str(tmp / "corpus.txt"), "val_fraction": 0.1},
            "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 1, "embedding_size": 8},
            "train": {"batch_size": 8, "seq_length": 32, "max_steps": 30,
                      "learning_rate": 0.02, "eval_every": 30, "log_every": 10},
            "output": {"dir": str(tmp / "run")},
        }, echo=lambda _: None)
    held_out = tmp / "held_out.txt"
    held_out.write_text(TEXT[:1500] + "☃", encoding="utf-8")  # one unknown character
    return tmp / "run" / "best.safetensors", held_out


# -- 1. never peeking ------------------------------------------------------------------------


def test_fresh_random_text_gains_nothing_and_a_peeking_update_would_show() -> None:
    """Every segment is fresh uniform noise: no predictor that has not seen a character can
    beat ln(V) on it, whatever it learned before. With a huge lr, the honest order (score,
    then learn) stays at or above both ln V and the static loss; the peeking order (learn on
    the segment, then score it) memorises it and drops far below: the check catches peeking."""
    model = random_model()
    ids = np.random.default_rng(1).integers(0, V, 2001)  # (N,)
    honest = dynamic_score(model, ids, seq_length=8, lr=0.3, decay=0.0)
    peeking = dynamic_score(model, ids, seq_length=8, lr=0.3, decay=0.0, peek=True)
    assert honest.chars == peeking.chars == 2000
    assert honest.static_loss == peeking.static_loss
    assert honest.loss >= honest.static_loss - 0.02
    assert honest.loss >= math.log(V) - 0.05
    assert peeking.loss < math.log(V) - 0.8  # what peeking would look like
    assert peeking.loss < honest.static_loss - 0.8


def test_the_first_segment_is_scored_with_the_trained_weights() -> None:
    """The update after segment k only touches segment k+1: the score of a prefix does not
    depend on what follows it (here: the same first two segments, different third ones)."""
    model = random_model()
    rng = np.random.default_rng(2)
    a = rng.integers(0, V, 33)  # (33,): two segments of 16 and the id before the third
    tail1, tail2 = rng.integers(0, V, 16), rng.integers(0, V, 16)
    ev1, ev2 = DynamicEvaluator(model, 0.1, 0.0), DynamicEvaluator(model, 0.1, 0.0)
    for ev, tail in ((ev1, tail1), (ev2, tail2)):
        ids = np.concatenate([a, tail])
        ev.nll = [ev.segment(ids[s:s + 16, None], ids[s + 1:s + 17, None])
                  for s in range(0, 48, 16)]
    assert ev1.nll[:2] == ev2.nll[:2]
    assert ev1.nll[2] != ev2.nll[2]


# -- 2. the updates do learn --------------------------------------------------------------


def test_a_repeated_block_is_learned() -> None:
    """A random block repeated 8 times: the static model cannot know it, the dynamic one
    learns it from the copies already scored and predicts the later ones far better."""
    model = random_model()
    block = np.random.default_rng(3).integers(0, V, 100)  # (100,)
    r = dynamic_score(model, np.tile(block, 8), seq_length=20, lr=0.03, decay=0.0)
    assert r.static_loss > math.log(V) - 0.1
    assert r.loss < r.static_loss - 0.8
    assert r.gain_bpc == pytest.approx((r.static_loss - r.loss) / math.log(2))


def test_decay_pulls_back_toward_the_trained_weights() -> None:
    model = random_model()
    block = np.random.default_rng(3).integers(0, V, 100)
    free = dynamic_score(model, np.tile(block, 8), seq_length=20, lr=0.03, decay=0.0)
    pulled = dynamic_score(model, np.tile(block, 8), seq_length=20, lr=0.03, decay=0.5)
    assert free.loss < pulled.loss < free.static_loss


# -- 3. lr 0 is static; one segment is static ------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lr_zero_is_the_static_one_stream_score_exactly(dtype: str) -> None:
    model = random_model(dtype)
    ids = np.random.default_rng(4).integers(0, V, 1001)
    for decay in (0.0, 0.3):
        r = dynamic_score(model, ids, seq_length=50, lr=0.0, decay=decay)
        assert r.loss == r.static_loss and r.chars == 1000
    total, chars = score(model, ids, batch_size=1, seq_length=50)  # the one-stream layout
    assert (r.static_loss, r.chars) == (total / chars, chars)
    adapted = dynamic_score(model, ids, seq_length=50, lr=0.01, decay=0.0)
    assert adapted.loss != adapted.static_loss  # the test above is not vacuous
    assert adapted.static_loss == r.static_loss


def test_a_text_of_one_segment_scores_as_without_dynamic(trained) -> None:
    ckpt, _ = trained
    m = charrnn.load(ckpt)
    text = TEXT[:120]
    static = m.score(text)  # the usual eval: batch 64, windows of 256
    dyn = m.score(text, dynamic=True, dynamic_lr=1.0, seq_length=200)
    assert (dyn.loss, dyn.chars) == (static.loss, static.chars)
    assert dyn.static_loss == static.loss
    longer = m.score(TEXT[:600], dynamic=True, dynamic_lr=1e-2, seq_length=200)
    assert longer.loss != longer.static_loss  # more than one segment: adaptation shows


def test_the_model_is_not_changed_in_memory(trained) -> None:
    ckpt, held_out = trained
    m = charrnn.load(ckpt)
    before = m.score_file(held_out)
    m.score_file(held_out, dynamic=True, dynamic_lr=0.1)
    assert m.score_file(held_out) == before


# -- 4. the checkpoint file is untouched -----------------------------------------------------


def test_the_checkpoint_file_is_byte_identical_after_cli_dynamic_eval(trained) -> None:
    ckpt, held_out = trained
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    mtime = ckpt.stat().st_mtime_ns
    r = run("eval", "--checkpoint", str(ckpt), "--text", str(held_out), "--dynamic",
            "--dynamic-lr", "0.05", "--json")
    assert r.exit_code == 0, r.output
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert ckpt.stat().st_mtime_ns == mtime
    assert json.loads(r.stdout)["loss"] != json.loads(r.stdout)["static_loss"]  # it adapted


# -- 5. the command line ------------------------------------------------------------------


def test_json_has_the_dynamic_keys_and_the_api_numbers(trained) -> None:
    ckpt, held_out = trained
    r = run("eval", "--checkpoint", str(ckpt), "--text", str(held_out), "--dynamic", "--json",
            "--dynamic-lr", "0.001", "--dynamic-decay", "0.01", "--no-progress")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # exactly one object
    assert {"loss", "bpc", "perplexity", "chars", "unknown_chars", "dynamic", "static_loss",
            "static_bpc", "static_perplexity", "gain_bpc", "seq_length", "dynamic_lr",
            "dynamic_decay"} == set(out)
    assert out["dynamic"] is True
    assert out["seq_length"] == DEFAULT_SEQ  # the --dynamic default, not 256
    assert (out["dynamic_lr"], out["dynamic_decay"]) == (0.001, 0.01)
    assert out["chars"] == 1499 and out["unknown_chars"] == 1
    api = charrnn.load(ckpt).score_file(held_out, dynamic=True, dynamic_lr=0.001,
                                       dynamic_decay=0.01)
    assert out == json.loads(json.dumps(api.to_json()))
    assert out["bpc"] == pytest.approx(out["loss"] / math.log(2))
    assert out["gain_bpc"] == pytest.approx(out["static_bpc"] - out["bpc"])
    # the static numbers are those of plain eval with one stream and the same windows
    static = run("eval", "--checkpoint", str(ckpt), "--text", str(held_out), "--json",
                 "--batch-size", "1", "--seq-length", str(DEFAULT_SEQ))
    assert json.loads(static.stdout)["loss"] == out["static_loss"]
    explicit = run("eval", "--checkpoint", str(ckpt), "--text", str(held_out), "--dynamic",
                   "--json", "--seq-length", "256")
    assert json.loads(explicit.stdout)["seq_length"] == 256


def test_human_output_states_both_and_the_gain(trained) -> None:
    ckpt, held_out = trained
    r = run("eval", "--checkpoint", str(ckpt), "--text", str(held_out), "--dynamic",
            "--progress")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "(dynamic)" in out and "static" in out and "gain" in out
    assert "chars       1499" in out and "unknown     1 (skipped)" in out
    assert "dynamic eval" in r.stderr  # the bar goes to stderr only
    plain = run("eval", "--checkpoint", str(ckpt), "--text", str(held_out))
    assert "static" not in plain.stdout and "dynamic" not in plain.stdout


def test_help_says_the_loss_is_counted_before_the_update() -> None:
    text = " ".join(run("eval", "--help").stdout.split())
    assert "Each segment's loss is counted first" in text
    assert "only then is the segment used for an update" in text
    for option in ("--dynamic-lr", "--dynamic-decay", "--seq-length"):
        assert option in text
    assert "[default: 0.0003; x>=0]" in text or "default:" in text


@pytest.mark.parametrize("args, name", [
    (["--dynamic", "--dynamic-lr", "-1"], "--dynamic-lr"),
    (["--dynamic", "--dynamic-lr", "nan"], "--dynamic-lr"),
    (["--dynamic", "--dynamic-lr", "inf"], "--dynamic-lr"),
    (["--dynamic", "--dynamic-lr", "fast"], "--dynamic-lr"),
    (["--dynamic", "--dynamic-decay", "1.5"], "--dynamic-decay"),
    (["--dynamic", "--seq-length", "0"], "--seq-length"),
    (["--dynamic-lr", "0.01"], "--dynamic-lr"),  # without --dynamic
])
def test_bad_values_are_one_line_exit_2(trained, args, name) -> None:
    ckpt, held_out = trained
    r = run("eval", "--checkpoint", str(ckpt), "--text", str(held_out), *args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 4 and lines[-1].startswith("Error:") and name in lines[-1], lines


def test_api_refuses_bad_rates(trained) -> None:
    m = charrnn.load(trained[0])
    for kwargs in ({"dynamic_lr": -1.0}, {"dynamic_lr": float("nan")},
                   {"dynamic_decay": 2.0}, {"dynamic_lr": "x"}, {"seq_length": 0}):
        with pytest.raises(ArgumentError):
            m.score(TEXT[:300], dynamic=True, **kwargs)
