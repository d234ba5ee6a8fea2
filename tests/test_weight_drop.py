"""model.weight_drop: DropConnect on each layer's weight_hh (AWD-LSTM), one mask per window.

Within a window the recurrent weight is W_hh * M, M in {0, 1/(1-p)}, the same for every
stream, thread group and step; the gradient returned for weight_hh is the one with respect
to the raw weight, dL/d(W_hh * M) * M. Every test runs on the compiled kernels and on numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_gradients import FD_TOL, central_difference  # tests/ is on sys.path
from test_parallel import assert_same_window

from charrnn.cells import CELLS
from charrnn.model import CharRNN, ModelShape

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and numpy

V, T, B = 7, 5, 3
# as tests/test_gradients.py: central differences, eps 1e-6, float64


def _model(cell: str, embedding_size: int = 4, weight_drop: float = 0.3, dropout: float = 0.3,
           hidden: int = 6, dtype: str = "float64") -> CharRNN:
    shape = ModelShape(cell, V, hidden_size=hidden, num_layers=2, embedding_size=embedding_size,
                       dropout=dropout, weight_drop=weight_drop)
    model = CharRNN.create(shape, seed=3, dtype=dtype)
    rng = np.random.default_rng(0)
    for p in model.params.values():  # non-zero biases so every term of the gradient is live
        p += (0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model


def _window(model: CharRNN, batch: int = B, seed: int = 1):
    """x, y, an initial state and a gradient arriving on the final state."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, V, (T, batch)), rng.integers(0, V, (T, batch))
    dt = model.dtype
    state = [tuple((0.5 * rng.standard_normal(s.shape)).astype(dt) for s in layer)
             for layer in model.zero_state(batch)]
    dstate = [tuple((0.5 * rng.standard_normal(s.shape)).astype(dt) for s in layer)
              for layer in model.zero_state(batch)]
    return x, y, state, dstate


def _copy(model: CharRNN, **changes) -> CharRNN:
    """The same parameters (copied) under a shape with `changes`."""
    shape = dataclasses.replace(model.shape, **changes)
    return CharRNN(shape, {k: v.copy() for k, v in model.params.items()})


def _assert_same(a, b) -> None:
    """Two loss_and_grads results bit for bit: loss, every gradient, the final state."""
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = a, b
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        np.testing.assert_array_equal(grads_a[k], grads_b[k], err_msg=k)
    for la, lb in zip(state_a, state_b, strict=True):
        for sa, sb in zip(la, lb, strict=True):
            np.testing.assert_array_equal(sa, sb)


def _run(model, x, y, state, masks, dstate, weight_masks=None):
    state = [tuple(s.copy() for s in layer) for layer in state]
    return model.loss_and_grads(x, y, state, masks, dstate, weight_masks=weight_masks)


# -- the masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_drop_masks(cell: str, dtype: str) -> None:
    """None at p = 0 (the generator untouched); else one (G*H, H) array per layer in the
    model's dtype, values 0 and 1/(1-p), about 1-p of them kept; the same generator state
    gives the same masks."""
    model = _model(cell, weight_drop=0.0, hidden=32, dtype=dtype)
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    assert model.weight_drop_masks(rng) is None
    assert rng.bit_generator.state == before

    p = 0.3
    model = _model(cell, weight_drop=p, hidden=32, dtype=dtype)
    masks = model.weight_drop_masks(np.random.default_rng(5))
    G = CELLS[cell].gates * 32
    assert masks is not None and len(masks) == 2
    scale = np.dtype(dtype).type(1 / (1 - p))
    for m in masks:
        assert m.shape == (G, 32) == model.params["rnn.weight_hh_l0"].shape
        assert m.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(np.unique(m), [0, scale])
        assert abs(np.mean(m != 0) - (1 - p)) < 0.03  # G*32 >= 1024 draws per layer
    assert not np.array_equal(masks[0], masks[1])  # one draw per layer
    again = model.weight_drop_masks(np.random.default_rng(5))
    for m, m2 in zip(masks, again, strict=True):
        np.testing.assert_array_equal(m, m2)
    # drawn as rng.random((G*H, H)) >= p, layer after layer
    ref = np.random.default_rng(5)
    for m in masks:
        np.testing.assert_array_equal(m != 0, ref.random((G, 32)) >= p)


def test_masks_of_wrong_shape_are_refused() -> None:
    model = _model("lstm")
    x, y, state, dstate = _window(model)
    masks = model.weight_drop_masks(np.random.default_rng(0))
    with pytest.raises(ValueError, match="weight masks"):
        model.loss_and_grads(x, y, state, weight_masks=masks[:1])
    with pytest.raises(ValueError, match="weight masks"):
        model.loss_and_grads(x, y, state, weight_masks=[m.T for m in masks])


