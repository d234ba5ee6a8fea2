"""Agreement with PyTorch on golden fixtures (numpy only: torch is never imported here).

The fixtures in tests/fixtures/torch_*.npz were written by scripts/make_fixtures.py with
torch's nn.Embedding / one-hot + nn.RNN (tanh) / nn.LSTM / nn.GRU + nn.Linear in float64.
They pin down, against an independent implementation, the forward pass, the loss, every
parameter gradient and the gradient reaching the initial state, and (torch_default_*)
that a torch state_dict loads under our names, shapes and gate order unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from charrnn.model import CharRNN, ModelShape, cross_entropy_, param_shapes

pytestmark = pytest.mark.usefixtures("both_paths")  # compiled kernels and numpy

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p.name for p in FIXTURES.glob("torch_*.npz") if "default" not in p.name)
DEFAULTS = sorted(p.name for p in FIXTURES.glob("torch_default_*.npz"))
# float64: measured at most 8e-13 relative (gradient entries near 1e-5) and 4.4e-16 absolute
# on both paths; a float32 step anywhere in the float64 path shows as 1e-8 or more
RTOL, ATOL = 1e-10, 1e-14


def _load(name: str):
    with np.load(FIXTURES / name, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    shape = ModelShape(
        cell=str(data["cell"]),
        vocab_size=int(data["vocab_size"]),
        hidden_size=int(data["hidden_size"]),
        num_layers=int(data["num_layers"]),
        embedding_size=int(data["embedding_size"]),
    )
    params = {k: np.ascontiguousarray(data[k], dtype=np.float64) for k in param_shapes(shape)}
    return shape, params, data


def _state(shape: ModelShape, data: dict, h: str, c: str):
    """torch's (num_layers, B, H) tensors -> our list of per-layer tuples."""
    if shape.cell == "lstm":
        return [(data[h][k].copy(), data[c][k].copy()) for k in range(shape.num_layers)]
    return [(data[h][k].copy(),) for k in range(shape.num_layers)]


def test_fixtures_present():
    assert len(CASES) == 6, CASES
    assert len(DEFAULTS) == 3, DEFAULTS


@pytest.mark.parametrize("name", CASES)
def test_forward_backward_match_torch(name):
    shape, params, data = _load(name)
    # the fixture holds exactly the CONTRACT tensors, with their shapes
    stored = {k for k in data if k.startswith(("embedding.", "rnn.", "head."))}
    assert stored == set(params)
    for k, shp in param_shapes(shape).items():
        assert data[k].shape == shp, k

    model = CharRNN(shape, params)
    x, y = data["x"], data["y"]
    logits, final, cache = model.forward(x, _state(shape, data, "h0", "c0"))
    np.testing.assert_allclose(logits, data["logits"], rtol=RTOL, atol=ATOL)
    h_n = np.stack([layer[0] for layer in final])
    np.testing.assert_allclose(h_n, data["h_n"], rtol=RTOL, atol=ATOL)
    if shape.cell == "lstm":
        c_n = np.stack([layer[1] for layer in final])
        np.testing.assert_allclose(c_n, data["c_n"], rtol=RTOL, atol=ATOL)

    loss, dlogits = cross_entropy_(logits, y.reshape(-1))  # in place in `logits`
    np.testing.assert_allclose(loss, float(data["loss"]), rtol=RTOL, atol=ATOL)

    dstate = _state(shape, data, "dstate_h", "dstate_c")
    grads, dstate0 = model.backward(dlogits, cache, dstate)
    assert set(grads) == set(params)
    for k in params:
        np.testing.assert_allclose(
            grads[k], data[f"grad.{k}"], rtol=RTOL, atol=ATOL, err_msg=f"grad of {k}"
        )
    dh0 = np.stack([layer[0] for layer in dstate0])
    np.testing.assert_allclose(dh0, data["grad_h0"], rtol=RTOL, atol=ATOL, err_msg="grad h0")
    if shape.cell == "lstm":
        dc0 = np.stack([layer[1] for layer in dstate0])
        np.testing.assert_allclose(dc0, data["grad_c0"], rtol=RTOL, atol=ATOL, err_msg="grad c0")


@pytest.mark.parametrize("name", DEFAULTS)
def test_torch_state_dict_loads_unchanged(name):
    """A state_dict of torch's own default-initialised model, keys and float32 values
    verbatim, gives torch's logits: the name / shape / gate-order contract holds."""
    shape, params, data = _load(name)
    stored = {k for k in data if k.startswith(("embedding.", "rnn.", "head."))}
    assert stored == set(param_shapes(shape))  # torch's keys are exactly ours
    for k, shp in param_shapes(shape).items():
        assert data[k].shape == shp, k
        assert data[k].dtype == np.float32, k

    x = data["x"]
    # float64: the float32 weights widen exactly, as torch's .double() did
    model = CharRNN(shape, params)
    logits, final, _ = model.forward(x, model.zero_state(x.shape[1]))
    np.testing.assert_allclose(logits, data["logits"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.stack([s[0] for s in final]), data["h_n"], rtol=RTOL, atol=ATOL)
    if shape.cell == "lstm":
        c_n = np.stack([s[1] for s in final])
        np.testing.assert_allclose(c_n, data["c_n"], rtol=RTOL, atol=ATOL)

    # float32, as a trained checkpoint is used: the same logits to float32 accuracy
    params32 = {k: np.ascontiguousarray(data[k]) for k in param_shapes(shape)}
    model32 = CharRNN(shape, params32)
    logits32, _, _ = model32.forward(x, model32.zero_state(x.shape[1]))
    assert logits32.dtype == np.float32
    # measured: at most 7e-8 absolute (logits of order 1), 2e-5 relative on the smallest
    np.testing.assert_allclose(logits32, data["logits"], rtol=1e-5, atol=1e-6)
