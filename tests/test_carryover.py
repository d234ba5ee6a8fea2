"""Truncated BPTT with carried state: windows of T, each starting from the previous window's
final state, compute exactly what one forward pass over the whole sequence computes."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.data import WindowStream
from charrnn.model import CharRNN, ModelShape

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and numpy

V, B, N = 11, 3, 48


def _model(cell: str, embedding_size: int = 5, layers: int = 2) -> CharRNN:
    shape = ModelShape(cell, V, hidden_size=7, num_layers=layers, embedding_size=embedding_size)
    model = CharRNN.create(shape, seed=1, dtype="float64")
    rng = np.random.default_rng(2)
    for p in model.params.values():  # non-zero biases, larger weights: a state that matters
        p += 0.3 * rng.standard_normal(p.shape)
    return model


def _forward(model: CharRNN, x: np.ndarray, state):
    """(logits (T, B, V) copied out of the model's reusable buffer, final state)."""
    logits, final, _ = model.forward(x, state)
    return logits.reshape(x.shape[0], x.shape[1], -1).copy(), final


def _copy(state):
    return [tuple(s.copy() for s in layer) for layer in state]


def _assert_states_close(a, b) -> None:
    assert len(a) == len(b)
    for la, lb in zip(a, b, strict=True):
        assert len(la) == len(lb)
        for sa, sb in zip(la, lb, strict=True):
            np.testing.assert_allclose(sa, sb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("embedding_size", [5, 0])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_windows_with_carried_state_equal_one_pass(cell, embedding_size, T) -> None:
    model = _model(cell, embedding_size)
    x = np.random.default_rng(3).integers(0, V, size=(N, B))  # (N, B) time-major
    full_logits, full_final = _forward(model, x, model.zero_state(B))

    state = model.zero_state(B)
    pieces = []
    for s in range(0, N, T):  # the last window may be shorter
        logits, state = _forward(model, x[s : s + T], state)
        pieces.append(logits)
        # the carried state is the state a single pass reaches after the same prefix
        _, prefix_final = _forward(model, x[: s + T], model.zero_state(B))
        _assert_states_close(state, prefix_final)
    windowed = np.concatenate(pieces)
    assert windowed.shape == full_logits.shape == (N, B, V)
    np.testing.assert_allclose(windowed, full_logits, rtol=1e-10, atol=1e-13)
    _assert_states_close(state, full_final)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_dropping_the_state_changes_the_logits(cell) -> None:
    """The carried state matters: restarting each window from zero gives other logits."""
    model = _model(cell)
    x = np.random.default_rng(4).integers(0, V, size=(20, B))
    full, _ = _forward(model, x, model.zero_state(B))
    second, _ = _forward(model, x[10:], model.zero_state(B))
    assert not np.allclose(second, full[10:], rtol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_single_steps_equal_one_pass(cell) -> None:
    """model.step (the sampler's path) carried one character at a time. Each step projects
    layer 0's input with a GEMM (T*B = 3 < V); the whole pass gathers from the input table."""
    model = _model(cell)
    x = np.random.default_rng(5).integers(0, V, size=(12, B))
    full, full_final = _forward(model, x, model.zero_state(B))
    state = model.zero_state(B)
    for t in range(len(x)):
        logits, state = model.step(x[t], state)
        np.testing.assert_allclose(logits, full[t], rtol=1e-10, atol=1e-13)
    _assert_states_close(state, full_final)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_window_stream_with_carried_state_equals_one_pass_per_row(cell) -> None:
    """Through WindowStream: B rows, windows of T, the state carried from window to window,
    gives the logits of one pass over each row's whole text."""
    T, Bs = 6, 4
    ids = np.random.default_rng(6).integers(0, V, size=250).astype(np.uint8)
    stream = WindowStream(ids, Bs, T)
    rows = stream.rows  # (B, L)
    model = _model(cell)
    state = model.zero_state(Bs)
    xs, ys, pieces = [], [], []
    for k in range(len(stream)):
        x, y, new_epoch = stream.next_window()
        assert new_epoch == (k == 0)
        logits, state = _forward(model, x, state)
        xs.append(x)
        ys.append(y)
        pieces.append(logits)
    assert stream.position == 0 and stream.epoch == 1  # one full epoch was handed out
    x_all = np.concatenate(xs)  # (K*T, B)
    y_all = np.concatenate(ys)
    n = len(x_all)
    assert n == len(stream) * T
    np.testing.assert_array_equal(x_all.T, rows[:, :n])
    np.testing.assert_array_equal(y_all.T, rows[:, 1 : n + 1])
    full, full_final = _forward(model, x_all, model.zero_state(Bs))
    np.testing.assert_allclose(np.concatenate(pieces), full, rtol=1e-10, atol=1e-13)
    _assert_states_close(state, full_final)


@pytest.mark.parametrize("batch_size,seq_length", [(1, 1), (3, 7), (5, 2), (2, 50)])
def test_consecutive_windows_continue_each_row(batch_size, seq_length) -> None:
    ids = np.arange(301) % 251  # distinct consecutive values: continuity is visible
    stream = WindowStream(ids, batch_size, seq_length)
    prev = None
    for _ in range(len(stream)):
        x, y, _ = stream.next_window()
        assert x.shape == y.shape == (seq_length, batch_size)
        assert x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(y[:-1], x[1:])  # y is x shifted by one
        # each column is a run of consecutive ids of the stream
        np.testing.assert_array_equal(np.diff(x, axis=0) % 251, 1)
        if prev is not None:
            px, py = prev
            np.testing.assert_array_equal(x[0], py[-1])  # the next window picks up the row
            np.testing.assert_array_equal(x[0], (px[-1] + 1) % 251)
        prev = (x, y)
    # after the epoch the stream starts over at the beginning of every row
    x, _, new_epoch = stream.next_window()
    assert new_epoch
    np.testing.assert_array_equal(x.T, stream.rows[:, :seq_length])


def _trainer(tiny_config, cell: str, stateful: bool, steps: int):
    from charrnn.train import Trainer

    cfg = tiny_config(
        run=f"run-{cell}-{stateful}",
        model={"cell": cell, "num_layers": 2, "hidden_size": 8},
        train={"stateful": stateful, "max_steps": steps, "eval_every": 1000, "dtype": "float64",
               "batch_size": 3, "seq_length": 8},
    )
    return Trainer(cfg)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("stateful", [True, False])
def test_trainer_carries_the_state_across_windows(tiny_config, monkeypatch, cell, stateful):
    """With the updates disabled, the state the trainer holds after k steps is the state of
    one pass over the k windows (stateful) or over the last window alone (stateful: false)."""
    steps = 5
    trainer = _trainer(tiny_config, cell, stateful, steps)
    assert len(trainer.stream) > steps  # all within the first epoch
    monkeypatch.setattr(trainer.optimizer, "step", lambda params, grads, lr: None)
    trainer.run(progress=False, echo=lambda s: None)
    check = WindowStream(trainer.corpus.train, 3, 8)
    windows = [check.next_window()[0] for _ in range(steps)]
    x = np.concatenate(windows) if stateful else windows[-1]
    _, expected = _forward(trainer.model, x, trainer.model.zero_state(3))
    _assert_states_close(trainer.state, expected)
