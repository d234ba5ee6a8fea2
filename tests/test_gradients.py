"""Finite-difference gradient checks in float64 for every parameter, and the seeds' worked
example of a tanh RNN."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.cells import CELLS
from charrnn.model import CharRNN, ModelShape, cross_entropy_

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and numpy

V, T, B = 7, 5, 3
# Central differences with eps 1e-6 in float64: the rounding noise of the objective (about
# 1e-16 / 1e-6) dominates; measured at most 1.0e-9 absolute on both paths, for every cell.
FD_TOL = dict(rtol=1e-6, atol=5e-9)


def _model(cell: str, embedding_size: int, dropout: float = 0.0, layers: int = 2,
           input_dropout: float = 0.0) -> CharRNN:
    shape = ModelShape(cell, V, hidden_size=6, num_layers=layers, embedding_size=embedding_size,
                       dropout=dropout, input_dropout=input_dropout)
    model = CharRNN.create(shape, seed=3, dtype="float64")
    rng = np.random.default_rng(0)
    for p in model.params.values():  # non-zero biases so every term of the gradient is live
        p += 0.1 * rng.standard_normal(p.shape)
    return model


def _random_state(model: CharRNN, rng: np.random.Generator):
    return [tuple(0.5 * rng.standard_normal(s.shape) for s in layer)
            for layer in model.zero_state(B)]


def _objective(model, x, y, state, masks, dstate):
    """Mean NLL plus <dstate, final state>: a gradient arriving from the next window."""
    logits, final, _ = model.forward(x, [tuple(s.copy() for s in st) for st in state], masks)
    loss, _ = cross_entropy_(logits.copy(), y.reshape(-1))
    return loss + sum(float(np.sum(d * s)) for dl, fl in zip(dstate, final)
                      for d, s in zip(dl, fl))


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("embedding_size", [4, 0])
@pytest.mark.parametrize("dropout, input_dropout", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.4), (0.3, 0.4)])
def test_finite_differences(cell: str, embedding_size: int, dropout: float,
                            input_dropout: float) -> None:
    if input_dropout and not embedding_size:
        pytest.skip("input dropout needs an embedding (a config error otherwise)")
    model = _model(cell, embedding_size, dropout, input_dropout=input_dropout)
    rng = np.random.default_rng(1)
    x = rng.integers(0, V, (T, B))
    y = rng.integers(0, V, (T, B))
    state = _random_state(model, rng)
    dstate = _random_state(model, rng)
    masks = model.dropout_masks(rng, B)
    if dropout:
        assert masks is not None and any((m == 0).any() for m in masks[:2])
    if input_dropout:  # the (B, E) mask after the layers' drops some embedding units
        assert masks is not None and len(masks) == 3 and (masks[2] == 0).any()

    logits, _, cache = model.forward(x, state, masks)
    _, dlogits = cross_entropy_(logits, y.reshape(-1))
    grads, dstate0 = model.backward(dlogits, cache, dstate)

    def objective() -> float:
        return _objective(model, x, y, state, masks, dstate)

    for name, param in model.params.items():
        np.testing.assert_allclose(grads[name], central_difference(objective, param),
                                   **FD_TOL, err_msg=name)

    # the gradient with respect to the initial state, which carries BPTT across windows
    for k, layer in enumerate(state):
        for j, s in enumerate(layer):
            np.testing.assert_allclose(dstate0[k][j], central_difference(objective, s),
                                       **FD_TOL)


def central_difference(objective, array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d objective() / d array by central differences, `array` perturbed in place one
    element at a time (and restored)."""
    numeric = np.zeros_like(array)
    for i in range(array.size):
        orig = array.flat[i]
        array.flat[i] = orig + eps
        up = objective()
        array.flat[i] = orig - eps
        down = objective()
        array.flat[i] = orig
        numeric.flat[i] = (up - down) / (2 * eps)
    return numeric


def test_seed_worked_example() -> None:
    """h_t = tanh(W_hh h_{t-1} + W_xh x_t + b_h), y_t = W_hy h_t + b_y, from the seeds."""
    W_hh = np.array([[0.5, 0.1], [0.1, 0.5]])
    W_xh = np.array([[0.2], [0.3]])
    W_hy = np.array([[1.0, 1.0]])
    xproj = (np.array([1.0, 2.0])[:, None, None] * W_xh[:, 0])  # (T=2, B=1, H=2)
    hs, last, _ = CELLS["rnn"].forward(xproj, (np.zeros((1, 2)),), W_hh, np.zeros(2), {})
    ys = hs[1:] @ W_hy.T
    np.testing.assert_allclose(hs[1, 0], [0.1974, 0.2913], atol=5e-5)
    # The seeds quote h2 = [0.4832, 0.6437], y2 = 1.1269; the exact arithmetic
    # (tanh([0.52783, 0.76539]) from the unrounded h1) gives [0.48371, 0.64424] and 1.12796.
    # Both are checked: exact values to 5e-5, the quoted ones to their 1e-3 slip.
    np.testing.assert_allclose(hs[2, 0], [0.48371, 0.64424], atol=5e-5)
    np.testing.assert_allclose(ys[:, 0, 0], [0.4887, 1.12796], atol=5e-5)
    np.testing.assert_allclose(hs[2, 0], [0.4832, 0.6437], atol=1e-3)
    np.testing.assert_allclose(ys[1, 0, 0], 1.1269, atol=2e-3)
    # and the recurrence itself, written out in float64: to rounding, not to 5e-5
    h1 = np.tanh(W_xh[:, 0] * 1.0)
    h2 = np.tanh(W_hh @ h1 + W_xh[:, 0] * 2.0)
    np.testing.assert_allclose(hs[1:, 0], [h1, h2], rtol=1e-14)
    np.testing.assert_allclose(ys[:, 0, 0], [W_hy[0] @ h1, W_hy[0] @ h2], rtol=1e-14)
    np.testing.assert_array_equal(last[0], hs[2])
