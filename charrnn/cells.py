"""Recurrent cells as pure functions over a whole window, each backward beside its forward.

Conventions, shared by every cell (PyTorch's layout and gate order):

    xproj   (T, B, G*H)  the input part of every step's gate pre-activations, for the whole
                         window: x_t @ W_in.T + b_in with (W_in, b_in) = cell.input_weights(
                         W_ih, b_ih, b_hh), i.e. b_hh folded in wherever it simply adds and
                         the sigmoid gates' inputs pre-scaled by 0.5 (see `Cell`)
    W_rec   (G*H, H)     recurrent weights as the forward loop takes them,
                         cell.recurrent_weights(W_hh): the sigmoid gates' rows scaled by 0.5
    W_hh    (G*H, H)     the recurrent weights themselves (backward), b_hh (G*H,) (forward
                         only reads GRU's b_hn from it)
    state   tuple of (B, H) arrays: (h,) for rnn and gru, (h, c) for lstm

`forward(xproj, state, W_rec, b_hh, ws, packed=None)` returns the hidden states of the
window as hs (T+1, B, H) with hs[0] = h0, the final state, and a cache for backward.
`xproj` is overwritten (it becomes the activation buffer).  `ws` is a dict of preallocated
work buffers reused from window to window.  `packed` is pack_panels(W_rec), for callers that
keep the weights fixed over many windows (scoring); otherwise it is made here when needed.

`backward(dhs, dstate, cache, W_hh, ws, packed=None)` takes dL/dh_t for t = 1..T (T, B, H)
from the layer above and dL/dstate_T arriving from the next window (`packed`:
pack_panels(W_hh.T), made here when needed, as in forward), and returns
(dxproj (T, B, G*H), dW_hh, db_hh, dstate0).  dxproj is the gradient with respect to the
unscaled input pre-activation x_t @ W_ih.T + b_ih, so it is also dL/db_ih summed over (T, B).

Only the recurrent product h_{t-1} @ W_hh.T is done step by step; everything that can
be done for a whole window at once (the input projection, weight gradients) is one GEMM or
one ufunc over (T*B, ...), and what can be done to the weights instead of the activations
(bias folding, gate scaling) is done to the weights.

The step loops run in the optional compiled extension charrnn/_fused.c when it is built: one
call per layer and window, in which each step is a GEMM with weights packed once per window
(`pack_panels`; a BLAS GEMM re-packs them on every call and is slow for a batch of rows) and
one pass over the batch for the elementwise work.  The numpy loops beside each call are the
reference; the kernels compute the same arithmetic, so the results differ only by rounding:
the GEMM's summation order and, in the forward steps, the transcendental functions (libm's
tanh in float64; in float32 a vectorized tanh within 1.5e-7, and sigmoid gates as
1 / (1 + exp(-x)), within 1e-7 of numpy's 0.5 tanh(x/2) + 0.5).  The LSTM backward kernel
computes the window factors of the numpy path on the fly.  The kernels are used when the
extension is built and CHARRNN_ACCEL is not "0"; see `accelerated()`.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

KERNELS_API = 3  # the _fused functions this module calls; a stale build has another API
try:
    from . import _fused
except ImportError as error:  # not built (no C compiler at install time): numpy only
    _fused = None
    _UNUSABLE = f"the compiled extension charrnn._fused is not built ({error})"
else:
    _UNUSABLE = None
    if (_api := getattr(_fused, "API", None)) != KERNELS_API:  # left by a failed rebuild
        _UNUSABLE = (
            f"the compiled extension charrnn._fused is stale (API {_api}; this charrnn needs "
            f"{KERNELS_API}): rebuild it with `pip install -e .`"
        )
if os.environ.get("CHARRNN_ACCEL") == "0" or _UNUSABLE:
    _fused = None

State = tuple[np.ndarray, ...]
Workspace = dict[str, np.ndarray]


def buffer(ws: Workspace, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A work array from `ws`, reallocated only when the shape or dtype changes."""
    arr = ws.get(name)
    if arr is None or arr.shape != shape or arr.dtype != dtype:
        arr = ws[name] = np.empty(shape, dtype)
    return arr


def accelerated() -> bool:
    """Whether the step loops run the compiled kernels of charrnn/_fused.c."""
    return _fused is not None


def build_problem() -> str | None:
    """Why the compiled kernels cannot run whatever CHARRNN_ACCEL says (the extension is not
    built, or built from other sources), or None where they can. For CI: tests/conftest.py."""
    return _UNUSABLE


