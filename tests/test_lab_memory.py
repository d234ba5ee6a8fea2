"""`charrnn lab memory`: the echo stream's construction, scoring on echo positions only,
the seeds' echo task (L = 1) learned by a small RNN, equal parameter counts, the report."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn.cli import cli
from charrnn.errors import ConfigError
from charrnn.lab import echo, memory
from charrnn.model import CharRNN, ModelShape
from charrnn.vocab import Vocab

A = 8
# the 0.999 quantile of chi-square with A - 1 = 7 degrees of freedom
CHI2_7_999 = 24.32


def _stream(lag: int, chars: int = 200_000, seed: int = 3) -> np.ndarray:
    text = echo.generate(A, lag, chars // echo.block_length(lag) + 1, seed=seed)
    return np.frombuffer(text.encode("ascii"), np.uint8)  # (N,) character codes


@pytest.mark.parametrize("lag", [1, 2, 3, 16, 64, 128])
def test_stream_has_the_documented_construction(lag):
    s = _stream(lag)
    n = len(s)
    echo_at, fresh_at = echo.positions(n, lag)
    index = np.arange(n) % (lag + 2)
    letters = np.frombuffer(echo.symbols(A).encode(), np.uint8)
    # blocks of L + 2: STORE, the key, distractors, RECALL (none at L = 1), the echo
    assert (s[index == 0] == ord(echo.STORE)).all()
    if lag >= 2:
        assert (s[index == lag] == ord(echo.RECALL)).all()
    assert echo.RECALL not in s.tobytes().decode() or lag >= 2
    # every echo position holds exactly the character L steps earlier
    where = np.flatnonzero(echo_at)
    assert len(where) == n // (lag + 2)
    assert (s[where] == s[where - lag]).all()
    # everything that is neither a marker nor an echo is fresh: a data symbol ...
    assert (fresh_at | echo_at | (index == 0) | (index == lag)).all()
    assert np.isin(s[fresh_at], letters).all() and np.isin(s[echo_at], letters).all()
    # ... uniform over the A symbols within sampling error (chi-square, 7 d.o.f.)
    counts = np.array([(s[fresh_at] == c).sum() for c in letters])  # (A,)
    expected = counts.sum() / A
    assert ((counts - expected) ** 2 / expected).sum() < CHI2_7_999, counts
    # the echo is not copied from anywhere else: the character L + 1 back (STORE) or
    # L - 1 back (a distractor, or RECALL) agrees with it only by chance
    if lag >= 3:
        agree = (s[where] == s[where - lag + 1]).mean()
        assert abs(agree - 1 / A) < 0.05


def test_streams_differ_by_seed_and_repeat_by_seed():
    a = echo.generate(A, 8, 500, seed=[0, 0, 8])
    assert a == echo.generate(A, 8, 500, seed=[0, 0, 8])
    assert a != echo.generate(A, 8, 500, seed=[0, 1, 8])
    assert len(a) == 500 * 10


class Oracle:
    """A hand-made model with a perfect memory: it keeps the last L + 1 inputs, recognises
    an echo position from the markers (RECALL just read; at L = 1, STORE read the step
    before) and predicts the key with a logit margin of 30, `right` or one symbol off.
    Elsewhere it confidently predicts STORE, wrong on all but the block starts."""

    def __init__(self, vocab: Vocab, lag: int, right: bool = True):
        self.vocab, self.lag, self.right = vocab, lag, right
        self.store, self.recall = vocab.stoi[echo.STORE], vocab.stoi.get(echo.RECALL, -2)
        self.letters = np.array([vocab.stoi[c] for c in echo.symbols(A)])

    def frozen(self):
        return nullcontext()

    def zero_state(self, batch_size: int):
        return [(np.full((batch_size, self.lag + 1), -1),)]  # the last L + 1 inputs

    def forward(self, x, state):
        T, B = x.shape
        hist = state[0][0].copy()  # (B, L+1)
        logits = np.zeros((T, B, self.vocab.size))
        for t in range(T):
            hist = np.concatenate([hist[:, 1:], x[t][:, None]], axis=1)
            logits[t, :, self.store] = 30.0
            if self.lag == 1:
                at_echo = hist[:, -2] == self.store
            else:
                at_echo = hist[:, -1] == self.recall
            key = hist[:, -self.lag]  # (B,) the input L - 1 steps before this one
            known = at_echo & (key >= 0)
            rank = np.searchsorted(self.letters, key[known])
            guess = self.letters[(rank + (0 if self.right else 1)) % A]
            logits[t, known, self.store] = 0.0
            logits[t, np.flatnonzero(known), guess] = 30.0
        return logits.reshape(T * B, -1), [(hist,)], None


@pytest.mark.parametrize("lag", [1, 2, 5, 40])
def test_echo_loss_is_scored_on_the_echo_positions_only(lag):
    text = echo.generate(A, lag, 3000, seed=5)
    vocab = Vocab.build([text])
    ids, _ = vocab.encode(text)
    # right on the echoes, wrong almost everywhere else: the echo loss is ~0
    total, count = echo.echo_nll(Oracle(vocab, lag), ids, lag, batch_size=7, seq_length=13)
    assert total / count < 1e-9
    # every echo is scored once, except the first one of a stream that starts mid-block
    assert 3000 - 7 <= count <= 3000
    # wrong on every echo, the same elsewhere: the echo loss is the margin, 30 nats
    total, count = echo.echo_nll(Oracle(vocab, lag, right=False), ids, lag, batch_size=7,
                                 seq_length=13)
    assert total / count == pytest.approx(30.0, abs=1e-6)
    # one stream, the first 10 blocks only read (the state warming up): 10 echoes fewer
    total, count = echo.echo_nll(Oracle(vocab, lag), ids, lag, batch_size=1,
                                 warmup=10 * (lag + 2))
    assert count == 3000 - 10 and total / count < 1e-9


@pytest.mark.parametrize("params", [5_000, 20_000, 60_000])
@pytest.mark.parametrize("lag", [1, 8])
def test_equal_parameter_counts(params, lag):
    vocab = memory.vocab_size(A, lag)
    counts = {}
    for cell in memory.CELLS:
        hidden = memory.hidden_size_for(cell, vocab, params)
        model = CharRNN.create(ModelShape(cell, vocab, hidden, 1, 0), seed=0)
        counts[cell] = model.num_params
        assert model.num_params == memory.count_params(cell, vocab, hidden)
        assert abs(model.num_params - params) <= 0.05 * params
    assert max(counts.values()) - min(counts.values()) <= 0.05 * params
    # gated cells have fewer units for the same budget
    assert (memory.hidden_size_for("rnn", vocab, params)
            > memory.hidden_size_for("gru", vocab, params)
            > memory.hidden_size_for("lstm", vocab, params))


def test_impossible_parameter_budget_is_refused():
    with pytest.raises(ConfigError, match="--params 10"):
        memory.hidden_size_for("rnn", 10, 10)


def test_small_rnn_learns_the_seeds_echo_task(tmp_path):
    """L = 1, seq_length 16: y_t = x_{t-1} on the echo positions, learned to near zero."""
    row = memory.train_and_score("rnn", 1, 16, params=3000, steps=1000, seed=1,
                                 stop_below=0.02, workdir=tmp_path)
    assert row["loss"] < 0.05 and row["learned"], row
    assert row["params"] == pytest.approx(3000, rel=0.05)
    assert row["steps"] <= 1000 and row["echo_positions"] >= memory.HELD_OUT_BLOCKS
    assert list(tmp_path.iterdir()) == []  # the temporary training files are gone


def _report() -> dict:
    rows = []
    for cell in ("rnn", "lstm"):
        for seq in (16, 64):
            for lag in (1, 4, 32):
                loss = 0.01 if lag < seq and cell == "lstm" else 2.0
                rows.append({"cell": cell, "lag": lag, "seq_length": seq, "hidden_size": 10,
                             "params": 1000, "steps": 100, "loss": loss,
                             "learned": loss < 0.2, "horizon": None if lag == 1 else 7})
    return {"alphabet": A, "chance": math.log(A), "threshold": 0.1 * math.log(A),
            "params": 1000, "steps": 100, "chars_per_step": 2048, "horizon_max_lag": 64,
            "seconds": 1.0, "results": rows}


def test_table_and_plot(tmp_path):
    table = memory.format_table(_report())
    assert "echo loss" in table and "lstm" in table and ">64" in table
    assert len(table.splitlines()) == 2 + 12 + 3 + 4 + 1
    pytest.importorskip("matplotlib")
    out = tmp_path / "memory.png"
    memory.plot_memory(_report(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run(*args: str):
    return CliRunner().invoke(cli, ["lab", "memory", *args], catch_exceptions=False)


def test_cli_json(tmp_path):
    result = run("--cells", "rnn", "--lags", "1", "--seq-lengths", "16", "--steps", "20",
                 "--params", "2000", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["alphabet"] == 8 and report["chance"] == pytest.approx(math.log(8))
    (row,) = report["results"]
    for key in ("cell", "lag", "seq_length", "hidden_size", "params", "steps", "loss",
                "learned", "horizon"):
        assert key in row
    assert (row["cell"], row["lag"], row["seq_length"], row["steps"]) == ("rnn", 1, 16, 20)
    assert isinstance(row["learned"], bool) and math.isfinite(row["loss"])
    assert row["horizon"] is None or isinstance(row["horizon"], int)


@pytest.mark.parametrize("args, names", [
    (["--lags", "0"], ["--lags", "0"]),
    (["--lags", "2,x"], ["--lags"]),
    (["--cells", "rnn,transformer"], ["--cells", "transformer"]),
    (["--seq-lengths", "-3"], ["--seq-lengths"]),
    (["--params", "10"], ["--params"]),
    (["--alphabet", "1"], ["--alphabet"]),
    (["--steps", "0"], ["--steps"]),
    (["--seed", "-1"], ["--seed"]),
])
def test_cli_bad_options_exit_2_in_one_line(args, names):
    result = run(*args)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error:"), err
    for name in names:
        assert name in err[0]
    assert result.stdout == ""


def test_cli_help_shows_every_option_and_its_default():
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--cells", "--lags", "--seq-lengths", "--params", "--steps", "--seed",
                   "--quick", "--json", "--plot", "--alphabet"):
        assert option in result.output
    assert result.output.count("default:") >= 10


def test_cli_refuses_an_unwritable_plot_before_training(tmp_path):
    result = run("--plot", str(tmp_path / "missing" / "memory.png"))
    assert result.exit_code == 2
    assert "memory.png" in result.stderr and result.stdout == ""
