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

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import blas
from .cells import (
    CELLS,
    Cell,
    State,
    Workspace,
    accelerated,
    buffer,
    gate_scale,
    kernels,
    pack_panels,
    project,
)
from .parallel import columns, concatenate, run_groups, stream_groups

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
    weight_drop: float = 0.0  # DropConnect on weight_hh in training, one mask per window
    input_dropout: float = 0.0  # locked dropout on the embedded characters, one mask per window


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


def cross_entropy_(
    logits: np.ndarray, targets: np.ndarray, denominator: int | None = None
) -> tuple[float, np.ndarray]:
    """Summed NLL of N rows / `denominator` (default N: the mean) and its gradient, computed
    in place in `logits` (N, V)."""
    N = len(targets)
    rows = np.arange(N)
    logits -= logits.max(axis=1, keepdims=True)
    target_logit = logits[rows, targets]  # (N,)
    np.exp(logits, out=logits)
    total = logits.sum(axis=1)  # (N,)
    denominator = N if denominator is None else denominator
    loss = float(np.sum(np.log(total) - target_logit, dtype=np.float64)) / denominator
    logits /= total[:, None]  # softmax
    logits[rows, targets] -= 1.0
    logits /= denominator
    return loss, logits


def scatter_add_rows(ids: np.ndarray, rows: np.ndarray, num: int) -> np.ndarray:
    """out[v] = sum of rows[n] where ids[n] == v: (N,), (N, D) -> (num, D).

    The gradient of a row gather (embedding lookup, one-hot projection): sort the ids,
    then one segmented sum, instead of the much slower unbuffered np.add.at."""
    order = np.argsort(ids, kind="stable")  # (N,)
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # (U,)
    out = np.zeros((num, rows.shape[1]), rows.dtype)
    out[sorted_ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def _input_mask(masks: list[np.ndarray] | None, num_layers: int) -> np.ndarray | None:
    """The (B, E) input-dropout mask that `CharRNN.dropout_masks` puts after the layers'."""
    return masks[num_layers] if masks is not None and len(masks) > num_layers else None


def apply_weight_masks_(grads: Params, weight_masks: list[np.ndarray] | None) -> None:
    """weight_hh gradients of W_hh * M (weight drop) to those of the raw W_hh: times M, once
    for all the groups (and ranks) summed."""
    if weight_masks is not None:
        for k, M in enumerate(weight_masks):
            grads[f"rnn.weight_hh_l{k}"] *= M  # (G*H, H)


# ---------------------------------------------------------------------------------------


class _Prepared:
    """The weights in the forms the passes use, made once while the parameters do not change
    (CharRNN.frozen) and shared by a model and its replicas, whichever thread asks first."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] | None = None  # None: outside a frozen scope
        # the scope's DropConnect masks on weight_hh, one (G*H, H) per layer, or None
        self.weight_masks: list[np.ndarray] | None = None
        self.buffers: Workspace = {}  # packed weights, reused from scope to scope
        self.lock = threading.RLock()  # making one form may ask for another


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
        self._ws: list[Workspace] = [{} for _ in range(shape.num_layers)]  # forward, per layer
        self._bwd_ws: Workspace = {}  # backward scratch: layers run one after another, share it
        self._top: Workspace = {}
        self._prepared = _Prepared()  # see frozen()
        self._replicas: list[CharRNN] = [self]  # see replicas()

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
        """One inverted-dropout mask per layer output (B, H), shared by every step of a window,
        then, when shape.input_dropout is on, one (B, E) for the embedded characters that
        layer 0 reads. None when both are off. The layer masks are drawn first, so a run
        without input dropout draws exactly what it did before the option existed; with
        input dropout but no layer dropout the layer masks are ones (exact)."""
        p, p_in = self.shape.dropout, self.shape.input_dropout
        if p <= 0 and p_in <= 0:
            return None
        H, L = self.shape.hidden_size, self.shape.num_layers
        if p > 0:
            keep = [rng.random((batch_size, H)) >= p for _ in range(L)]
            masks = [(k / (1.0 - p)).astype(self.dtype) for k in keep]
        else:
            masks = [np.ones((batch_size, H), self.dtype) for _ in range(L)]
        if p_in > 0:
            keep_in = rng.random((batch_size, self.shape.embedding_size)) >= p_in  # (B, E)
            masks.append((keep_in / (1.0 - p_in)).astype(self.dtype))
        return masks

    def weight_drop_masks(self, rng: np.random.Generator) -> list[np.ndarray] | None:
        """One DropConnect mask per layer for weight_hh (G*H, H), shared by every stream, thread
        group and step of a window: 0 where a weight is dropped, 1/(1-p) where it is kept.
        None when shape.weight_drop is 0, and then `rng` is not touched.

        Drawn for the whole weight, layer after layer, whatever the batch and the number of
        threads, so that every process drawing from the same generator gets the same masks."""
        p = self.shape.weight_drop
        if p <= 0:
            return None
        G, H = self.cell.gates * self.shape.hidden_size, self.shape.hidden_size
        keep = [rng.random((G, H)) >= p for _ in range(self.shape.num_layers)]  # (G*H, H)
        return [(k / (1.0 - p)).astype(self.dtype) for k in keep]

    # -- a whole window --------------------------------------------------------------------

    def replicas(self, n: int) -> list[CharRNN]:
        """n models for n threads, this one first, each with work buffers of its own and all
        sharing this model's parameters and its frozen-scope preparations."""
        while len(self._replicas) < n:
            replica = CharRNN(self.shape, self.params)
            replica._prepared = self._prepared
            self._replicas.append(replica)
        return self._replicas[:n]

    @contextmanager
    def frozen(self, weight_masks: list[np.ndarray] | None = None) -> Iterator[CharRNN]:
        """A scope in which the parameters do not change (a training window, scoring): the
        weights in the forms the passes use (scaled, packed, the input table) are made once
        instead of on every call, and shared with the replicas.

        With `weight_masks` (`weight_drop_masks`), forward and backward use the recurrent
        weights W_hh * M of layer k, M = weight_masks[k], made once for the scope; backward's
        weight_hh gradients are then with respect to W_hh * M (loss_and_grads multiplies them
        by M). A scope inside another has the outer one's masks."""
        prepared = self._prepared
        if prepared.cache is not None:  # already inside
            outer = prepared.weight_masks
            if weight_masks is not None and (
                outer is None or not all(map(np.array_equal, weight_masks, outer))
            ):
                raise ValueError("weight masks cannot change inside a frozen scope")
            yield self
            return
        if weight_masks is not None:
            weight_masks = self._checked_weight_masks(weight_masks)
        prepared.cache = {}
        prepared.weight_masks = weight_masks
        try:
            yield self
        finally:
            prepared.cache = None
            prepared.weight_masks = None

    def _checked_weight_masks(self, weight_masks: list[np.ndarray]) -> list[np.ndarray]:
        """The masks in the model's dtype (a float64 mask would turn a float32 weight into
        float64, off the compiled kernels), after a check of their number and shapes."""
        shape = param_shapes(self.shape)["rnn.weight_hh_l0"]
        if len(weight_masks) != self.shape.num_layers or any(
            m.shape != shape for m in weight_masks
        ):
            raise ValueError(
                f"weight masks: one {shape} array per layer ({self.shape.num_layers}) expected"
            )
        return [np.asarray(m, dtype=self.dtype) for m in weight_masks]

    def _recurrent(self, k: int) -> np.ndarray:
        """Layer k's recurrent weight (G*H, H) as this scope's passes use it: weight_hh, or
        weight_hh * M under the scope's DropConnect mask M (made once per scope)."""
        W_hh = self.params[f"rnn.weight_hh_l{k}"]  # (G*H, H)
        masks = self._prepared.weight_masks
        if masks is None:
            return W_hh
        return self._prepare(f"W_hh{k}", lambda: W_hh * masks[k])  # (G*H, H)

    def _prepare(self, key: str, make: Callable[[], Any]) -> Any:
        prepared = self._prepared
        with prepared.lock:
            if prepared.cache is None:
                return make()
            if key not in prepared.cache:
                prepared.cache[key] = make()
            return prepared.cache[key]

    def _layer_weights(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer k's (W_in (G*H, I), b_in (G*H,), W_rec (G*H, H)) as the forward loop takes
        them: see `Cell.input_weights` and `Cell.recurrent_weights`."""

        def make():
            p, cell = self.params, self.cell
            W_in, b_in = cell.input_weights(
                p[f"rnn.weight_ih_l{k}"], p[f"rnn.bias_ih_l{k}"], p[f"rnn.bias_hh_l{k}"]
            )
            return W_in, b_in, cell.recurrent_weights(self._recurrent(k))

        return self._prepare(f"layer{k}", make)

    def _packed(self, name: str, W: np.ndarray) -> np.ndarray | None:
        """pack_panels(W) for the compiled kernels, kept under `name` while the weights are
        frozen; None (packed where used) outside that scope or without the kernels."""
        if self._prepared.cache is None or not accelerated():
            return None
        return self._prepare(f"packed {name}", lambda: pack_panels(W, self._prepared.buffers, name))

    def _layer0_input(self, x: np.ndarray) -> np.ndarray | None:
        """The embedded characters (T, B, E), or None for one-hot input."""
        if "embedding.weight" not in self.params:
            return None
        return np.take(self.params["embedding.weight"], x, axis=0)

    def input_table(self) -> np.ndarray:
        """(V, G*H): layer 0's xproj for every character (see `Cell.input_weights`)."""

        def make():
            W_in, b_in, _ = self._layer_weights(0)
            emb = self.params.get("embedding.weight")
            table = W_in.T + b_in if emb is None else emb @ W_in.T + b_in  # (V, G*H)
            return np.ascontiguousarray(table)

        return self._prepare("table", make)

    def _layer0_projection(self, x: np.ndarray, ws: Workspace) -> np.ndarray:
        """Layer 0's xproj (T, B, G*H). There are only V distinct inputs, so when V is no more
        than T*B (or the input is one-hot) the projection is a row gather from
        `input_table()`: no (T*B)-row GEMM and no bias pass."""
        T, B = x.shape
        G = self.cell.gates * self.shape.hidden_size
        xproj = buffer(ws, "xproj", (T, B, G), self.dtype)  # (T, B, G*H)
        if "embedding.weight" not in self.params or self.shape.vocab_size <= T * B:
            # ids are vocabulary indices; mode="clip" spares the copy that numpy makes to
            # honour the default mode="raise" with out= (4x slower)
            np.take(self.input_table(), x, axis=0, out=xproj, mode="clip")
            return xproj
        W_in, b_in, _ = self._layer_weights(0)
        return project(self._layer0_input(x), W_in, b_in, xproj, self._packed("W_in0", W_in))

    def forward(self, x: np.ndarray, state: list[State], masks: list[np.ndarray] | None = None):
        """x (T, B) ids -> logits (T*B, V), final state, cache for `backward`.

        The logits and the cache live in reusable buffers: valid until the next call."""
        T, B = x.shape
        p, L = self.params, self.shape.num_layers
        inputs, caches, new_state = [], [], []
        inp = None  # layer 0's input is gathered again by backward, when it needs it
        input_mask = _input_mask(masks, L)
        for k in range(L):
            ws = self._ws[k]
            W_in, b_in, W_rec = self._layer_weights(k)
            if k == 0 and input_mask is None:
                xproj = self._layer0_projection(x, ws)
            else:
                if k == 0:  # dropped embeddings: no table of V rows, a (T*B, E) GEMM below
                    E = self.shape.embedding_size
                    inp = np.multiply(self._layer0_input(x), input_mask,
                                      out=buffer(ws, "dropped input", (T, B, E), self.dtype))
                xproj = buffer(ws, "xproj", (T, B, W_in.shape[0]), self.dtype)  # (T, B, G*H)
                project(inp, W_in, b_in, xproj, self._packed(f"W_in{k}", W_in))
            inputs.append(inp)
            hs, last, cache = self.cell.forward(
                xproj, state[k], W_rec, p[f"rnn.bias_hh_l{k}"], ws, self._packed(f"W_rec{k}", W_rec)
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
        truncated BPTT; the gradient checks use it). In a frozen scope with weight masks the
        weight_hh gradients are with respect to the masked weights W_hh * M (see `frozen`)."""
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
            W_hh = self._recurrent(k)  # (G*H, H), masked under weight drop
            dxproj, dW_hh, db_hh, dstate0[k] = self.cell.backward(
                dtop, dfinal, cache["caches"][k], W_hh, self._bwd_ws,
                self._packed(f"W_hh.T{k}", W_hh.T),
            )
            dx2 = dxproj.reshape(T * B, -1)  # (T*B, G*H)
            grads[f"rnn.weight_hh_l{k}"] = dW_hh
            grads[f"rnn.bias_hh_l{k}"] = db_hh
            grads[f"rnn.bias_ih_l{k}"] = dx2.sum(axis=0)
            inp = cache["inputs"][k]
            if inp is None and k == 0:
                inp = self._layer0_input(x)
            if inp is None:  # one-hot input: scatter the rows back to their characters
                dW_ih_T = scatter_add_rows(x.ravel(), dx2, W_ih.shape[1])  # (V, G*H)
                grads[f"rnn.weight_ih_l{k}"] = np.ascontiguousarray(dW_ih_T.T)
                continue
            grads[f"rnn.weight_ih_l{k}"] = dx2.T @ inp.reshape(T * B, -1)  # (G*H, I)
            dinp = (dx2 @ W_ih).reshape(T, B, -1)  # (T, B, I)
            if k > 0:
                dtop = dinp
            else:
                input_mask = _input_mask(cache["masks"], L)
                if input_mask is not None:
                    dinp *= input_mask
                grads["embedding.weight"] = scatter_add_rows(
                    x.ravel(), dinp.reshape(T * B, -1), self.shape.vocab_size
                )  # (V, E)
        return grads, dstate0

    def loss_and_grads(self, x, y, state, masks=None, dstate=None, weight_masks=None):
        """One truncated-BPTT window: mean NLL, gradients, final state (no gradient past it).

        `masks`: dropout masks (`dropout_masks`); `weight_masks`: DropConnect masks on
        weight_hh (`weight_drop_masks`), one per layer for the whole window: the recurrent
        weight used is W_hh * M, and since d(W_hh * M)/dW_hh = M elementwise, the gradient
        returned for weight_hh is dL/d(W_hh * M) * M.

        The batch's streams are split into groups that run on separate threads, each by one
        of `replicas()` (charrnn.parallel); the groups' losses and gradients add up to the
        batch's, their states are concatenated."""
        loss, grads, new_state, weight_masks = self.summed_groups(
            x, y, state, masks, dstate, weight_masks)
        apply_weight_masks_(grads, weight_masks)
        return loss, grads, new_state

    def summed_groups(self, x, y, state, masks=None, dstate=None, weight_masks=None,
                      denominator: int | None = None, single_blas: bool = False):
        """`loss_and_grads` before its last factor: (loss, grads, new state, the weight masks
        in the model's dtype or None), the weight_hh gradients still those of W_hh * M.

        Each group's NLL is divided by `denominator` (default this batch's T * B). An MPI
        rank passes the whole batch's, applies the masks once the ranks' sums are reduced
        (apply_weight_masks_), and asks for single-threaded BLAS even with one group, as
        each thread group of a single process has (charrnn.distributed)."""
        T, B = x.shape
        groups = stream_groups(B)
        replicas = self.replicas(len(groups))

        def run(g: int):
            cols = groups[g]
            return replicas[g]._group_loss_and_grads(
                x[:, cols],
                y[:, cols],
                columns(state, cols),
                None if masks is None else [m[cols] for m in masks],
                None if dstate is None else columns(dstate, cols),
                T * B if denominator is None else denominator,
            )

        # fixed for the window: the weights' forms (masked ones too) made once, shared
        with self.frozen(weight_masks), (blas.single_threaded() if single_blas else nullcontext()):
            results = run_groups(run, len(groups))
            weight_masks = self._prepared.weight_masks  # in the model's dtype
        loss, grads, _ = results[0]
        for other_loss, other_grads, _ in results[1:]:
            loss += other_loss
            for k, g in grads.items():
                g += other_grads[k]
        return loss, grads, concatenate([r[2] for r in results]), weight_masks

    def _group_loss_and_grads(self, x, y, state, masks, dstate, denominator: int):
        """loss_and_grads for a group of the batch's streams: its summed NLL / `denominator`
        (the whole batch's number of predictions) and the gradients of that."""
        logits, new_state, cache = self.forward(x, state, masks)
        loss, dlogits = cross_entropy_(logits, y.reshape(-1), denominator)
        grads, _ = self.backward(dlogits, cache, dstate)
        return loss, grads, new_state

    # -- one step, for sampling -------------------------------------------------------------

    def step(self, ids: np.ndarray, state: list[State]) -> tuple[np.ndarray, list[State]]:
        """ids (B,) -> logits (B, V) of the next character, and the next state."""
        logits, new_state, _ = self.forward(ids[None, :], state)
        return logits, new_state

    def stepper(self) -> Stepper:
        """A one-character-at-a-time runner with the weights laid out for it (sampling)."""
        return Stepper(self)


# Stepper: a step of at least this many FLOPs (about half a millisecond on one core) is split
# over threads; handing work to a thread and back costs tens of microseconds
PARALLEL_FLOPS = 50e6


class Stepper:
    """The model one step at a time, for generation, with its weights pre-arranged once:

    - layer 0's input projection for every character, E @ W_ih.T + b_ih (+ b_hh), is a
      (V, G*H) table, so a step starts with a row lookup instead of a GEMM;
    - the weights are in the forward loop's form (`Cell.input_weights`, `recurrent_weights`),
      the sigmoid gates as scaled tanh like the training path;
    - a step's elementwise work is one call to the compiled kernel of charrnn/_fused.c where
      it is built (the numpy lines beside it are the reference);
    - the matrix products of one stream are numpy's, whose BLAS spreads a vector product over
      the cores; those of several streams the compiled GEMM's, with the weights packed once
      here (BLAS is slow for a few rows: it re-packs the weights at every call).

    The weights are read when the Stepper is made, some of them copied: after a change to the
    model's parameters, make a new one.
    """

    def __init__(self, model: CharRNN):
        p, shape = model.params, model.shape
        self.cell = shape.cell
        self.H = H = shape.hidden_size
        self.table = model.input_table()  # (V, G)
        layers = [model._layer_weights(k) for k in range(shape.num_layers)]
        self.b_in = [b for _, b, _ in layers]  # (G,)
        self.scale = gate_scale(model.cell, H, model.dtype)  # (G,)
        self.shift = 1.0 - self.scale
        self.b_hn = [p[f"rnn.bias_hh_l{k}"][2 * H :] for k in range(shape.num_layers)]
        self.head_b = p["head.bias"]  # (V,)
        # a step's matrix products, (W, W packed for the compiled GEMM or None) each
        pack = pack_panels if accelerated() else lambda W: None
        self.in_products = [(W, pack(W)) for W, _, _ in layers[1:]]  # (G, H): layers 1, 2, ..
        self.rec_products = [(W, pack(W)) for _, _, W in layers]  # (G, H)
        self.head_product = (p["head.weight"], pack(p["head.weight"]))  # (V, H)
        products = (*self.in_products, *self.rec_products, self.head_product)
        self.flops = 2.0 * sum(W.size for W, _ in products)  # per stream

    @staticmethod
    def _product(x: np.ndarray, product: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
        """x (B, K) @ W.T -> (B, N) for product = (W, packed W): numpy's for one row, the
        compiled GEMM for more."""
        W, packed = product
        fused = kernels(x)
        if len(x) == 1 or fused is None or packed is None:
            return x @ W.T
        out = np.empty((len(x), W.shape[0]), x.dtype)
        fused.gemm(x, packed, out, False)
        return out

    def groups(self, streams: int) -> list[slice]:
        """How a step of `streams` streams is split over threads: one group below
        PARALLEL_FLOPS, else one per thread (charrnn.parallel.stream_groups)."""
        if streams * self.flops >= PARALLEL_FLOPS:
            return stream_groups(streams)
        return [slice(0, streams)]

    def step(self, ids: np.ndarray, state: list[State]) -> tuple[np.ndarray, list[State]]:
        """ids (B,) -> logits (B, V), next state (new arrays; `state` is not modified).

        A step of many streams (PARALLEL_FLOPS or more) is split into groups of streams on
        separate threads, as in training (charrnn.parallel)."""
        B = len(ids)
        groups = self.groups(B)
        if len(groups) == 1:
            return self.step_here(ids, state)
        results = run_groups(
            lambda g: self.step_here(ids[groups[g]], columns(state, groups[g])), len(groups)
        )
        return np.concatenate([r[0] for r in results]), concatenate([r[1] for r in results])

    def step_here(self, ids: np.ndarray, state: list[State]) -> tuple[np.ndarray, list[State]]:
        """`step` on the calling thread, the streams not split."""
        H = self.H
        new_state: list[State] = []
        inp = None
        for k, layer in enumerate(state):
            fused = kernels(*layer)
            if k == 0:
                xg = self.table[ids]  # (B, G)
            else:
                xg = self._product(inp, self.in_products[k - 1])  # (B, G)
                xg += self.b_in[k]
            h = layer[0]
            rec = self._product(h, self.rec_products[k])  # (B, G)
            if self.cell == "rnn":
                xg += rec
                if fused:  # the line below
                    h = np.empty_like(h)
                    fused.rnn_step(xg, h)
                else:
                    h = np.tanh(xg, out=xg)
                new_state.append((h,))
            elif self.cell == "lstm":
                xg += rec
                if fused:  # the lines below in one pass
                    h, c, tanh_c = np.empty_like(h), np.empty_like(h), np.empty_like(h)
                    fused.lstm_step(xg, layer[1], c, tanh_c, h)
                    new_state.append((h, c))
                    inp = h
                    continue
                np.tanh(xg, out=xg)
                xg *= self.scale
                xg += self.shift
                i, f, g, o = xg[:, :H], xg[:, H : 2 * H], xg[:, 2 * H : 3 * H], xg[:, 3 * H :]
                c = f * layer[1]
                c += i * g
                h = np.tanh(c)
                h *= o
                new_state.append((h, c))
            else:  # gru
                if fused:  # the lines below in one pass
                    h_new, hn = np.empty_like(h), np.empty_like(h)
                    fused.gru_step(xg, rec, self.b_hn[k], h, hn, h_new)
                    new_state.append((h_new,))
                    inp = h_new
                    continue
                rz = xg[:, : 2 * H]
                rz += rec[:, : 2 * H]
                np.tanh(rz, out=rz)
                rz *= 0.5
                rz += 0.5
                r, z, n = xg[:, :H], xg[:, H : 2 * H], xg[:, 2 * H :]
                hn = rec[:, 2 * H :]
                hn += self.b_hn[k]
                hn *= r
                n += hn
                np.tanh(n, out=n)
                h_new = h - n
                h_new *= z
                h_new += n
                h = h_new
                new_state.append((h,))
            inp = h
        logits = self._product(inp, self.head_product)  # (B, V)
        logits += self.head_b
        return logits, new_state
