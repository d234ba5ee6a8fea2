"""A batch split into stream groups on threads computes what one pass over the batch does."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

import charrnn.parallel as parallel
from charrnn import blas
from charrnn.cli import cli
from charrnn.errors import ConfigError
from charrnn.model import CharRNN, ModelShape

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and numpy

V, T, B = 11, 7, 5


def _model(cell: str, dropout: float = 0.0) -> CharRNN:
    shape = ModelShape(cell, V, hidden_size=20, num_layers=2, embedding_size=6, dropout=dropout)
    model = CharRNN.create(shape, seed=5, dtype="float64")
    rng = np.random.default_rng(6)
    for p in model.params.values():  # larger weights: a carried state that matters
        p += 0.3 * rng.standard_normal(p.shape)
    return model


def _window(model: CharRNN, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    state = [tuple(rng.standard_normal((B, 20)) for _ in layer) for layer in model.zero_state(B)]
    dstate = [tuple(rng.standard_normal((B, 20)) for _ in layer) for layer in state]
    return x, y, state, dstate


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_loss_and_grads_split_over_threads_equals_one_group(cell, monkeypatch) -> None:
    """1, 2, 3 and 5 groups (B = 5): the same loss, every gradient, the same final state;
    with dropout masks and a gradient arriving on the final state."""
    results = {}
    for threads in (1, 2, 3, 5):
        monkeypatch.setenv("CHARRNN_THREADS", str(threads))
        model = _model(cell, dropout=0.3)
        x, y, state, dstate = _window(model)
        masks = model.dropout_masks(np.random.default_rng(7), B)
        results[threads] = model.loss_and_grads(x, y, state, masks, dstate)
        assert len(model._replicas) == threads
    for threads in (2, 3, 5):
        assert_same_window(results[threads], results[1])
        for layer in results[threads][2]:
            assert all(s.shape == (B, 20) and s.flags.c_contiguous for s in layer)


def assert_same_window(result, reference) -> None:
    """Two (loss, grads, state) of one window, computed with different thread splits: equal
    to float rounding."""
    loss, grads, new_state = result
    loss1, grads1, state1 = reference
    assert loss == pytest.approx(loss1, rel=1e-13)
    assert grads.keys() == grads1.keys()
    for k in grads:
        np.testing.assert_allclose(grads[k], grads1[k], rtol=1e-11, atol=1e-13, err_msg=k)
    for layer, layer1 in zip(new_state, state1, strict=True):
        for s, s1 in zip(layer, layer1, strict=True):
            np.testing.assert_allclose(s, s1, rtol=1e-13, atol=1e-15)


def test_replicas_share_the_weights(monkeypatch) -> None:
    """An update to the model's parameters (the optimizer's, in place) reaches every group."""
    monkeypatch.setenv("CHARRNN_THREADS", "2")
    model = _model("lstm")
    x, y, state, _ = _window(model)
    before = model.loss_and_grads(x, y, state)[0]
    for p in model.params.values():
        p *= 0.5
    after = model.loss_and_grads(x, y, state)[0]
    monkeypatch.setenv("CHARRNN_THREADS", "1")
    alone = CharRNN(model.shape, {k: v.copy() for k, v in model.params.items()})
    assert after != before
    assert after == pytest.approx(alone.loss_and_grads(x, y, state)[0], rel=1e-13)


def test_stream_groups_cover_the_batch_in_order() -> None:
    for batch in (1, 2, 5, 32, 33):
        for threads in (1, 2, 3, 8):
            groups = parallel.stream_groups(batch, threads)
            assert len(groups) == min(batch, threads)
            assert [i for g in groups for i in range(batch)[g]] == list(range(batch))
            sizes = [g.stop - g.start for g in groups]
            assert max(sizes) - min(sizes) <= 1


def _no_blas(monkeypatch) -> None:
    """As where threadpoolctl controls no BLAS: its controller reports no library."""
    monkeypatch.setattr(blas, "_controller", lambda: ThreadpoolController().select(user_api=[]))


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_one_group_without_a_controllable_blas(monkeypatch) -> None:
    _no_blas(monkeypatch)
    assert not blas.controllable()
    assert parallel.stream_groups(32, 4) == [slice(0, 32)]
    before = _blas_threads()
    with blas.single_threaded() as arranged:
        assert not arranged and _blas_threads() == before  # nothing was changed
    assert parallel.serial_note() == (
        f"BLAS threads not controllable ({blas.numpy_blas()}): running serially"
    )


def test_the_training_banner_says_when_it_runs_serially(monkeypatch, tmp_path) -> None:
    """Without a controllable BLAS: one thread whatever CHARRNN_THREADS, said once."""
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 80, encoding="utf-8")
    cfg = {
        "data": {"path": str(tmp_path / "corpus.txt"), "val_fraction": 0.1},
        "model": {"cell": "gru", "hidden_size": 8, "num_layers": 1, "embedding_size": 4},
        "train": {"batch_size": 4, "seq_length": 8, "max_steps": 3, "eval_every": 3},
        "output": {"dir": str(tmp_path / "run")},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    monkeypatch.setenv("CHARRNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CHARRNN_THREADS", "2")
    args = ["train", "--config", str(config), "--no-progress", "--overwrite"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "; BLAS threads not controllable" not in result.stderr
    if blas.controllable():
        assert "on 2 thread(s)" in result.stderr
    _no_blas(monkeypatch)
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    note = f"on 1 thread(s); BLAS threads not controllable ({blas.numpy_blas()}): running serially"
    assert result.stderr.count(note) == 1 and result.stderr.count("not controllable") == 1


@pytest.mark.parametrize("value, expected", [("", None), ("1", 1), ("3", 3), (" 2 ", 2)])
def test_thread_count_from_the_environment(value, expected, monkeypatch) -> None:
    monkeypatch.setenv("CHARRNN_THREADS", value)
    assert parallel.thread_count() == (expected or parallel.available_cores())


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_refused(value, monkeypatch) -> None:
    monkeypatch.setenv("CHARRNN_THREADS", value)
    with pytest.raises(ConfigError, match="CHARRNN_THREADS"):
        parallel.thread_count()
    result = CliRunner().invoke(cli, ["info", "nothing.safetensors"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"Error: CHARRNN_THREADS must be a whole number >= 1, not {value!r}"
    )


def test_run_groups_runs_every_group_on_its_own_thread_in_order() -> None:
    started = threading.Barrier(3, timeout=10)  # all three at once, or this times out

    def fn(g: int) -> tuple[int, str]:
        started.wait()
        return g, threading.current_thread().name

    results = parallel.run_groups(fn, 3)
    assert [g for g, _ in results] == [0, 1, 2]
    assert results[0][1] == threading.current_thread().name
    assert len({name for _, name in results}) == 3


def test_run_groups_waits_for_every_group_then_raises() -> None:
    finished = []

    def fn(g: int) -> int:
        if g == 0:
            raise ValueError("group 0 failed")
        threading.Event().wait(0.2)
        finished.append(g)
        return g

    with pytest.raises(ValueError, match="group 0 failed"):
        parallel.run_groups(fn, 3)
    assert sorted(finished) == [1, 2]


needs_blas = pytest.mark.skipif(not blas.controllable(), reason="threadpoolctl controls no BLAS")


@needs_blas
def test_blas_is_single_threaded_inside_and_restored_after() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        assert set(_blas_threads()) == {2}
        with blas.single_threaded() as arranged:
            assert arranged and set(_blas_threads()) == {1}
        assert set(_blas_threads()) == {2}
        inside = parallel.run_groups(lambda g: _blas_threads(), 2)  # on the pool's threads too
        assert all(set(t) == {1} for t in inside) and set(_blas_threads()) == {2}


@needs_blas
def test_single_threaded_nests() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        with blas.single_threaded() as outer:
            with blas.single_threaded() as inner:
                assert outer and inner and set(_blas_threads()) == {1}
            assert set(_blas_threads()) == {1}  # the outer one still holds
        assert set(_blas_threads()) == {2}


@needs_blas
def test_single_threaded_is_restored_when_the_body_raises() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        with pytest.raises(ValueError), blas.single_threaded():
            raise ValueError
        assert set(_blas_threads()) == {2}


def test_other_threads_wait_for_the_holder() -> None:
    """One thread at a time: a second thread enters once the first has left."""
    entered, leave, order = threading.Event(), threading.Event(), []

    def hold() -> None:
        with blas.single_threaded():
            entered.set()
            leave.wait(10)
            order.append("first out")

    def second() -> None:
        with blas.single_threaded():
            order.append("second in")

    threads = [threading.Thread(target=hold), threading.Thread(target=second)]
    threads[0].start()
    assert entered.wait(10)
    threads[1].start()
    threading.Event().wait(0.1)
    leave.set()
    for t in threads:
        t.join(10)
    expected = ["first out", "second in"] if blas.controllable() else ["second in", "first out"]
    assert order == expected


def _single_threaded_in_child(queue) -> None:
    with blas.single_threaded() as arranged:
        queue.put((arranged, _blas_threads()))


@needs_blas
def test_single_threaded_works_in_a_forked_child() -> None:
    """Forked while another thread of the parent holds the lock: the child takes its own."""
    import multiprocessing

    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with blas.single_threaded():
            entered.set()
            leave.wait(20)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(10)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_single_threaded_in_child, args=(queue,))
        child.start()
        child.join(timeout=20)
        if child.is_alive():
            child.kill()
            pytest.fail("single_threaded hung in a forked child")
        arranged, threads = queue.get(timeout=5)
        assert child.exitcode == 0 and arranged and set(threads) == {1}
    finally:
        leave.set()
        holder.join(10)


def test_groups_run_in_the_callers_numpy_error_state() -> None:
    """np.errstate (a context variable in numpy 2, per thread in numpy 1.x): each group gets
    the caller's."""
    with np.errstate(over="raise", invalid="ignore"):
        seen = parallel.run_groups(lambda g: np.geterr(), 3)
    assert all(e["over"] == "raise" and e["invalid"] == "ignore" for e in seen)
    big = np.full(4, 1e30, np.float32)
    with np.errstate(over="ignore"), warnings.catch_warnings():  # no warning from any thread
        warnings.simplefilter("error")
        parallel.run_groups(lambda g: big * big, 2)


def test_nested_run_groups_runs_serially_instead_of_deadlocking() -> None:
    def outer(g: int) -> list[tuple[int, int]]:
        return parallel.run_groups(lambda h: (g, h), 2)

    assert parallel.run_groups(outer, 2) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]


def _run_groups_in_child(queue) -> None:
    queue.put(parallel.run_groups(lambda g: g * g, 3))


def test_run_groups_works_in_a_forked_child() -> None:
    """The parent's pool threads do not exist in a fork: the child makes its own."""
    import multiprocessing

    parallel.run_groups(lambda g: g, 2)  # the parent's pool is up
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_run_groups_in_child, args=(queue,))
    child.start()
    child.join(timeout=20)
    if child.is_alive():
        child.kill()
        pytest.fail("run_groups hung in a forked child")
    assert child.exitcode == 0 and queue.get(timeout=5) == [0, 1, 4]


def test_zero_threads_means_the_default() -> None:
    assert parallel.stream_groups(8, 0) == parallel.stream_groups(8, None)


def test_a_non_ascii_digit_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("CHARRNN_THREADS", "\u00b2")  # '²'.isdigit() is True
    with pytest.raises(ConfigError, match="CHARRNN_THREADS"):
        parallel.thread_count()
