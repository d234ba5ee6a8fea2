"""The recurrent cells written plainly, as the equations read: one step forward, its
vector-Jacobian product (BPTT), and its state Jacobian. The inspector's reference.

`charrnn.cells` is tuned for speed (scaled-tanh sigmoids, buffers that swap roles, compiled
loops); this module is tuned for reading. Every function takes arrays and returns arrays;
the forward returns the activations that its backward needs (a plain dict, the cache).
Weights are PyTorch's (gate order rnn h; lstm i, f, g, o; gru r, z, n), as in a checkpoint.

Notation, per layer and step (B streams, H units, G gate blocks):

    a_t = W_ih x_t + b_ih                (B, G*H)  the input part, one GEMM for a window
    u_t = W_hh h_{t-1} + b_hh            (B, G*H)  the recurrent part

BPTT in one line: the error on the state at step t-1 is the error on step t's state carried
back through the step Jacobian J_t = d s_t / d s_{t-1}, plus what step t-1's own outputs
receive. Over k steps the carried part is multiplied by J_t J_{t-1} ... J_{t-k+1}; for the
tanh RNN each factor is diag(1 - h_t^2) W_hh, so its norm is at most sigma_max(W_hh)^k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

State = tuple[np.ndarray, ...]  # (h,) or (h, c), each (B, H)
Cache = dict[str, np.ndarray]

GATES: dict[str, tuple[str, ...]] = {"rnn": ("h",), "lstm": ("i", "f", "g", "o"),
                                     "gru": ("r", "z", "n")}
# the activations `inspect gates` counts, and whether each is a sigmoid (else tanh-valued)
SATURATING: dict[str, tuple[tuple[str, bool], ...]] = {
    "rnn": (("h", False),),
    "lstm": (("i", True), ("f", True), ("g", False), ("o", True), ("cell", False)),
    "gru": (("r", True), ("z", True), ("n", False)),
}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.tanh(0.5 * x) + 0.5  # = 1 / (1 + exp(-x)), without overflow


@dataclass(frozen=True)
class LayerWeights:
    """One layer's tensors as a checkpoint stores them (PyTorch's names and gate order)."""

    cell: str
    W_ih: np.ndarray  # (G*H, I)
    W_hh: np.ndarray  # (G*H, H)
    b_ih: np.ndarray  # (G*H,)
    b_hh: np.ndarray  # (G*H,)

    @property
    def hidden_size(self) -> int:
        return self.W_hh.shape[1]

    def block(self, gate: str) -> np.ndarray:
        """The (H, H) block of W_hh that feeds `gate`."""
        H = self.hidden_size
        j = GATES[self.cell].index(gate)
        return self.W_hh[j * H : (j + 1) * H]


def layer_weights(params: dict[str, np.ndarray], cell: str, k: int,
                  dtype: np.dtype | None = None) -> LayerWeights:
    def get(name: str) -> np.ndarray:
        w = params[f"rnn.{name}_l{k}"]
        return w if dtype is None else w.astype(dtype)

    return LayerWeights(cell, get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))


def num_states(cell: str) -> int:
    return 2 if cell == "lstm" else 1


# ---------------------------------------------------------------------------------------
# tanh RNN:  h_t = tanh(a_t + u_t)
# ---------------------------------------------------------------------------------------


def rnn_step(a: np.ndarray, state: State, w: LayerWeights) -> tuple[State, Cache]:
    """h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""
    (h_prev,) = state
    h = np.tanh(a + h_prev @ w.W_hh.T + w.b_hh)  # (B, H)
    return (h,), {"h": h}


def rnn_vjp(dh: np.ndarray, dc: None, cache: Cache, w: LayerWeights) -> tuple[State, np.ndarray]:
    """Given dl/dh_t (total), return dl/dh_{t-1} through this step and dl/da_t.

    dz = dh * (1 - h_t^2);  dl/dh_{t-1} = dz W_hh;  dl/da_t = dz."""
    dz = dh * (1.0 - cache["h"] ** 2)  # (B, H)
    return (dz @ w.W_hh,), dz


def rnn_jacobian_right(P: np.ndarray, cache: Cache, w: LayerWeights) -> np.ndarray:
    """P @ J_t for P (B, S, H), with the step Jacobian

        J_t = d h_t / d h_{t-1} = diag(1 - h_t^2) W_hh                         (H, H)

    so P J_t = (P scaled column-wise by 1 - h_t^2) W_hh: one GEMM."""
    B, S, H = P.shape
    scaled = P * (1.0 - cache["h"] ** 2)[:, None, :]  # (B, S, H)
    return (scaled.reshape(B * S, H) @ w.W_hh).reshape(B, S, H)


