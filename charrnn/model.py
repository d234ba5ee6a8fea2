"""The character model: embedding (or one-hot) -> stacked recurrent cells -> softmax head.

Parameters live in one dict under PyTorch's names and shapes (CONTRACT), so a checkpoint
loads into torch.nn.Embedding + nn.RNN/LSTM/GRU + nn.Linear unchanged:

    embedding.weight       (V, E)          absent when embedding_size == 0 (one-hot input)
    rnn.weight_ih_l{k}     (G*H, I_k)      I_0 = E (or V), I_k = H above
    rnn.weight_hh_l{k}     (G*H, H)
    rnn.bias_ih_l{k}       (G*H,)
    rnn.bias_hh_l{k}       (G*H,)
    head.weight            (V, H)
    head.bias              (V,)

The recurrent state is owned by the caller (trainer, sampler, evaluator) and passed in and
out explicitly: a list with one tuple per layer, (h,) or (h, c), each (B, H).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cells import CELLS, Cell, State, Workspace, buffer

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelShape:
    """What fixes the tensor shapes: enough to rebuild a model from a checkpoint."""

    cell: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    embedding_size: int
    dropout: float = 0.0


def param_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    cell = CELLS[shape.cell]
    V, H, E = shape.vocab_size, shape.hidden_size, shape.embedding_size
    G = cell.gates * H
    shapes: dict[str, tuple[int, ...]] = {}
    if E > 0:
        shapes["embedding.weight"] = (V, E)
    for k in range(shape.num_layers):
        fan_in = (E if E > 0 else V) if k == 0 else H
        shapes[f"rnn.weight_ih_l{k}"] = (G, fan_in)
        shapes[f"rnn.weight_hh_l{k}"] = (G, H)
        shapes[f"rnn.bias_ih_l{k}"] = (G,)
        shapes[f"rnn.bias_hh_l{k}"] = (G,)
    shapes["head.weight"] = (V, H)
    shapes["head.bias"] = (V,)
    return shapes


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))  # sign fix makes the distribution uniform (Haar)


def _xavier(rng: np.random.Generator, fan_out: int, fan_in: int) -> np.ndarray:
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, (fan_out, fan_in))


def init_params(shape: ModelShape, rng: np.random.Generator, dtype: str = "float32") -> Params:
    """Xavier-uniform input and head weights, orthogonal recurrent blocks, zero biases
    except the LSTM forget gate (bias 1.0, carried by bias_ih)."""
    H, cell = shape.hidden_size, CELLS[shape.cell]
    params: Params = {}
    for name, shp in param_shapes(shape).items():
        if name == "embedding.weight":
            w = rng.standard_normal(shp)
        elif "weight_ih" in name:
            w = np.concatenate([_xavier(rng, H, shp[1]) for _ in range(cell.gates)])
        elif "weight_hh" in name:
            w = np.concatenate([_orthogonal(rng, H) for _ in range(cell.gates)])
        elif name == "head.weight":
            w = _xavier(rng, *shp)
        else:
            w = np.zeros(shp)
            if shape.cell == "lstm" and "bias_ih" in name:
                w[H : 2 * H] = 1.0
        params[name] = np.ascontiguousarray(w, dtype=dtype)
    return params


def num_params(params: Params) -> int:
    return sum(p.size for p in params.values())


# ---------------------------------------------------------------------------------------
# Softmax cross-entropy, stable through log-sum-exp.
# ---------------------------------------------------------------------------------------


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] for every row: (N, V), (N,) -> (N,)."""
    m = logits.max(axis=1, keepdims=True)  # (N, 1)
    lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]  # (N,)
    return lse - logits[np.arange(len(targets)), targets]


