"""Gradient flow through time: how the error carried back k steps shrinks or grows.

For a window of the text (the CONTRACT's "inspect gradients" definitions):

    prime (P chars, no gradient)     steps s = 0 .. K            target
    ---------------------------->  [ x_0  x_1  ...  x_K ]  ->  x_{K+1}
         state from zero                               loss l = -log p(x_{K+1} | ...)

- grad_norm[k]: ||dl / dh_l(K - k)||, the total derivative (through every later step and
  every layer above), by BPTT with the plain equations of `charrnn.inspect.equations`;
- jacobian_norm[k]: sigma_max(d s_l(K) / d s_l(K - k)) with layer l's inputs held fixed,
  the product J_K J_{K-1} ... J_{K-k+1} of the step Jacobians, formed explicitly;
- weights: the spectral radius and largest singular value of each gate block of W_hh.

The windows run side by side as a batch, so each step is a few GEMMs for all of them. The
cost is dominated by the Jacobian products: for each layer and lag, a (N*S, G*H) @ (G*H, H)
GEMM (S = H, or 2H for lstm's (h, c)), i.e. about 2 N S G H^2 flops per step.

The seeds' bound: for the tanh RNN, J_s = diag(1 - h_s^2) W_hh and tanh' <= 1 (gamma = 1),
so ||J_K ... J_{K-k+1}|| <= sigma_max(W_hh)^k. For gated cells no such bound holds: lstm's
c_t = f * c_{t-1} + ... carries the error through diag(f) without touching W_hh, and the
gru's h_t = z * h_{t-1} + ... through diag(z); the gates, not sigma_max(W_hh), decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..parallel import run_groups, stream_groups
from .equations import GATES, JACOBIAN_RIGHT, PlainModel, layer_backward, num_states

HORIZON_RATIO = 1e-3  # the effective horizon: grad_norm below this fraction of lag 0's
EXACT_SVD_MAX_DIM = 64  # state sizes up to this get a full SVD; above, block power iteration
_BLOCK = 8  # vectors per block of the Krylov iteration
TOL32 = 1e-4  # float32: the 4 digits the table shows; float64 gets 1e-10


def window_starts(n: int, max_lag: int, windows: int, prime: int) -> np.ndarray:
    """a_i = floor(i (n - (P + K + 2)) / max(N - 1, 1)), i = 0 .. N-1 (CONTRACT).

    Raises DataError (naming what fits) when the text is shorter than one window."""
    need = prime + max_lag + 2
    if n < need:
        fits = []
        if n - 2 - prime >= 0:
            fits.append(f"--max-lag {n - 2 - prime}")
        if n - 2 - max_lag >= 0:
            fits.append(f"--prime {n - 2 - max_lag}")
        hint = f"; or use {' or '.join(fits)}" if fits else ""
        raise DataError(
            f"the text has {n} characters in the vocabulary, fewer than one window of "
            f"prime + max-lag + 2 = {prime} + {max_lag} + 2 = {need}{hint}"
        )
    i = np.arange(windows, dtype=np.int64)
    return (i * (n - need)) // max(windows - 1, 1)  # (N,)


def effective_horizon(grad_norm: list[float], ratio: float = HORIZON_RATIO) -> int | None:
    """The first lag whose grad_norm is below `ratio` times lag 0's; None if none is."""
    g0 = grad_norm[0]
    for k, g in enumerate(grad_norm):
        if g < ratio * g0:
            return k
    return None