# -- no mask, an all-ones mask: today's results bit for bit ----------------------------------


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("embedding_size", [4, 0])
def test_no_weight_drop_is_bit_identical(cell: str, embedding_size: int) -> None:
    """weight_drop = 0 (no masks drawn), weight_masks None under weight_drop > 0 (evaluation)
    and an all-ones mask all give what a model without the field gives, bit for bit."""
    base = _model(cell, embedding_size, weight_drop=0.0)
    plain = CharRNN(ModelShape(cell, V, 6, 2, embedding_size, dropout=0.3),
                    {k: v.copy() for k, v in base.params.items()})
    x, y, state, dstate = _window(base)
    masks = base.dropout_masks(np.random.default_rng(2), B)
    expected = _run(plain, x, y, state, masks, dstate)

    assert base.weight_drop_masks(np.random.default_rng(3)) is None
    _assert_same(_run(base, x, y, state, masks, dstate, weight_masks=None), expected)
    dropping = _copy(base, weight_drop=0.5)
    _assert_same(_run(dropping, x, y, state, masks, dstate), expected)
    ones = [np.ones_like(dropping.params[f"rnn.weight_hh_l{k}"]) for k in range(2)]
    _assert_same(_run(dropping, x, y, state, masks, dstate, weight_masks=ones), expected)
    # and nothing stays behind: the next window without masks is today's again
    _assert_same(_run(dropping, x, y, state, masks, dstate), expected)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_masked_window_is_a_model_with_masked_weights(cell: str) -> None:
    """A window under masks M is, bit for bit, the window of a model whose weight_hh is
    W_hh * M (loss, state, every other gradient), its weight_hh gradient times M; and the
    masks leave no trace on forward() after the window (evaluation, sampling)."""
    model = _model(cell)
    x, y, state, dstate = _window(model)
    masks = model.dropout_masks(np.random.default_rng(2), B)
    wmasks = model.weight_drop_masks(np.random.default_rng(3))
    assert any((m == 0).any() for m in wmasks)
    loss, grads, new_state = _run(model, x, y, state, masks, dstate, wmasks)

    masked = _copy(model)
    for k, M in enumerate(wmasks):
        masked.params[f"rnn.weight_hh_l{k}"] *= M
    ref_loss, ref_grads, ref_state = _run(masked, x, y, state, masks, dstate)
    for k, M in enumerate(wmasks):
        ref_grads[f"rnn.weight_hh_l{k}"] *= M
    _assert_same((loss, grads, new_state), (ref_loss, ref_grads, ref_state))
    assert loss != _run(model, x, y, state, masks, dstate)[0]  # the masks did something

    fresh = _copy(model)
    logits, last, _ = model.forward(x, state)
    logits = logits.copy()
    fresh_logits, fresh_last, _ = fresh.forward(x, state)
    np.testing.assert_array_equal(logits, fresh_logits)
    np.testing.assert_array_equal(model.step(x[0], state)[0], fresh.step(x[0], state)[0])
    np.testing.assert_array_equal(model.stepper().step(x[0], state)[0],
                                  fresh.stepper().step(x[0], state)[0])


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("embedding_size", [4, 0])
def test_finite_differences(cell: str, embedding_size: int, monkeypatch) -> None:
    """float64 central differences of loss_and_grads under a fixed weight mask (p = 0.3) and
    dropout masks, with a gradient arriving on the final state: every parameter, weight_hh
    with respect to the raw weights (zero where the mask drops a weight)."""
    monkeypatch.setenv("CHARRNN_THREADS", "1")  # many small windows: no thread hand-offs
    model = _model(cell, embedding_size)
    x, y, state, dstate = _window(model)
    masks = model.dropout_masks(np.random.default_rng(2), B)
    wmasks = model.weight_drop_masks(np.random.default_rng(3))
    assert all((m == 0).any() and (m != 0).any() for m in wmasks)

    def objective() -> float:
        """Mean NLL plus <dstate, final state>."""
        loss, _, final = _run(model, x, y, state, masks, dstate, wmasks)
        return loss + sum(float(np.sum(d * s)) for dl, fl in zip(dstate, final)
                          for d, s in zip(dl, fl))

    _, grads, _ = _run(model, x, y, state, masks, dstate, wmasks)
    for name, param in model.params.items():
        np.testing.assert_allclose(grads[name], central_difference(objective, param),
                                   **FD_TOL, err_msg=name)
    for k, M in enumerate(wmasks):
        assert np.all(grads[f"rnn.weight_hh_l{k}"][M == 0] == 0)


# -- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_split_over_threads_equals_one_group(cell: str, monkeypatch) -> None:
    """1, 2, 3 and 5 thread groups (B = 5) share one mask: the same loss, gradients and final
    state as one group, to rounding; and the masks drawn do not depend on the threads."""
    results, drawn = {}, {}
    for threads in (1, 2, 3, 5):
        monkeypatch.setenv("CHARRNN_THREADS", str(threads))
        model = _model(cell, hidden=20)
        x, y, state, dstate = _window(model, batch=5)
        masks = model.dropout_masks(np.random.default_rng(2), 5)
        drawn[threads] = model.weight_drop_masks(np.random.default_rng(3))
        results[threads] = _run(model, x, y, state, masks, dstate, drawn[threads])
        assert len(model._replicas) == threads
    loss1, grads1, state1 = results[1]
    for threads in (2, 3, 5):
        for m, m1 in zip(drawn[threads], drawn[1], strict=True):
            np.testing.assert_array_equal(m, m1)
        assert_same_window(results[threads], results[1])
    # one group alone is not the same as the unmasked window: the mask reached every group
    monkeypatch.setenv("CHARRNN_THREADS", "5")
    model = _model(cell, hidden=20)
    x, y, state, dstate = _window(model, batch=5)
    masks = model.dropout_masks(np.random.default_rng(2), 5)
    unmasked = _run(model, x, y, state, masks, dstate)
    for s, s1 in zip(unmasked[2][0][0], state1[0][0], strict=True):  # every stream
        assert not np.allclose(s, s1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_masks_take_the_model_dtype(dtype: str) -> None:
    """Masks of another dtype are cast to the model's: the gradients keep its dtype (and a
    float32 model stays on the compiled float32 kernels)."""
    model = _model("lstm", dtype=dtype)
    x, y, state, dstate = _window(model)
    wmasks = [m.astype(np.float64) for m in model.weight_drop_masks(np.random.default_rng(3))]
    loss, grads, new_state = _run(model, x, y, state, None, dstate, wmasks)
    assert all(g.dtype == np.dtype(dtype) for g in grads.values())
    assert all(s.dtype == np.dtype(dtype) for layer in new_state for s in layer)