def cross_entropy_(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL over N rows and its gradient, computed in place in `logits` (N, V)."""
    N = len(targets)
    rows = np.arange(N)
    logits -= logits.max(axis=1, keepdims=True)
    target_logit = logits[rows, targets]  # (N,)
    np.exp(logits, out=logits)
    total = logits.sum(axis=1)  # (N,)
    loss = float(np.mean(np.log(total) - target_logit, dtype=np.float64))
    logits /= total[:, None]  # softmax
    logits[rows, targets] -= 1.0
    logits /= N
    return loss, logits


# ---------------------------------------------------------------------------------------


class CharRNN:
    """Parameters plus the window-level forward/backward and the one-step sampler path."""

    def __init__(self, shape: ModelShape, params: Params):
        expected = param_shapes(shape)
        if set(params) != set(expected):
            raise ValueError(f"parameter names differ: {sorted(set(params) ^ set(expected))}")
        self.shape = shape
        self.cell: Cell = CELLS[shape.cell]
        self.params = params
        self.dtype = next(iter(params.values())).dtype
        self._ws: list[Workspace] = [{} for _ in range(shape.num_layers)]
        self._top: Workspace = {}

    @classmethod
    def create(cls, shape: ModelShape, seed: int, dtype: str = "float32") -> CharRNN:
        return cls(shape, init_params(shape, np.random.default_rng(seed), dtype))

    @property
    def num_params(self) -> int:
        return num_params(self.params)

    def zero_state(self, batch_size: int) -> list[State]:
        H = self.shape.hidden_size
        return [
            tuple(np.zeros((batch_size, H), self.dtype) for _ in range(self.cell.num_states))
            for _ in range(self.shape.num_layers)
        ]

    def dropout_masks(self, rng: np.random.Generator, batch_size: int) -> list[np.ndarray] | None:
        """One inverted-dropout mask per layer output (B, H), shared by every step of a window."""
        p = self.shape.dropout
        if p <= 0:
            return None
        H = self.shape.hidden_size
        keep = [rng.random((batch_size, H)) >= p for _ in range(self.shape.num_layers)]
        return [(k / (1.0 - p)).astype(self.dtype) for k in keep]

    # -- a whole window --------------------------------------------------------------------

    def _layer0_projection(self, x: np.ndarray, ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
        """Returns (input of layer 0 (T, B, I) or None for one-hot, xproj (T, B, G*H))."""
        T, B = x.shape
        p = self.params
        W_ih, b_ih = p["rnn.weight_ih_l0"], p["rnn.bias_ih_l0"]
        xproj = buffer(ws, "xproj", (T, B, W_ih.shape[0]), self.dtype)  # (T, B, G*H)
        if "embedding.weight" in p:
            emb = p["embedding.weight"]
            inp = buffer(ws, "inp", (T, B, emb.shape[1]), self.dtype)  # (T, B, E)
            np.take(emb, x, axis=0, out=inp)
            np.matmul(inp.reshape(T * B, -1), W_ih.T, out=xproj.reshape(T * B, -1))
        else:
            # one-hot input: the projection is a row gather of W_ih.T
            inp = None
            np.take(W_ih.T, x, axis=0, out=xproj)
        xproj += b_ih
        return inp, xproj

    def forward(self, x: np.ndarray, state: list[State], masks: list[np.ndarray] | None = None):
        """x (T, B) ids -> logits (T*B, V), final state, cache for `backward`.

        The logits and the cache live in reusable buffers: valid until the next call."""
        T, B = x.shape
        p, L = self.params, self.shape.num_layers
        inputs, caches, new_state = [], [], []
        inp, xproj = self._layer0_projection(x, self._ws[0])
        for k in range(L):
            ws = self._ws[k]
            if k > 0:
                W_ih = p[f"rnn.weight_ih_l{k}"]
                xproj = buffer(ws, "xproj", (T, B, W_ih.shape[0]), self.dtype)
                np.matmul(inp.reshape(T * B, -1), W_ih.T, out=xproj.reshape(T * B, -1))
                xproj += p[f"rnn.bias_ih_l{k}"]
            inputs.append(inp)
            hs, last, cache = self.cell.forward(
                xproj, state[k], p[f"rnn.weight_hh_l{k}"], p[f"rnn.bias_hh_l{k}"], ws
            )
            caches.append(cache)
            new_state.append(last)
            inp = hs[1:]  # (T, B, H)
            if masks is not None:
                inp = np.multiply(inp, masks[k], out=buffer(ws, "dropped", inp.shape, self.dtype))
        top = inp.reshape(T * B, -1)  # (T*B, H)
        logits = buffer(self._top, "logits", (T * B, self.shape.vocab_size), self.dtype)
        np.matmul(top, p["head.weight"].T, out=logits)
        logits += p["head.bias"]
        cache = {"x": x, "inputs": inputs, "caches": caches, "top": top, "masks": masks}
        return logits, new_state, cache

    def backward(self, dlogits: np.ndarray, cache: dict, dstate: list[State] | None = None):
        """dL/dlogits (T*B, V) -> (grads by parameter name, dL/d initial state per layer).

        `dstate` is the gradient arriving on the final state from a later window (zero under
        truncated BPTT; the gradient checks use it)."""
        p, L = self.params, self.shape.num_layers
        x = cache["x"]
        T, B = x.shape
        grads: Params = {}
        grads["head.weight"] = dlogits.T @ cache["top"]  # (V, H)
        grads["head.bias"] = dlogits.sum(axis=0)
        dtop = (dlogits @ p["head.weight"]).reshape(T, B, -1)  # (T, B, H)
        dstate0: list[State] = [()] * L
        for k in range(L - 1, -1, -1):
            if cache["masks"] is not None:
                dtop *= cache["masks"][k]
            if dstate is None:
                dfinal = tuple(np.zeros_like(dtop[0]) for _ in range(self.cell.num_states))
            else:
                dfinal = dstate[k]
            W_ih = p[f"rnn.weight_ih_l{k}"]
            dxproj, dW_hh, db_hh, dstate0[k] = self.cell.backward(
                dtop, dfinal, cache["caches"][k], p[f"rnn.weight_hh_l{k}"], self._ws[k]
            )
            dx2 = dxproj.reshape(T * B, -1)  # (T*B, G*H)
            grads[f"rnn.weight_hh_l{k}"] = dW_hh
            grads[f"rnn.bias_hh_l{k}"] = db_hh
            grads[f"rnn.bias_ih_l{k}"] = dx2.sum(axis=0)
            inp = cache["inputs"][k]
            if inp is None:  # one-hot input: scatter the rows back to their characters
                dW_ih_T = np.zeros((W_ih.shape[1], W_ih.shape[0]), self.dtype)  # (V, G*H)
                np.add.at(dW_ih_T, x.ravel(), dx2)
                grads[f"rnn.weight_ih_l{k}"] = dW_ih_T.T.copy()
                continue
            grads[f"rnn.weight_ih_l{k}"] = dx2.T @ inp.reshape(T * B, -1)  # (G*H, I)
            dinp = (dx2 @ W_ih).reshape(T, B, -1)  # (T, B, I)
            if k > 0:
                dtop = dinp
            else:
                demb = np.zeros_like(p["embedding.weight"])  # (V, E)
                np.add.at(demb, x.ravel(), dinp.reshape(T * B, -1))
                grads["embedding.weight"] = demb
        return grads, dstate0

    def loss_and_grads(self, x, y, state, masks=None, dstate=None):
        """One truncated-BPTT window: mean NLL, gradients, final state (no gradient past it)."""
        logits, new_state, cache = self.forward(x, state, masks)
        loss, dlogits = cross_entropy_(logits, y.reshape(-1))
        grads, _ = self.backward(dlogits, cache, dstate)
        return loss, grads, new_state

    # -- one step, for sampling -------------------------------------------------------------

    def step(self, ids: np.ndarray, state: list[State]) -> tuple[np.ndarray, list[State]]:
        """ids (B,) -> logits (B, V) of the next character, and the next state."""
        logits, new_state, _ = self.forward(ids[None, :], state)
        return logits, new_state