# ---------------------------------------------------------------------------------------
# LSTM (PyTorch): i, f, o = sigmoid(.), g = tanh(.) of a_t + u_t, split in four blocks;
#   c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t);   the state is s_t = (h_t, c_t)
# ---------------------------------------------------------------------------------------


def lstm_step(a: np.ndarray, state: State, w: LayerWeights) -> tuple[State, Cache]:
    h_prev, c_prev = state
    H = h_prev.shape[1]
    z = a + h_prev @ w.W_hh.T + w.b_hh  # (B, 4H)
    i = sigmoid(z[:, :H])
    f = sigmoid(z[:, H : 2 * H])
    g = np.tanh(z[:, 2 * H : 3 * H])
    o = sigmoid(z[:, 3 * H :])
    c = f * c_prev + i * g  # (B, H)
    tanh_c = np.tanh(c)
    h = o * tanh_c  # (B, H)
    return (h, c), {"i": i, "f": f, "g": g, "o": o, "c_prev": c_prev, "cell": tanh_c, "h": h}


def lstm_vjp(dh: np.ndarray, dc: np.ndarray, cache: Cache,
             w: LayerWeights) -> tuple[State, np.ndarray]:
    """Given dl/dh_t (total) and dl/dc_t (from step t+1), return (dl/dh_{t-1}, dl/dc_{t-1})
    through this step and dl/da_t:

        dc_t += dh * o * (1 - tanh(c_t)^2)
        dz   = [dc_t g i(1-i),  dc_t c_{t-1} f(1-f),  dc_t i (1-g^2),  dh tanh(c_t) o(1-o)]
        dl/dh_{t-1} = dz W_hh,   dl/dc_{t-1} = dc_t * f,   dl/da_t = dz"""
    i, f, g, o, c_prev, tanh_c = (cache[k] for k in ("i", "f", "g", "o", "c_prev", "cell"))
    dc = dc + dh * o * (1.0 - tanh_c**2)
    dz = np.concatenate([
        dc * g * i * (1.0 - i),
        dc * c_prev * f * (1.0 - f),
        dc * i * (1.0 - g**2),
        dh * tanh_c * o * (1.0 - o),
    ], axis=1)  # (B, 4H)
    return (dz @ w.W_hh, dc * f), dz


def lstm_jacobian_right(P: np.ndarray, cache: Cache, w: LayerWeights) -> np.ndarray:
    """P @ J_t for P (B, S, 2H), the columns ordered (h, c), with the step Jacobian

        J_t = [[dh_t/dh_{t-1}, dh_t/dc_{t-1}],       dc_t/dc_{t-1} = diag(f)
               [dc_t/dh_{t-1}, dc_t/dc_{t-1}]]       dh_t/dc_{t-1} = diag(o (1 - tanh^2 c_t) f)
        C = dc_t/dh_{t-1} = diag(g i(1-i)) W_i + diag(c_{t-1} f(1-f)) W_f + diag(i (1-g^2)) W_g
        dh_t/dh_{t-1} = diag(tanh(c_t) o(1-o)) W_o + diag(o (1 - tanh^2 c_t)) C

    With Q = P_h diag(o (1 - tanh^2 c_t)) + P_c (what reaches c_t):
        P J_t = [ P_h diag(tanh(c_t) o(1-o)) W_o + Q C ,  Q diag(f) ]
    C is formed per stream, (H, H), so the products are two (S, H) @ (H, H) GEMMs a stream:
    half the flops of multiplying by the stacked (4H, H) W_hh."""
    i, f, g, o, c_prev, tanh_c = (cache[k] for k in ("i", "f", "g", "o", "c_prev", "cell"))
    H = P.shape[2] // 2
    P_h, P_c = P[:, :, :H], P[:, :, H:]  # (B, S, H) each
    row = lambda v: v[:, :, None]  # noqa: E731  (B, H) -> (B, H, 1), scales rows
    W_i, W_f, W_g, W_o = (w.block(gate) for gate in "ifgo")  # (H, H) each
    C = row(g * i * (1.0 - i)) * W_i + row(c_prev * f * (1.0 - f)) * W_f  # (B, H, H)
    C += row(i * (1.0 - g**2)) * W_g
    Q = P_h * (o * (1.0 - tanh_c**2))[:, None, :] + P_c  # (B, S, H)
    out = np.empty_like(P)
    np.matmul(Q, C, out=out[:, :, :H])
    out[:, :, :H] += P_h @ (row(tanh_c * o * (1.0 - o)) * W_o)
    np.multiply(Q, f[:, None, :], out=out[:, :, H:])
    return out


