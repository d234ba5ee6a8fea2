"""The optional compiled kernels (charrnn/_fused.c) against the numpy code path they replace.

Forward steps differ from numpy only through their transcendental functions (libm's tanh in
float64; in float32 a vectorized Cephes tanhf and sigmoid gates as 1 / (1 + exp(-x))); backward
steps have no transcendental functions."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import charrnn.cells as cells
from charrnn.cells import CELLS

try:
    from charrnn import _fused
except ImportError:
    _fused = None

needs_ext = pytest.mark.skipif(_fused is None, reason="charrnn._fused is not built")
TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=1e-5, atol=1e-6)}
T, B, H = 6, 5, 24


def _inputs(cell: str, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    G = CELLS[cell].gates
    xproj = rng.standard_normal((T, B, G * H)).astype(dtype)
    W_hh = (0.4 * rng.standard_normal((G * H, H))).astype(dtype)
    b_hh = (0.2 * rng.standard_normal(G * H)).astype(dtype)
    state = tuple(rng.standard_normal((B, H)).astype(dtype) for _ in range(CELLS[cell].num_states))
    dhs = rng.standard_normal((T, B, H)).astype(dtype)
    dstate = tuple(rng.standard_normal((B, H)).astype(dtype) for _ in state)
    return xproj, W_hh, b_hh, state, dhs, dstate


def _forward(cell, kernels, xproj, W_hh, b_hh, state, monkeypatch):
    monkeypatch.setattr(cells, "_fused", kernels)
    ws: dict = {}
    hs, last, cache = CELLS[cell].forward(xproj.copy(), state, W_hh, b_hh, ws)
    return hs, last, cache, ws


@needs_ext
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_forward_matches_numpy(cell, dtype, monkeypatch):
    xproj, W_hh, b_hh, state, _, _ = _inputs(cell, dtype)
    hs_f, last_f, cache_f, _ = _forward(cell, _fused, xproj, W_hh, b_hh, state, monkeypatch)
    hs_n, last_n, cache_n, _ = _forward(cell, None, xproj, W_hh, b_hh, state, monkeypatch)
    assert hs_f.dtype == dtype
    np.testing.assert_allclose(hs_f, hs_n, **TOL[dtype])
    for a, b in zip(last_f, last_n, strict=True):
        np.testing.assert_allclose(a, b, **TOL[dtype])
    assert cache_f.keys() == cache_n.keys()
    for key in cache_f:  # everything backward reads: activations, c, tanh(c), W_hn h + b_hn
        np.testing.assert_allclose(cache_f[key], cache_n[key], **TOL[dtype], err_msg=key)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_backward_matches_numpy(cell, dtype, monkeypatch):
    xproj, W_hh, b_hh, state, dhs, dstate = _inputs(cell, dtype, seed=1)
    grads = {}
    for name, kernels in [("fused", _fused), ("numpy", None)]:
        # the same (numpy) forward for both, so that backward sees identical caches
        _, _, cache, ws = _forward(cell, None, xproj, W_hh, b_hh, state, monkeypatch)
        monkeypatch.setattr(cells, "_fused", kernels)
        dx, dW, db, d0 = CELLS[cell].backward(dhs, dstate, cache, W_hh, ws)
        grads[name] = [a.copy() for a in (dx, dW, db, *d0)]
    for a, b in zip(grads["fused"], grads["numpy"], strict=True):
        np.testing.assert_allclose(a, b, **TOL[dtype])


@needs_ext
def test_noncontiguous_input_falls_back_to_numpy(monkeypatch):
    xproj, W_hh, b_hh, state, _, _ = _inputs("lstm", np.float64)
    wide = np.zeros((T, B, 2 * xproj.shape[2]))
    strided = wide[:, :, ::2]
    strided[...] = xproj
    monkeypatch.setattr(cells, "_fused", _fused)
    hs_s, _, _ = CELLS["lstm"].forward(strided, state, W_hh, b_hh, {})
    hs_c, _, _, _ = _forward("lstm", None, xproj, W_hh, b_hh, state, monkeypatch)
    np.testing.assert_allclose(hs_s, hs_c, rtol=1e-12, atol=1e-14)


@needs_ext
def test_float32_tanh_edge_values():
    x = np.array([0.0, -0.0, 1e-30, -1e-8, 0.3, 0.6249, 0.625, -0.7, 3.0, 8.9, 9.5, -20.0,
                  1e30, np.inf, -np.inf, np.nan], np.float32)
    h = np.empty_like(x)
    _fused.rnn_fwd_step(x[None], np.zeros_like(x)[None], h[None])
    np.testing.assert_allclose(h, np.tanh(x), rtol=5e-7, atol=0)  # NaN where numpy has NaN
    x = (np.random.default_rng(0).standard_normal((10, 10_000)) * 4).astype(np.float32)
    h = np.empty_like(x)
    _fused.rnn_fwd_step(x, np.zeros_like(x), h)
    np.testing.assert_allclose(h, np.tanh(x), rtol=5e-7, atol=0)


@needs_ext
def test_float32_sigmoid_gates():
    """The LSTM's i gate from lstm_fwd_step against the exact sigmoid of x = 2u (u: the
    pre-scaled input): within 2 ulp while exp is not clamped, 1e-7 absolute everywhere."""
    B, H = 40, 500
    u = (np.random.default_rng(1).standard_normal((B, H)) * 6).astype(np.float32)
    u.flat[:9] = [0.0, -0.0, 1e-30, 43.0, -43.0, 60.0, -60.0, np.inf, -np.inf]
    u.flat[9] = np.nan
    a = np.zeros((B, 4 * H), np.float32)
    a[:, :H] = u
    state = [np.zeros((B, H), np.float32) for _ in range(4)]
    _fused.lstm_fwd_step(a, np.zeros_like(a), *state)
    gate = a[:, :H].astype(np.float64)
    exact = 1.0 / (1.0 + np.exp(-2.0 * u.astype(np.float64)))
    assert np.isnan(gate.flat[9])
    finite = np.isfinite(u)
    np.testing.assert_allclose(gate[finite], exact[finite], rtol=0, atol=1e-7)
    unclamped = finite & (np.abs(2 * u) < 87)
    ulp = np.spacing(exact[unclamped].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(gate[unclamped] - exact[unclamped]) / ulp) <= 2.0


def _lstm_step_args(bad: str = ""):
    """Arguments of lstm_fwd_step for B=2, H=2, with one thing wrong."""
    a, rec = np.zeros((2, 8)), np.zeros((2, 8))
    c_prev, c, tanh_c, h = (np.zeros((2, 2)) for _ in range(4))
    if bad == "non-contiguous":
        a = np.zeros((2, 16))[:, ::2]
    elif bad == "mixed dtypes":
        rec = rec.astype(np.float32)
    elif bad == "integer":
        a, rec = np.zeros((2, 8), np.int64), np.zeros((2, 8), np.int64)
    elif bad == "shape":
        c_prev = np.zeros((2, 3))
    elif bad == "read-only output":
        h = np.broadcast_to(np.zeros(2), (2, 2))
    return a, rec, c_prev, c, tanh_c, h


@needs_ext
@pytest.mark.parametrize(
    "bad", ["non-contiguous", "mixed dtypes", "integer", "shape", "read-only output"]
)
def test_kernels_reject_bad_arrays(bad):
    _fused.lstm_fwd_step(*_lstm_step_args())  # the unspoiled arguments are fine
    with pytest.raises(ValueError):
        _fused.lstm_fwd_step(*_lstm_step_args(bad))
    with pytest.raises(TypeError):
        _fused.lstm_fwd_step(*_lstm_step_args()[:2])


def test_env_var_switches_the_kernels_off():
    code = "import charrnn.cells as c; print(c.accelerated())"
    env = {**os.environ, "CHARRNN_ACCEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    env.pop("CHARRNN_ACCEL")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(_fused is not None)
