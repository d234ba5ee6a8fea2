"""The models learn: a task with a known answer, a source with a known entropy rate, and
real text."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from charrnn.config import config_from_dict
from charrnn.model import CharRNN, ModelShape
from charrnn.optim import Optimizer, clip_by_global_norm_
from charrnn.train import train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
QUIET = {"progress": False, "echo": lambda s: None}


# -- (a) echo: y_t = x_{t-1} ----------------------------------------------------------------


def _echo_windows(rng: np.random.Generator, B: int, T: int):
    """Endless windows of random symbols, each target the previous input of the same row;
    the first target of a window is the last input of the window before (carried state)."""
    prev = rng.integers(0, 4, B)
    while True:
        x = rng.integers(0, 4, (T, B))
        y = np.concatenate([prev[None], x[:-1]])  # (T, B)
        prev = x[-1]
        yield x, y


@pytest.mark.parametrize("cell,embedding_size", [("rnn", 0), ("rnn", 8), ("gru", 0),
                                                 ("lstm", 8)])
def test_echo_task_is_learned(cell, embedding_size) -> None:
    V, H, B, T = 4, 16, 32, 20
    model = CharRNN.create(ModelShape(cell, V, H, 1, embedding_size), seed=0, dtype="float64")
    opt = Optimizer("adam", model.params)
    windows = _echo_windows(np.random.default_rng(1), B, T)
    state = model.zero_state(B)
    first = None
    for _ in range(300):
        x, y = next(windows)
        loss, grads, state = model.loss_and_grads(x, y, state)
        first = loss if first is None else first
        clip_by_global_norm_(grads, 5.0)
        opt.step(model.params, grads, 0.01)
    assert first > 1.0  # chance level is ln 4 = 1.386
    # held-out windows from another stream, no updates
    windows = _echo_windows(np.random.default_rng(2), B, T)
    state = model.zero_state(B)
    losses = []
    for _ in range(6):
        x, y = next(windows)
        loss, _, state = model.loss_and_grads(x, y, state)
        losses.append(loss)
    # the first window's first target is unknowable (it precedes the stream): skip it
    assert max(losses[1:]) < 0.05, losses


# -- (b) a first-order Markov source --------------------------------------------------------


def _markov_source(K: int, seed: int):
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(K, 0.3), size=K)  # (K, K) rows: next-symbol distributions
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()  # stationary distribution
    return rng, P, pi


def _sample_chain(rng, P: np.ndarray, n: int) -> np.ndarray:
    cdf = np.cumsum(P, axis=1)
    u = rng.random(n)
    s = np.empty(n, dtype=np.int64)
    s[0] = 0
    for t in range(1, n):
        s[t] = min(int(np.searchsorted(cdf[s[t - 1]], u[t], side="right")), len(P) - 1)
    return s


@pytest.mark.slow
def test_markov_source_entropy_rate_is_reached(tmp_path) -> None:
    K, N = 8, 60_000
    rng, P, pi = _markov_source(K, seed=0)
    entropy_rate = float(-(pi[:, None] * P * np.log2(np.where(P > 0, P, 1))).sum())  # bits
    unigram = float(-(pi * np.log2(pi)).sum())
    assert unigram - entropy_rate > 0.6  # the source has structure worth learning

    s = _sample_chain(rng, P, N)
    chars = "abcdefgh"
    (tmp_path / "markov.txt").write_text("".join(chars[i] for i in s), encoding="utf-8")
    n_val = int(N * 0.1)
    val = s[N - n_val:]
    # what the true source scores on this very validation text (sampling noise included)
    oracle = float(-np.mean(np.log2(P[val[:-1], val[1:]])))
    assert oracle == pytest.approx(entropy_rate, abs=0.05)

    cfg = config_from_dict({
        "data": {"path": str(tmp_path / "markov.txt"), "val_fraction": 0.1},
        "model": {"cell": "rnn", "hidden_size": 32, "num_layers": 1, "embedding_size": 8},
        "train": {"batch_size": 32, "seq_length": 32, "max_steps": 200,
                  "learning_rate": 0.01, "eval_every": 100},
        "output": {"dir": str(tmp_path / "run")},
    })
    result = train(cfg, **QUIET)
    val_bpc = result.best_val_loss / math.log(2)
    assert val_bpc < oracle + 0.06, (val_bpc, oracle, entropy_rate)
    assert val_bpc > oracle - 0.05  # no model beats the source by much on its own text
    assert val_bpc < unigram - 0.6, (val_bpc, unigram)


# -- (c) real text ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared tinyshakespeare.txt is absent")
def test_tiny_lstm_learns_shakespeare(tmp_path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    counts = np.array(list(Counter(text).values()), dtype=np.float64)
    p = counts / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats; about 3.31 for tinyshakespeare
    cfg = config_from_dict({
        "data": {"path": str(SHAKESPEARE), "val_fraction": 0.05},
        "model": {"cell": "lstm", "hidden_size": 128, "num_layers": 1, "embedding_size": 32},
        "train": {"batch_size": 32, "seq_length": 64, "max_steps": 200, "learning_rate": 0.01,
                  "eval_every": 100, "eval_max_chars": 20_000},
        "output": {"dir": str(tmp_path / "run")},
    })
    result = train(cfg, **QUIET)  # about 10 s on 2 cores
    # measured: 1.79 nats after 200 steps (1.95 after 100), against a unigram of 3.31
    assert result.best_val_loss < unigram - 1.0, (result.best_val_loss, unigram)
    assert result.final_train_loss < unigram - 1.0