# ---------------------------------------------------------------------------------------
# GRU (PyTorch): r, z = sigmoid(a + u) of their blocks; hn = W_hn h_{t-1} + b_hn;
#   n = tanh(a_n + r * hn);   h_t = (1 - z) * n + z * h_{t-1}
# ---------------------------------------------------------------------------------------


def gru_step(a: np.ndarray, state: State, w: LayerWeights) -> tuple[State, Cache]:
    (h_prev,) = state
    H = h_prev.shape[1]
    u = h_prev @ w.W_hh.T + w.b_hh  # (B, 3H)
    r = sigmoid(a[:, :H] + u[:, :H])
    z = sigmoid(a[:, H : 2 * H] + u[:, H : 2 * H])
    hn = u[:, 2 * H :]  # (B, H)
    n = np.tanh(a[:, 2 * H :] + r * hn)
    h = (1.0 - z) * n + z * h_prev
    return (h,), {"r": r, "z": z, "n": n, "hn": hn, "h_prev": h_prev, "h": h}


def gru_vjp(dh: np.ndarray, dc: None, cache: Cache, w: LayerWeights) -> tuple[State, np.ndarray]:
    """Given dl/dh_t (total), return dl/dh_{t-1} through this step and dl/da_t:

        dn = dh (1-z);  dzn = dn (1-n^2)            (the pre-activation of n)
        dz_r = dzn hn r(1-r);  dz_z = dh (h_{t-1} - n) z(1-z)
        dl/da_t = [dz_r, dz_z, dzn]
        dl/dh_{t-1} = dh z + [dz_r, dz_z, dzn r] W_hh"""
    r, z, n, hn, h_prev = (cache[k] for k in ("r", "z", "n", "hn", "h_prev"))
    dzn = dh * (1.0 - z) * (1.0 - n**2)
    dz_r = dzn * hn * r * (1.0 - r)
    dz_z = dh * (h_prev - n) * z * (1.0 - z)
    da = np.concatenate([dz_r, dz_z, dzn], axis=1)  # (B, 3H)
    du = np.concatenate([dz_r, dz_z, dzn * r], axis=1)  # (B, 3H)
    return (dh * z + du @ w.W_hh,), da


def gru_jacobian_right(P: np.ndarray, cache: Cache, w: LayerWeights) -> np.ndarray:
    """P @ J_t for P (B, S, H), with the step Jacobian

        J_t = d h_t / d h_{t-1} = diag(z) + diag((h_{t-1} - n) z(1-z)) W_z
              + diag((1-z)(1-n^2)) [diag(r) W_n + diag(hn r(1-r)) W_r]

    J_t is formed per stream, (H, H), then one (S, H) @ (H, H) GEMM a stream."""
    r, z, n, hn, h_prev = (cache[k] for k in ("r", "z", "n", "hn", "h_prev"))
    row = lambda v: v[:, :, None]  # noqa: E731  (B, H) -> (B, H, 1), scales rows
    W_r, W_z, W_n = (w.block(gate) for gate in "rzn")  # (H, H) each
    dn = (1.0 - z) * (1.0 - n**2)  # (B, H)
    J = row(dn * hn * r * (1.0 - r)) * W_r + row((h_prev - n) * z * (1.0 - z)) * W_z
    J += row(dn * r) * W_n  # (B, H, H)
    idx = np.arange(z.shape[1])
    J[:, idx, idx] += z
    return P @ J


STEP = {"rnn": rnn_step, "lstm": lstm_step, "gru": gru_step}
VJP = {"rnn": rnn_vjp, "lstm": lstm_vjp, "gru": gru_vjp}
JACOBIAN_RIGHT = {"rnn": rnn_jacobian_right, "lstm": lstm_jacobian_right,
                  "gru": gru_jacobian_right}


def step_jacobian(cache: Cache, w: LayerWeights) -> np.ndarray:
    """The explicit step Jacobian d s_t / d s_{t-1}, (B, S, S): I @ J_t."""
    B, H = cache["h"].shape
    S = num_states(w.cell) * H
    eye = np.broadcast_to(np.eye(S, dtype=cache["h"].dtype), (B, S, S))
    return JACOBIAN_RIGHT[w.cell](np.ascontiguousarray(eye), cache, w)


# ---------------------------------------------------------------------------------------
# A layer over a window, and the whole model
# ---------------------------------------------------------------------------------------