def largest_singular_values(P: np.ndarray, start: np.ndarray | None = None,
                            exact_max_dim: int = EXACT_SVD_MAX_DIM,
                            ) -> tuple[np.ndarray, np.ndarray | None]:
    """sigma_max of each matrix of P (B, S, S), and a block of left vectors to warm-start
    the next call with.

    Small S: a full SVD. Otherwise block Krylov iteration (Musco and Musco 2015): from a
    block U of r left vectors, the subspace spanned by P^T U, (P^T P) P^T U, ... grows one
    block a round; sigma_max is the largest singular value of P restricted to it (a lower
    bound that rises to sigma_max), until it changes by less than the dtype's tolerance.
    The left singular vectors of J_K ... J_{K-k+1} change little from one lag to the next,
    so a warm start converges in two or three rounds, each two passes over P."""
    B, S, _ = P.shape
    if S <= exact_max_dim:
        return np.linalg.svd(P, compute_uv=False)[:, 0], None
    tol = 1e-10 if P.dtype == np.float64 else TOL32
    r = min(_BLOCK, S)
    if start is None:
        start = np.random.default_rng(0).standard_normal((B, S, r)).astype(P.dtype)
    PT = P.transpose(0, 2, 1)
    blocks = [PT @ start]  # (B, S, r) each
    sigma = np.zeros(B)
    for m in range(1, S // r + 1):
        Q = np.linalg.qr(np.concatenate(blocks, axis=2))[0]  # (B, S, m r) orthonormal basis
        Y = P @ Q  # (B, S, m r)
        U, s, _ = np.linalg.svd(Y, full_matrices=False)  # s (B, m r)
        new = s[:, 0].astype(np.float64)
        done = m > 1 and np.all(np.abs(new - sigma) <= tol * np.maximum(new, 1e-300))
        sigma = new
        if done:
            break
        blocks.append(PT @ Y[:, :, -r:])  # P^T P times the newest basis block
    return sigma, np.ascontiguousarray(U[:, :, :r])


@dataclass
class LayerFlow:
    layer: int
    grad_norm: list[float]  # (K+1,)
    jacobian_norm: list[float]  # (K+1,)
    weights: dict[str, dict[str, float]]  # gate -> spectral_radius, sigma_max

    @property
    def horizon(self) -> int | None:
        return effective_horizon(self.grad_norm)

    def bound(self, cell: str) -> list[float] | None:
        """The seeds' (gamma sigma_max(W_hh))^k, gamma = 1 for tanh; rnn only."""
        if cell != "rnn":
            return None
        s = self.weights["h"]["sigma_max"]
        return [s**k if k * math.log(max(s, 1e-300)) < 700 else math.inf
                for k in range(len(self.grad_norm))]


@dataclass
class GradientFlow:
    cell: str
    max_lag: int
    windows: int
    prime: int
    layers: list[LayerFlow]

    def horizons(self) -> list[int | None]:
        return [layer.horizon for layer in self.layers]

    def to_json(self) -> dict:
        """The CONTRACT object."""
        return {
            "cell": self.cell, "max_lag": self.max_lag, "windows": self.windows,
            "prime": self.prime,
            "layers": [{"layer": f.layer, "lag": list(range(self.max_lag + 1)),
                        "grad_norm": f.grad_norm, "jacobian_norm": f.jacobian_norm,
                        "weights": f.weights} for f in self.layers],
        }


def weight_spectra(plain: PlainModel) -> list[dict[str, dict[str, float]]]:
    """Per layer, per gate block of W_hh: its spectral radius and sigma_max."""
    out = []
    for w in plain.layers:
        blocks = {}
        for gate in GATES[plain.cell]:
            W = w.block(gate).astype(np.float64)  # (H, H)
            blocks[gate] = {"spectral_radius": float(np.abs(np.linalg.eigvals(W)).max()),
                            "sigma_max": float(np.linalg.norm(W, 2))}
        out.append(blocks)
    return out


def gradient_flow(
    params: dict[str, np.ndarray],
    cell: str,
    ids: np.ndarray,
    max_lag: int = 100,
    windows: int = 16,
    prime: int = 200,
    dtype: str | np.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    exact_max_dim: int = EXACT_SVD_MAX_DIM,
) -> GradientFlow:
    """The CONTRACT's gradient-flow measures of a model (its checkpoint `params`, `cell`)
    on the text `ids`, in `dtype` (default: the model's own).

    The windows are independent: they are split into groups, one per core, each measured
    on its own thread (charrnn.parallel); every number is per window, then averaged, so
    the split changes nothing but rounding. `progress(n)` is called as the Jacobian
    products advance, num_layers * max_lag steps in all (per group)."""
    if max_lag < 0 or windows < 1 or prime < 0:
        raise ValueError("max_lag and prime must be >= 0 and windows >= 1")
    plain = PlainModel.from_params(params, cell, dtype)
    K, N, P = max_lag, windows, prime
    starts = window_starts(len(ids), K, N, P)
    steps = starts[None, :] + np.arange(P + K + 2)[:, None]  # (P+K+2, N)
    text = np.asarray(ids)[steps].astype(np.int64)  # (P+K+2, N)
    groups = stream_groups(N)
    results = run_groups(
        lambda g: _measure(plain, text[:, groups[g]], P, K, exact_max_dim, progress), len(groups)
    )
    grad = np.concatenate([r[0] for r in results], axis=2)  # (L, K+1, N)
    jac = np.concatenate([r[1] for r in results], axis=2)  # (L, K+1, N)
    spectra = weight_spectra(plain)
    flows = [LayerFlow(k, [float(v) for v in grad[k].mean(axis=1)],
                       [float(v) for v in jac[k].mean(axis=1)], spectra[k])
             for k in range(len(plain.layers))]
    return GradientFlow(cell, K, N, P, flows)


def _measure(plain: PlainModel, text: np.ndarray, P: int, K: int, exact_max_dim: int,
             progress: Callable[[int], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """For windows text (P+K+2, B): per layer, lag and window, ||dl/dh_l(K-k)|| and
    sigma_max(d s_l(K) / d s_l(K-k)), each (L, K+1, B)."""
    B = text.shape[1]
    # forward: the prime from the zero state (its caches dropped), then the K+1 steps
    _, _, state = plain.forward(text[:P], plain.zero_state(B))
    logits, layers, _ = plain.forward(text[P : P + K + 1], state)  # (K+1, B, V)

    # dl/dlogits of the last step's cross-entropy: softmax - onehot(target)
    z = logits[K] - logits[K].max(axis=1, keepdims=True)  # (B, V)
    dlogits = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    dlogits[np.arange(B), text[P + K + 1]] -= 1.0
    dh_out = np.zeros((K + 1, B, plain.hidden_size), plain.dtype)  # what each h_s receives
    dh_out[K] = dlogits @ plain.head_W

    # BPTT, top layer first: its input gradients are what the layer below receives
    L = len(plain.layers)
    grad = np.empty((L, K + 1, B))
    for k in range(L - 1, -1, -1):
        dh_total, dh_out = layer_backward(plain.layers[k], layers[k][1], dh_out)  # (K+1, B, H)
        grad[k] = np.linalg.norm(dh_total.astype(np.float64), axis=2)[::-1]  # by lag K - s
    jac = np.stack([_jacobian_norms(w, layers[k][1], K, exact_max_dim, progress)
                    for k, w in enumerate(plain.layers)])
    return grad, jac


def _jacobian_norms(w, caches, K: int, exact_max_dim: int,
                    progress: Callable[[int], None] | None) -> np.ndarray:
    """sigma_max(J_K J_{K-1} ... J_{K-k+1}) for k = 0 .. K and each window: (K+1, B)."""
    B, H = caches[0]["h"].shape
    S = num_states(w.cell) * H
    right = JACOBIAN_RIGHT[w.cell]
    prod = np.ascontiguousarray(np.broadcast_to(np.eye(S, dtype=caches[0]["h"].dtype),
                                                (B, S, S)))  # (B, S, S)
    norms, start = np.ones((K + 1, B)), None
    for k in range(1, K + 1):
        prod = right(prod, caches[K - k + 1], w)  # (B, S, S) d s(K) / d s(K - k)
        norms[k], start = largest_singular_values(prod, start, exact_max_dim)
        if progress is not None:
            progress(1)
    return norms


# ---------------------------------------------------------------------------------------
# The command: a checkpoint and a text in, a report out
# ---------------------------------------------------------------------------------------


def inspect_gradients(checkpoint: str, text: str, max_lag: int = 100, windows: int = 16,
                      prime: int = 200, dtype: str | None = None,
                      plot_path: str | None = None,
                      progress: bool = False) -> tuple[GradientFlow, int]:
    """`charrnn inspect gradients`: the measures of a checkpoint (file or run directory) on
    a text file, and the number of characters outside the vocabulary that were dropped.
    `plot_path`, where the caller will draw, is checked first, before any work."""
    import sys

    from tqdm import tqdm

    from .inputs import open_inputs

    ckpt, ids, n_unknown = open_inputs(checkpoint, text, plot_path, plot=bool(plot_path))
    window_starts(len(ids), max_lag, windows, prime)  # refuse a short text before any work
    L = ckpt.config.model.num_layers
    groups = len(stream_groups(windows))
    with tqdm(total=L * max_lag * groups, disable=not progress, unit="lag", file=sys.stderr,
              desc="Jacobian products", leave=False) as bar:
        flow = gradient_flow(ckpt.params, ckpt.config.model.cell, ids, max_lag, windows, prime,
                             dtype, progress=bar.update)
    return flow, n_unknown


def _fmt(x: float) -> str:
    return f"{x:.3e}" if math.isfinite(x) else "inf"


def table_lags(max_lag: int, rows: int = 12) -> list[int]:
    """The lags the table shows: 0, 1, 2, then every few, and max_lag."""
    every = next(n * 10**e for e in range(12) for n in (1, 2, 5) if n * 10**e * rows >= max_lag)
    lags = sorted({0, 1, 2, *([5] if every >= 10 else []), *range(0, max_lag + 1, every),
                   max_lag})
    return [k for k in lags if k <= max_lag]


BOUND_NOTE = {
    "rnn": "bound: the seeds' (gamma sigma_max(W_hh))^k with gamma = 1, since tanh' <= 1;"
           " the measured Jacobian norm never exceeds it",
    "lstm": "no bound column: the lstm's error also flows through c_t = f * c_(t-1) + i * g,"
            " whose Jacobian diag(f) does not involve W_hh, so sigma_max(W_hh)^k bounds"
            " nothing; the forget gates decide",
    "gru": "no bound column: the gru's h_t = z * h_(t-1) + (1 - z) * n carries the error"
           " through diag(z) without W_hh, so sigma_max(W_hh)^k bounds nothing; the update"
           " gates decide",
}


def format_table(flow: GradientFlow) -> str:
    """The terminal report: per layer the weights' spectra, a row every few lags (grad norm
    relative to lag 0, the Jacobian norm, the bound for rnn), and the effective horizon."""
    lines = [f"{flow.cell}, {len(flow.layers)} layer(s); {flow.windows} windows, prime "
             f"{flow.prime}, lags 0..{flow.max_lag}"]
    for f in flow.layers:
        lines.append("")
        spectra = ", ".join(f"{g} rho {v['spectral_radius']:.3f} sigma {v['sigma_max']:.3f}"
                            for g, v in f.weights.items())
        lines.append(f"layer {f.layer}  W_hh blocks: {spectra}")
        bound = f.bound(flow.cell)
        head = f"  {'lag':>5}  {'grad_norm':>10}  {'relative':>10}  {'jacobian':>10}"
        lines.append(head + (f"  {'bound':>10}" if bound else ""))
        g0 = f.grad_norm[0]
        for k in table_lags(flow.max_lag):
            row = (f"  {k:>5}  {_fmt(f.grad_norm[k]):>10}  "
                   f"{_fmt(f.grad_norm[k] / g0 if g0 else math.nan):>10}  "
                   f"{_fmt(f.jacobian_norm[k]):>10}")
            lines.append(row + (f"  {_fmt(bound[k]):>10}" if bound else ""))
        h = f.horizon
        lines.append(f"  effective horizon: {h if h is not None else f'> {flow.max_lag}'} "
                     f"(first lag with grad_norm < {HORIZON_RATIO:g} x lag 0's)")
    lines.append("")
    lines.append(BOUND_NOTE[flow.cell])
    return "\n".join(lines)
