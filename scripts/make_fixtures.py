"""Golden fixtures from PyTorch for tests/test_torch_agreement.py.

How to run (from the repository root, in an environment with torch; the tests themselves
never import torch and read only the committed .npz files):

    pip install torch==2.13.0 numpy
    python scripts/make_fixtures.py            # writes tests/fixtures/torch_*.npz

The output is deterministic: every random draw comes from a seeded numpy Generator or
from torch.manual_seed, and the torch computations run in float64 on the CPU.

Two kinds of fixture:

* ``torch_{cell}_{emb|onehot}.npz`` -- for cell in rnn/lstm/gru and embedding_size 5
  (nn.Embedding) or 0 (one-hot input through F.one_hot): vocab 7, hidden 6, 2 layers,
  T=5, B=3, float64.  Weights, initial state (h0, and c0 for lstm), ids x, targets y and
  a gradient ``dstate`` arriving on the final state (as from a later window) are drawn by
  numpy and copied into torch under the CONTRACT names.  Stored outputs: logits (T*B, V),
  the final state h_n (and c_n) as (num_layers, B, H), the mean cross-entropy ``loss``,
  and the gradients of ``loss + sum(dstate_h * h_n) [+ sum(dstate_c * c_n)]`` with
  respect to every parameter (``grad.<name>``) and to the initial state (``grad_h0``,
  ``grad_c0``).
* ``torch_default_{cell}.npz`` -- the other direction of the contract: a model built
  with torch's own default initialisation (torch.manual_seed) whose ``state_dict()`` is
  exported verbatim, keys, shapes and float32 values as a checkpoint would hold them,
  with torch's logits for it (computed in float64 from a zero initial state).

Layout of every file (numpy only, no pickles): parameters under their CONTRACT names
("embedding.weight", "rnn.weight_ih_l0", ..., "head.bias"), the inputs ``x``, ``y``,
``h0``, ``c0``, ``dstate_h``, ``dstate_c`` (the c entries for lstm only), the outputs
listed above, and metadata ``cell``, ``vocab_size``, ``hidden_size``, ``num_layers``,
``embedding_size`` and ``torch_version`` (torch.__version__).

Dropout is left out on purpose: torch draws its dropout masks from its own generator
(and per time step, not per window as charrnn does), so they cannot be reproduced here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

CELLS = ("rnn", "lstm", "gru")
V, H, L, T, B = 7, 6, 2, 5, 3


class TorchCharRNN(nn.Module):
    """Embedding (or one-hot) -> nn.RNN/LSTM/GRU -> Linear; state_dict keys are CONTRACT's."""

    def __init__(self, cell: str, vocab: int, hidden: int, layers: int, emb: int):
        super().__init__()
        self.vocab = vocab
        self.embedding = nn.Embedding(vocab, emb) if emb > 0 else None
        inp = emb if emb > 0 else vocab
        if cell == "rnn":
            self.rnn = nn.RNN(inp, hidden, layers, nonlinearity="tanh", batch_first=False)
        elif cell == "lstm":
            self.rnn = nn.LSTM(inp, hidden, layers, batch_first=False)
        else:
            self.rnn = nn.GRU(inp, hidden, layers, batch_first=False)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, state):
        if self.embedding is not None:
            inp = self.embedding(x)  # (T, B, E)
        else:
            inp = F.one_hot(x, self.vocab).to(self.head.weight.dtype)  # (T, B, V)
        out, final = self.rnn(inp, state)  # (T, B, H)
        logits = self.head(out.reshape(-1, out.shape[-1]))  # (T*B, V)
        return logits, final


def _meta(cell: str, vocab: int, hidden: int, layers: int, emb: int) -> dict[str, np.ndarray]:
    return {
        "cell": np.array(cell),
        "vocab_size": np.array(vocab),
        "hidden_size": np.array(hidden),
        "num_layers": np.array(layers),
        "embedding_size": np.array(emb),
        "torch_version": np.array(str(torch.__version__)),
    }


