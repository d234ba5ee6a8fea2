"""Scoring held-out text: windows, slices of windows and threads over groups of streams all
compute what one forward pass over every stream computes."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

import charrnn.evaluate as evaluate
from charrnn import blas
from charrnn.data import eval_windows
from charrnn.model import CharRNN, ModelShape, token_nll

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and numpy

V = 9


def _model(cell: str) -> CharRNN:
    shape = ModelShape(cell, V, hidden_size=6, num_layers=2, embedding_size=4)
    model = CharRNN.create(shape, seed=3, dtype="float64")
    rng = np.random.default_rng(4)
    for p in model.params.values():  # larger weights: a carried state that matters
        p += 0.3 * rng.standard_normal(p.shape)
    return model


def _one_pass(model: CharRNN, ids: np.ndarray, batch_size: int, seq_length: int):
    """The windows' streams concatenated in time and run in a single forward pass."""
    windows = list(eval_windows(ids, batch_size, seq_length))
    x, y, mask = (np.concatenate([w[i] for w in windows]) for i in range(3))
    logits, _, _ = model.forward(x, model.zero_state(x.shape[1]))
    nll = token_nll(logits, y.reshape(-1))
    m = mask.reshape(-1)
    return float(nll[m].sum()), int(m.sum())


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("slice_bytes", [1, 2000, 1 << 30])  # 1 step, a few steps, whole
def test_score_equals_one_pass(cell, threads, slice_bytes, monkeypatch) -> None:
    monkeypatch.setattr(evaluate, "SLICE_BYTES", slice_bytes)
    model = _model(cell)
    ids = np.random.default_rng(0).integers(0, V, 403)
    total, count = evaluate.score(model, ids, batch_size=7, seq_length=10, threads=threads)
    expected_total, expected_count = _one_pass(model, ids, 7, 10)
    assert count == expected_count == len(ids) - 1
    assert total == pytest.approx(expected_total, rel=1e-12)


def test_score_without_a_controllable_blas_runs_on_one_thread(monkeypatch) -> None:
    monkeypatch.setattr(blas, "_controller", lambda: ThreadpoolController().select(user_api=[]))
    with blas.single_threaded() as arranged:
        assert not arranged
    model = _model("lstm")
    ids = np.random.default_rng(1).integers(0, V, 200)
    assert evaluate.score(model, ids, 4, 8, threads=2) == pytest.approx(
        evaluate.score(model, ids, 4, 8, threads=1), rel=1e-12
    )


def test_score_of_nothing() -> None:
    assert evaluate.score(_model("rnn"), np.array([3]), threads=2) == (0.0, 0)


@pytest.mark.skipif(not blas.controllable(), reason="threadpoolctl controls no BLAS")
def test_blas_thread_count_is_restored() -> None:
    def threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):
        with blas.single_threaded() as arranged:
            assert arranged and threads() == {1}
        assert threads() == {2}
        model = _model("gru")
        evaluate.score(model, np.random.default_rng(2).integers(0, V, 300), 6, 9, threads=2)
        assert threads() == {2}