def layer_forward(w: LayerWeights, inputs: np.ndarray,
                  state: State) -> tuple[np.ndarray, list[Cache], State]:
    """inputs (T, B, I) -> outputs h (T, B, H), the per-step caches, the final state.

    The input part of every step is one GEMM for the window; the loop does the rest."""
    T, B, n_in = inputs.shape
    a = (inputs.reshape(T * B, n_in) @ w.W_ih.T + w.b_ih).reshape(T, B, len(w.b_ih))  # (T, B, G*H)
    step = STEP[w.cell]
    caches = []
    for t in range(T):
        state, cache = step(a[t], state, w)
        caches.append(cache)
    outputs = (np.stack([c["h"] for c in caches]) if T
               else np.empty((0, B, w.hidden_size), inputs.dtype))  # (T, B, H)
    return outputs, caches, state


def layer_backward(w: LayerWeights, caches: list[Cache],
                   dh_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BPTT through one layer from zero error on its final state.

    dh_out (T, B, H): the error each step's output h_t receives from outside the layer
    (the head, the layer above). Returns the total dl/dh_t (T, B, H), the carried part
    included, and dl/dinputs (T, B, I) for the layer below."""
    T, B, H = dh_out.shape
    vjp = VJP[w.cell]
    dh_total = np.empty_like(dh_out)
    da = np.empty((T, B, w.W_ih.shape[0]), dh_out.dtype)  # (T, B, G*H)
    carry_h = np.zeros((B, H), dh_out.dtype)
    carry_c = np.zeros((B, H), dh_out.dtype) if w.cell == "lstm" else None
    for t in range(T - 1, -1, -1):
        dh_total[t] = dh_out[t] + carry_h
        prev, da[t] = vjp(dh_total[t], carry_c, caches[t], w)
        carry_h = prev[0]
        carry_c = prev[1] if w.cell == "lstm" else None
    dinputs = (da.reshape(T * B, -1) @ w.W_ih).reshape(T, B, -1)  # (T, B, I)
    return dh_total, dinputs


@dataclass(frozen=True)
class PlainModel:
    """A checkpoint's parameters, read by the plain equations (in `dtype`)."""

    cell: str
    layers: tuple[LayerWeights, ...]
    embedding: np.ndarray | None  # (V, E), None for one-hot input
    head_W: np.ndarray  # (V, H)
    head_b: np.ndarray  # (V,)

    @classmethod
    def from_params(cls, params: dict[str, np.ndarray], cell: str,
                    dtype: np.dtype | str | None = None) -> PlainModel:
        dtype = np.dtype(dtype) if dtype is not None else params["head.weight"].dtype
        L = sum(1 for k in params if k.startswith("rnn.weight_hh_l"))
        emb = params.get("embedding.weight")
        return cls(cell, tuple(layer_weights(params, cell, k, dtype) for k in range(L)),
                   None if emb is None else emb.astype(dtype),
                   params["head.weight"].astype(dtype), params["head.bias"].astype(dtype))

    @property
    def dtype(self) -> np.dtype:
        return self.head_W.dtype

    @property
    def hidden_size(self) -> int:
        return self.head_W.shape[1]

    def zero_state(self, batch: int) -> list[State]:
        H = self.hidden_size
        return [tuple(np.zeros((batch, H), self.dtype) for _ in range(num_states(self.cell)))
                for _ in self.layers]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids (T, B) -> layer 0's inputs (T, B, E), or one-hot (T, B, V)."""
        if self.embedding is not None:
            return self.embedding[ids]
        return np.eye(self.head_W.shape[0], dtype=self.dtype)[ids]

    def forward(self, ids: np.ndarray, state: list[State]):
        """ids (T, B) -> logits (T, B, V), per-layer (outputs, caches), final state."""
        inputs = self.embed(ids)
        layers, final = [], []
        for w, s in zip(self.layers, state):
            inputs, caches, last = layer_forward(w, inputs, s)
            layers.append((inputs, caches))
            final.append(last)
        return inputs @ self.head_W.T + self.head_b, layers, final

    def run(self, ids: np.ndarray, state: list[State] | None = None,
            chunk: int = 2048) -> Iterator[tuple[np.ndarray, list[list[Cache]]]]:
        """A stateful pass over one stream of ids (N,) in chunks of steps: yields each
        chunk's logits (T, V) and per-layer caches (each (1, H) arrays), state carried."""
        state = self.zero_state(1) if state is None else state
        for s in range(0, len(ids), chunk):
            logits, layers, state = self.forward(ids[s : s + chunk, None], state)
            yield logits[:, 0], [caches for _, caches in layers]