def _save(name: str, arrays: dict[str, np.ndarray]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    np.savez_compressed(path, **arrays)
    print(f"wrote {path.relative_to(OUT.parent.parent)} ({path.stat().st_size} bytes)")


def make_case(cell: str, emb: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    torch_model = TorchCharRNN(cell, V, H, L, emb).double()
    # numpy-drawn weights, copied in under the CONTRACT names (in state_dict order)
    params = {
        name: rng.uniform(-0.6, 0.6, tuple(t.shape)) for name, t in torch_model.state_dict().items()
    }
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})

    x = rng.integers(0, V, (T, B))
    y = rng.integers(0, V, (T, B))
    h0 = 0.5 * rng.standard_normal((L, B, H))
    c0 = 0.5 * rng.standard_normal((L, B, H))
    dstate_h = 0.3 * rng.standard_normal((L, B, H))
    dstate_c = 0.3 * rng.standard_normal((L, B, H))

    th0 = torch.tensor(h0, requires_grad=True)
    tc0 = torch.tensor(c0, requires_grad=True)
    state = (th0, tc0) if cell == "lstm" else th0
    logits, final = torch_model(torch.from_numpy(x), state)
    loss = F.cross_entropy(logits, torch.from_numpy(y).reshape(-1))
    if cell == "lstm":
        h_n, c_n = final
        objective = (
            loss
            + (torch.from_numpy(dstate_h) * h_n).sum()
            + (torch.from_numpy(dstate_c) * c_n).sum()
        )
    else:
        h_n, c_n = final, None
        objective = loss + (torch.from_numpy(dstate_h) * h_n).sum()
    torch_model.zero_grad()
    objective.backward()

    arrays = _meta(cell, V, H, L, emb)
    arrays.update(params)
    arrays.update(x=x, y=y, h0=h0, dstate_h=dstate_h)
    arrays.update(
        logits=logits.detach().numpy(),
        h_n=h_n.detach().numpy(),
        loss=np.array(loss.item()),
        grad_h0=th0.grad.numpy(),
    )
    if cell == "lstm":
        arrays.update(c0=c0, dstate_c=dstate_c, c_n=c_n.detach().numpy(), grad_c0=tc0.grad.numpy())
    for name, p in torch_model.named_parameters():
        arrays[f"grad.{name}"] = p.grad.numpy()
    _save(f"torch_{cell}_{'emb' if emb else 'onehot'}.npz", arrays)


def make_default_case(cell: str, seed: int) -> None:
    """torch's own initialisation, exported as a checkpoint would hold it (float32)."""
    vocab, hidden, layers, emb, steps, batch = 11, 8, 2, 4, 6, 2
    torch.manual_seed(seed)
    torch_model = TorchCharRNN(cell, vocab, hidden, layers, emb)  # float32, default init
    state_dict = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    x = np.random.default_rng(seed).integers(0, vocab, (steps, batch))
    torch_model = torch_model.double()  # exact widening of the float32 weights
    h0 = torch.zeros(layers, batch, hidden, dtype=torch.float64)
    state = (h0, h0.clone()) if cell == "lstm" else h0
    with torch.no_grad():
        logits, final = torch_model(torch.from_numpy(x), state)
    h_n = final[0] if cell == "lstm" else final
    arrays = _meta(cell, vocab, hidden, layers, emb)
    arrays.update(state_dict)
    arrays.update(x=x, logits=logits.numpy(), h_n=h_n.numpy())
    if cell == "lstm":
        arrays["c_n"] = final[1].numpy()
    _save(f"torch_default_{cell}.npz", arrays)


def main() -> None:
    torch.use_deterministic_algorithms(True)
    for i, cell in enumerate(CELLS):
        for j, emb in enumerate((5, 0)):
            make_case(cell, emb, seed=100 + 10 * i + j)
        make_default_case(cell, seed=7 + i)


if __name__ == "__main__":
    main()
