"""Golden fixtures from PyTorch autograd for tests/test_inspect_gradients.py.

How to run (from the repository root, in an environment with torch; the tests never import
torch and read only the committed .npz files):

    pip install torch==2.13.0 numpy
    python scripts/make_inspect_fixtures.py     # writes tests/fixtures/inspect_*.npz

For cell in rnn/lstm/gru and embedding 5 (nn.Embedding) or 0 (one-hot): vocab 7, hidden 6,
2 layers, float64, weights drawn by a seeded numpy Generator. A text of 60 ids is cut into
N = 3 windows with max lag K = 8 and prime P = 10 as the CONTRACT defines them, and torch
computes, independently of charrnn:

* ``grad_norm`` (L, K+1): the mean over windows of ||dl/dh_l(K - k)||, by autograd on the
  hidden outputs (retain_grad) of a step-by-step run of torch's cells (nn.RNNCell /
  nn.LSTMCell / nn.GRUCell, whose equations are those of nn.RNN / nn.LSTM / nn.GRU);
* ``jacobian_norm`` (L, K+1): the mean over windows of the largest singular value of
  d s_l(K) / d s_l(K - k), with layer l's inputs held fixed, from
  torch.autograd.functional.jacobian of the k-step map (s = (h, c) for lstm);
* the inputs: ``ids``, every parameter under its CONTRACT name, and metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
V, H, L, K, N, P, TEXT = 7, 6, 2, 8, 3, 10, 60
CELL_TYPES = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def make_params(cell: str, emb: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    G = GATES[cell] * H
    p = {}
    if emb:
        p["embedding.weight"] = rng.standard_normal((V, emb))
    for k in range(L):
        fan_in = (emb or V) if k == 0 else H
        p[f"rnn.weight_ih_l{k}"] = rng.uniform(-0.8, 0.8, (G, fan_in))
        p[f"rnn.weight_hh_l{k}"] = rng.uniform(-0.8, 0.8, (G, H))
        p[f"rnn.bias_ih_l{k}"] = rng.uniform(-0.5, 0.5, G)
        p[f"rnn.bias_hh_l{k}"] = rng.uniform(-0.5, 0.5, G)
    p["head.weight"] = rng.uniform(-0.8, 0.8, (V, H))
    p["head.bias"] = rng.uniform(-0.5, 0.5, V)
    return p


def torch_cells(cell: str, p: dict[str, np.ndarray]) -> list[nn.Module]:
    cells = []
    for k in range(L):
        w = torch.from_numpy(p[f"rnn.weight_ih_l{k}"])
        m = CELL_TYPES[cell](w.shape[1], H, dtype=torch.float64)
        with torch.no_grad():
            m.weight_ih.copy_(w)
            m.weight_hh.copy_(torch.from_numpy(p[f"rnn.weight_hh_l{k}"]))
            m.bias_ih.copy_(torch.from_numpy(p[f"rnn.bias_ih_l{k}"]))
            m.bias_hh.copy_(torch.from_numpy(p[f"rnn.bias_hh_l{k}"]))
        cells.append(m)
    return cells


def step(cell: str, m: nn.Module, x, state):
    if cell == "lstm":
        return m(x, state)
    return (m(x, state[0]),)


def fixture(cell: str, emb: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = make_params(cell, emb, rng)
    ids = rng.integers(0, V, TEXT)
    cells = torch_cells(cell, p)
    n = len(ids)
    starts = (np.arange(N) * (n - (P + K + 2))) // max(N - 1, 1)
    text = torch.from_numpy(ids[starts[None, :] + np.arange(P + K + 2)[:, None]])  # (P+K+2, N)
    if emb:
        inputs = F.embedding(text, torch.from_numpy(p["embedding.weight"]))
    else:
        inputs = F.one_hot(text, V).double()
    ns = 2 if cell == "lstm" else 1
    state = [tuple(torch.zeros(N, H, dtype=torch.float64) for _ in range(ns)) for _ in range(L)]
    with torch.no_grad():
        for t in range(P):
            x = inputs[t]
            for k in range(L):
                state[k] = step(cell, cells[k], x, state[k])
                x = state[k][0]
    hs = [[None] * (K + 1) for _ in range(L)]  # the hidden outputs, kept for autograd
    layer_inputs = [[None] * (K + 1) for _ in range(L)]
    states = [[None] * (K + 1) for _ in range(L)]
    for s in range(K + 1):
        x = inputs[P + s]
        for k in range(L):
            layer_inputs[k][s] = x.detach()
            state[k] = step(cell, cells[k], x, state[k])
            state[k][0].retain_grad()
            hs[k][s] = state[k][0]
            states[k][s] = tuple(v.detach() for v in state[k])
            x = state[k][0]
    logits = x @ torch.from_numpy(p["head.weight"]).T + torch.from_numpy(p["head.bias"])
    loss = F.cross_entropy(logits, text[P + K + 1], reduction="sum")  # windows independent
    loss.backward()
    grad_norm = np.array([[hs[k][K - lag].grad.norm(dim=1).mean().item()
                           for lag in range(K + 1)] for k in range(L)])

    jac_norm = np.ones((L, K + 1))
    for k in range(L):
        for lag in range(1, K + 1):
            sigmas = []
            for i in range(N):
                s0 = torch.cat([v[i] for v in states[k][K - lag]])  # the state at K - lag

                def run(flat, k=k, lag=lag, i=i):
                    st = tuple(flat[j * H : (j + 1) * H][None] for j in range(ns))
                    for s in range(K - lag + 1, K + 1):
                        st = step(cell, cells[k], layer_inputs[k][s][i : i + 1], st)
                    return torch.cat([v[0] for v in st])

                J = torch.autograd.functional.jacobian(run, s0)  # (S, S)
                sigmas.append(torch.linalg.matrix_norm(J, ord=2).item())
            jac_norm[k, lag] = float(np.mean(sigmas))
    out = {f"param.{k}": v for k, v in p.items()}
    out.update(ids=ids, grad_norm=grad_norm, jacobian_norm=jac_norm,
               max_lag=np.array(K), windows=np.array(N), prime=np.array(P),
               cell=np.array(cell), torch_version=np.array(torch.__version__))
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for j, cell in enumerate(("rnn", "lstm", "gru")):
        for emb in (5, 0):
            name = f"inspect_{cell}_{'emb' if emb else 'onehot'}.npz"
            np.savez(OUT / name, **fixture(cell, emb, seed=100 + 10 * j + emb))
            print("wrote", OUT / name)


if __name__ == "__main__":
    main()