def kernels(*arrays: np.ndarray) -> Any:
    """The compiled kernels, or None to use numpy: off, or a caller's array they can't take
    (not C-contiguous, not native float32 or float64, not all of one dtype)."""
    if _fused is None or not arrays:
        return _fused
    dtype = arrays[0].dtype
    if dtype not in _KERNEL_DTYPES or not all(
        a.dtype == dtype and a.flags.c_contiguous for a in arrays
    ):
        return None
    return _fused


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # native byte order


PANEL = 16  # columns per panel of a packed weight matrix; _fused.PANEL


def pack_panels(W: np.ndarray, ws: Workspace | None = None, name: str = "packed") -> np.ndarray:
    """W (N, K) laid out for the compiled GEMM, out = a @ W.T: (ceil(N / PANEL), K, PANEL)
    with packed[p, k, j] = W[p * PANEL + j, k], zero past N. A layout, no arithmetic."""
    N, K = W.shape
    P, full = -(-N // PANEL), N // PANEL
    shape = (P, K, PANEL)
    packed = np.empty(shape, W.dtype) if ws is None else buffer(ws, name, shape, W.dtype)
    Wt = W.T  # (K, N)
    packed[:full] = Wt[:, : full * PANEL].reshape(K, full, PANEL).transpose(1, 0, 2)
    if full < P:
        packed[full] = 0
        packed[full, :, : N - full * PANEL] = Wt[:, full * PANEL :]
    return packed


def project(
    x: np.ndarray, W: np.ndarray, b: np.ndarray, out: np.ndarray, packed: np.ndarray | None = None
) -> np.ndarray:
    """out (T, B, N) = x (T, B, K) @ W.T + b: a whole window's input projection, one GEMM
    over its T*B rows (the compiled one, with `packed` = pack_panels(W) or packing here,
    when the kernels run)."""
    rows = out.reshape(-1, out.shape[-1])  # (T*B, N)
    x2 = x.reshape(len(rows), -1)  # (T*B, K)
    if fused := kernels(x2, rows):
        rows[...] = b
        fused.gemm(x2, pack_panels(W) if packed is None else packed, rows, True)
    else:
        np.matmul(x2, W.T, out=rows)
        rows += b
    return out


def _weight_grad(dpre: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """sum_t dpre_t^T @ inputs_t as a single GEMM: (T*B, G)^T @ (T*B, I) -> (G, I)."""
    g, i = dpre.shape[-1], inputs.shape[-1]
    return dpre.reshape(-1, g).T @ inputs.reshape(-1, i)


# ---------------------------------------------------------------------------------------
# Vanilla tanh RNN:  h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
# ---------------------------------------------------------------------------------------


def rnn_forward(xproj, state: State, W_rec, b_hh, ws: Workspace, packed=None):
    T, B, H = xproj.shape
    hs = buffer(ws, "hs", (T + 1, B, H), xproj.dtype)  # (T+1, B, H)
    hs[0] = state[0]
    if fused := kernels(xproj):  # the loop below, compiled
        packed = pack_panels(W_rec, ws) if packed is None else packed
        fused.rnn_forward(xproj, packed, hs)
        return hs, (hs[T].copy(),), {"hs": hs}
    tmp = buffer(ws, "tmp", (B, H), xproj.dtype)
    for t in range(T):
        np.matmul(hs[t], W_rec.T, out=tmp)  # (B, H)
        np.add(xproj[t], tmp, out=hs[t + 1])
        np.tanh(hs[t + 1], out=hs[t + 1])
    return hs, (hs[T].copy(),), {"hs": hs}


def rnn_backward(dhs, dstate: State, cache: dict[str, Any], W_hh, ws: Workspace, packed=None):
    hs = cache["hs"]
    T, B, H = dhs.shape
    dpre = buffer(ws, "dpre", (T, B, H), dhs.dtype)  # (T, B, H)
    # tanh' = 1 - h^2 for the whole window at once; then dpre_t = dh_t * tanh'_t
    np.multiply(hs[1:], hs[1:], out=dpre)
    np.subtract(1.0, dpre, out=dpre)
    dh = buffer(ws, "dh", (B, H), dhs.dtype)
    dh[...] = dstate[0]
    if fused := kernels(dhs):  # the loop below, compiled
        packed = pack_panels(W_hh.T, ws) if packed is None else packed
        fused.rnn_backward(dhs, packed, dh, dpre)
    else:
        for t in range(T - 1, -1, -1):
            dh += dhs[t]
            dpre[t] *= dh
            np.matmul(dpre[t], W_hh, out=dh)  # (B, H)
    dW_hh = _weight_grad(dpre, hs[:-1])
    return dpre, dW_hh, dpre.sum(axis=(0, 1)), (dh.copy(),)


# ---------------------------------------------------------------------------------------
# LSTM, gates (i, f, g, o):
#   i, f, o = sigmoid(.), g = tanh(.)   of W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
#   c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)
# ---------------------------------------------------------------------------------------

# The four gates are activated with a single tanh over (B, 4H): sigmoid(x) is
# 0.5 tanh(0.5 x) + 0.5, tanh(x) is 1.0 tanh(1.0 x) + 0.0; the 0.5 that scales the
# pre-activation is in the weights (`Cell.input_weights`, `Cell.recurrent_weights`).


class _GateAffine(NamedTuple):
    scale: np.ndarray  # (4H,) 0.5 for sigmoid gates, 1.0 for g
    shift: np.ndarray  # (4H,) 0.5 for sigmoid gates, 0.0 for g


def _lstm_affine(H: int, dtype: np.dtype, ws: Workspace) -> _GateAffine:
    scale = ws.get("scale")
    if scale is None or scale.shape != (4 * H,) or scale.dtype != dtype:
        ws["scale"] = gate_scale(CELLS["lstm"], H, dtype)
        ws["shift"] = 1.0 - ws["scale"]
    return _GateAffine(ws["scale"], ws["shift"])


def lstm_forward(xproj, state: State, W_rec, b_hh, ws: Workspace, packed=None):
    T, B, G = xproj.shape
    H = G // 4
    dt = xproj.dtype
    acts = xproj  # (T, B, 4H) becomes the gate activations
    hs = buffer(ws, "hs", (T + 1, B, H), dt)  # (T+1, B, H)
    cs = buffer(ws, "cs", (T + 1, B, H), dt)  # (T+1, B, H)
    tanh_c = buffer(ws, "tanh_c", (T, B, H), dt)  # (T, B, H)
    hs[0], cs[0] = state
    cache = {"hs": hs, "cs": cs, "tanh_c": tanh_c, "acts": acts}
    if fused := kernels(xproj):  # the loop below, compiled
        packed = pack_panels(W_rec, ws) if packed is None else packed
        fused.lstm_forward(acts, packed, hs, cs, tanh_c)
        return hs, (hs[T].copy(), cs[T].copy()), cache
    aff = _lstm_affine(H, dt, ws)
    rec = buffer(ws, "rec", (B, G), dt)
    ig = buffer(ws, "ig", (B, H), dt)
    for t in range(T):
        a = acts[t]  # (B, 4H)
        np.matmul(hs[t], W_rec.T, out=rec)  # (B, 4H)
        a += rec
        np.tanh(a, out=a)
        a *= aff.scale
        a += aff.shift
        i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
        np.multiply(f, cs[t], out=cs[t + 1])
        np.multiply(i, g, out=ig)
        cs[t + 1] += ig
        np.tanh(cs[t + 1], out=tanh_c[t])
        np.multiply(o, tanh_c[t], out=hs[t + 1])
    return hs, (hs[T].copy(), cs[T].copy()), cache


def lstm_backward(dhs, dstate: State, cache: dict[str, Any], W_hh, ws: Workspace, packed=None):
    hs, cs, tanh_c, acts = cache["hs"], cache["cs"], cache["tanh_c"], cache["acts"]
    T, B, H = dhs.shape
    dt = dhs.dtype
    dpre = buffer(ws, "dpre", (T, B, 4 * H), dt)  # (T, B, 4H)
    dh = buffer(ws, "dh", (B, H), dt)
    dc = buffer(ws, "dc", (B, H), dt)
    dh[...] = dstate[0]
    dc[...] = dstate[1]
    if fused := kernels(dhs):
        # the loop below, compiled; it computes the gate derivatives from the activations
        # as it goes: the same values as the numpy path's window factors
        packed = pack_panels(W_hh.T, ws) if packed is None else packed
        fused.lstm_backward(dhs, acts, cs, tanh_c, packed, dh, dc, dpre)
    else:
        # Everything that depends only on the forward pass is computed for the whole window:
        #   p = o * (1 - tanh(c_t)^2)               so that   dc  += dh * p
        #   q = [g, c_{t-1}, i, tanh(c_t)] * act'   so that   dpre = [dc, dc, dc, dh] * q
        # q is built in place of the activations (the cache is consumed).
        a4 = acts.reshape(T, B, 4, H)
        p = buffer(ws, "p", (T, B, H), dt)  # (T, B, H)
        np.multiply(tanh_c, tanh_c, out=p)
        np.subtract(1.0, p, out=p)
        p *= a4[:, :, 3]
        d4 = dpre.reshape(T, B, 4, H)  # act' until the loop
        np.subtract(1.0, acts, out=dpre)  # sigmoid' = (1 - a) a
        dpre *= acts
        np.multiply(a4[:, :, 2], a4[:, :, 2], out=d4[:, :, 2])  # tanh' = 1 - g^2
        np.subtract(1.0, d4[:, :, 2], out=d4[:, :, 2])
        f = buffer(ws, "f", (T, B, H), dt)  # (T, B, H) forget gate, for the loop
        np.copyto(f, a4[:, :, 1])
        np.copyto(a4[:, :, 1], cs[:-1])
        np.copyto(a4[:, :, 3], tanh_c)
        i_saved = tanh_c  # free now: holds i while i and g swap places
        np.copyto(i_saved, a4[:, :, 0])
        np.copyto(a4[:, :, 0], a4[:, :, 2])
        np.copyto(a4[:, :, 2], i_saved)
        acts *= dpre
        q4 = a4
        tmp = buffer(ws, "tmp", (B, H), dt)
        for t in range(T - 1, -1, -1):
            dh += dhs[t]
            np.multiply(dh, p[t], out=tmp)
            dc += tmp
            np.multiply(dc[:, None, :], q4[t, :, :3], out=d4[t, :, :3])  # di, df, dg
            np.multiply(dh, q4[t, :, 3], out=d4[t, :, 3])  # do
            dc *= f[t]  # through f to c_{t-1}
            np.matmul(dpre[t], W_hh, out=dh)  # (B, H)
    dW_hh = _weight_grad(dpre, hs[:-1])
    return dpre, dW_hh, dpre.sum(axis=(0, 1)), (dh.copy(), dc.copy())


# ---------------------------------------------------------------------------------------
# GRU, PyTorch's formulation, gates (r, z, n):
#   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
#   n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h
# ---------------------------------------------------------------------------------------


def gru_forward(xproj, state: State, W_rec, b_hh, ws: Workspace, packed=None):
    T, B, G = xproj.shape
    H = G // 3
    dt = xproj.dtype
    # r and z: sigmoid(x) = 0.5 tanh(0.5 x) + 0.5, the inner 0.5 already in xproj
    acts = xproj  # (T, B, 3H) becomes (r, z, n)
    hs = buffer(ws, "hs", (T + 1, B, H), dt)  # (T+1, B, H)
    hn = buffer(ws, "hn", (T, B, H), dt)  # (T, B, H)  W_hn h + b_hn, needed by backward
    rec = buffer(ws, "rec", (B, G), dt)
    tmp = buffer(ws, "tmp", (B, H), dt)
    b_hn = b_hh[2 * H :]
    hs[0] = state[0]
    cache = {"hs": hs, "hn": hn, "acts": acts}
    if fused := kernels(xproj, b_hn):  # the loop below, compiled
        packed = pack_panels(W_rec, ws) if packed is None else packed
        fused.gru_forward(acts, packed, b_hn, hs, hn, rec)
        return hs, (hs[T].copy(),), cache
    for t in range(T):
        a = acts[t]
        np.matmul(hs[t], W_rec.T, out=rec)  # (B, 3H)
        rz = a[:, : 2 * H]
        rz += rec[:, : 2 * H]
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5
        r, z, n = a[:, :H], a[:, H : 2 * H], a[:, 2 * H :]
        np.add(rec[:, 2 * H :], b_hn, out=hn[t])
        np.multiply(r, hn[t], out=tmp)
        n += tmp
        np.tanh(n, out=n)
        # h' = n + z * (h - n)
        np.subtract(hs[t], n, out=tmp)
        tmp *= z
        np.add(n, tmp, out=hs[t + 1])
    return hs, (hs[T].copy(),), cache


def gru_backward(dhs, dstate: State, cache: dict[str, Any], W_hh, ws: Workspace, packed=None):
    hs, hn, acts = cache["hs"], cache["hn"], cache["acts"]
    T, B, H = dhs.shape
    dt = dhs.dtype
    a3 = acts.reshape(T, B, 3, H)
    r, z, n = a3[:, :, 0], a3[:, :, 1], a3[:, :, 2]
    # Window-level factors from the forward pass, built in place where the cache allows
    # (the cache is consumed):
    #   dn_pre = dh * f_n,  f_n = (1 - z)(1 - n^2)        in place of n
    #   dz_pre = dh * f_z,  f_z = (h_{t-1} - n) z (1 - z)
    #   dr_pre = dn_pre * f_r,  f_r = hn r (1 - r)         in place of hn
    dn_pre = buffer(ws, "dn_pre", (T, B, H), dt)  # (T, B, H), scratch until the loop
    f_z = buffer(ws, "f_z", (T, B, H), dt)  # (T, B, H)
    np.subtract(1.0, z, out=dn_pre)
    np.subtract(hs[:-1], n, out=f_z)
    f_z *= z
    f_z *= dn_pre
    f_n = n
    np.multiply(n, n, out=f_n)
    np.subtract(1.0, f_n, out=f_n)
    f_n *= dn_pre
    f_r = hn
    np.subtract(1.0, r, out=dn_pre)
    dn_pre *= r
    f_r *= dn_pre

    drec = buffer(ws, "drec", (T, B, 3 * H), dt)  # (T, B, 3H) grads of W_hh h + b_hh
    dh = buffer(ws, "dh", (B, H), dt)
    tmp = buffer(ws, "tmp", (B, H), dt)
    dh[...] = dstate[0]
    if fused := kernels(dhs):  # the loop below, compiled
        packed = pack_panels(W_hh.T, ws) if packed is None else packed
        fused.gru_backward(dhs, acts, f_z, f_r, packed, dh, dn_pre, drec)
    else:
        for t in range(T - 1, -1, -1):
            q = drec[t]
            dh += dhs[t]
            np.multiply(dh, f_n[t], out=dn_pre[t])
            np.multiply(dh, f_z[t], out=q[:, H : 2 * H])
            np.multiply(dn_pre[t], f_r[t], out=q[:, :H])
            np.multiply(dn_pre[t], r[t], out=q[:, 2 * H :])
            dh *= z[t]
            np.matmul(q, W_hh, out=tmp)  # (B, H)
            dh += tmp
    dx = acts  # (T, B, 3H) grads of the input part: r, z as drec, n is dn_pre
    dx[..., : 2 * H] = drec[..., : 2 * H]
    a3[:, :, 2] = dn_pre
    dW_hh = _weight_grad(drec, hs[:-1])
    return dx, dW_hh, drec.sum(axis=(0, 1)), (dh.copy(),)


# ---------------------------------------------------------------------------------------


class Cell(NamedTuple):
    gates: int  # G: how many H-sized blocks W_ih and W_hh stack
    num_states: int  # 1 for (h,), 2 for (h, c)
    forward: Any
    backward: Any
    sigmoid_blocks: tuple[int, ...]  # gate blocks activated as 0.5 tanh(0.5 x) + 0.5
    folded_hh_blocks: int  # leading gate blocks whose b_hh adds straight to the input part

    def input_weights(
        self, W_ih: np.ndarray, b_ih: np.ndarray, b_hh: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(W_in (G*H, I), b_in (G*H,)) such that x @ W_in.T + b_in is the `xproj` the forward
        loop takes: the biases that simply add (all of b_hh but GRU's b_hn, which r
        multiplies) folded into one, and the sigmoid gates' rows scaled by 0.5. Doing this
        to the weights, once per window, costs O(G*H*I) instead of passes over (T, B, G*H)."""
        H = b_hh.shape[0] // self.gates
        scale = gate_scale(self, H, W_ih.dtype)  # (G*H,)
        b_in = b_ih.copy()
        folded = self.folded_hh_blocks * H
        b_in[:folded] += b_hh[:folded]
        return W_ih * scale[:, None], b_in * scale

    def recurrent_weights(self, W_hh: np.ndarray) -> np.ndarray:
        """W_rec (G*H, H): W_hh with the sigmoid gates' rows scaled by 0.5, for forward."""
        if not self.sigmoid_blocks:
            return W_hh
        return W_hh * gate_scale(self, W_hh.shape[1], W_hh.dtype)[:, None]


def gate_scale(cell: Cell, H: int, dtype: np.dtype) -> np.ndarray:
    """(G*H,): 0.5 on the sigmoid gates (sigmoid(x) = 0.5 tanh(0.5 x) + 0.5), 1 elsewhere."""
    scale = np.ones((cell.gates, H), dtype)
    scale[list(cell.sigmoid_blocks)] = 0.5
    return scale.reshape(-1)


CELLS: dict[str, Cell] = {
    "rnn": Cell(1, 1, rnn_forward, rnn_backward, sigmoid_blocks=(), folded_hh_blocks=1),
    "lstm": Cell(4, 2, lstm_forward, lstm_backward, sigmoid_blocks=(0, 1, 3), folded_hh_blocks=4),
    "gru": Cell(3, 1, gru_forward, gru_backward, sigmoid_blocks=(0, 1), folded_hh_blocks=2),
}
