"""Golden fixtures from PyTorch for tests/test_torch_agreement.py and test_optim_fixtures.py.

How to run (from the repository root, in an environment with torch; the tests themselves
never import torch and read only the committed .npz files):

    pip install torch==2.13.0 numpy
    python scripts/make_fixtures.py            # all of tests/fixtures/{torch,optim}_*.npz
    python scripts/make_fixtures.py optim schedules  # only optim_*.npz, lr_schedules.npz

The output is deterministic: every random draw comes from a seeded numpy Generator or
from torch.manual_seed, and the torch computations run in float64 on the CPU.  Run twice
on one machine, the files are byte-identical.  On another CPU the last bits of the model
fixtures can differ (torch's GEMM and reductions take other vector paths: the committed
torch_*.npz files, written on another machine, differ from a regeneration on an AVX-512
Xeon by at most 1.4e-16 in logits, h_n and gradients); the tests compare far more loosely
than that, so there is no need to rewrite the model fixtures when adding new ones.

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

Two more kinds, for tests/test_optim_fixtures.py:

* ``optim_{name}.npz`` for each of charrnn.optim's six optimizers, run by its torch.optim
  counterpart in float64 (single-tensor code path, ``foreach=False``): sgd -> SGD;
  momentum -> SGD(momentum, dampening=0); rmsprop -> RMSprop(alpha=0.99); adagrad ->
  Adagrad(lr_decay=0, initial_accumulator_value=0); adam -> Adam; adamw -> AdamW (decoupled
  weight decay).  Fixed numpy-drawn parameters ``init.<name>`` and a fixed sequence of
  STEPS gradients ``grad.<name>`` (STEPS, ...), scaled per step so that global-norm
  clipping (torch.nn.utils.clip_grad_norm_, MAX_NORM) cuts some steps and not others, and
  a learning rate ``lr`` (STEPS,) that changes every step.  Two hyperparameter sets:
  ``defaults`` (charrnn's defaults, passed to torch explicitly: torch's own differ, e.g.
  Adagrad's eps) and ``custom``.  For each set ``<case>.``: the hyperparameters
  (``momentum``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``), the norm before clipping
  ``grad_norm`` (STEPS,), every parameter after every step ``param.<name>`` (STEPS, ...)
  and torch's optimizer state after every step ``state.<torch key>.<name>`` (STEPS, ...).
* ``lr_schedules.npz``: for each case in SCHEDULES (constant, step, exponential, cosine,
  with and without warm-up) its settings ``<case>.<key>`` and the learning rate at every
  step 0..``<case>.steps``-1, ``<case>.lr``.  The values come from torch.optim.lr_scheduler
  (LinearLR for the warm-up, then LambdaLR(1) / StepLR / ExponentialLR /
  CosineAnnealingLR, joined by SequentialLR at the end of the warm-up), checked here
  against the closed forms written below; past max_steps, where torch's cosine turns back
  up and charrnn's stays at lr_min, the closed form is stored (``<case>.from_torch`` says
  which steps came from torch).
"""

from __future__ import annotations

import argparse
import math
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


# -- optimizers --------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adagrad", "adam", "adamw")
STEPS = 10
MAX_NORM = 1.0
# CONTRACT-like names, shapes of a small model
OPTIM_SHAPES = {"embedding.weight": (7, 5), "rnn.weight_hh_l0": (6, 6), "head.bias": (7,)}
HYPER = {
    # charrnn's defaults (charrnn.optim.Optimizer and charrnn.config.TrainConfig)
    "defaults": {"momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                 "weight_decay": 0.01},
    "custom": {"momentum": 0.7, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6,
               "weight_decay": 0.1},
}
RMSPROP_ALPHA = 0.99  # charrnn.optim.RMSPROP_ALPHA


def _torch_optimizer(name: str, params: list[torch.Tensor], hp: dict[str, float]):
    """The torch.optim optimizer that charrnn's `name` reproduces, with hp's settings."""
    common = {"lr": 1.0, "foreach": False}  # lr is set per step
    if name == "sgd":
        return torch.optim.SGD(params, momentum=0.0, **common)
    if name == "momentum":
        return torch.optim.SGD(params, momentum=hp["momentum"], dampening=0.0, **common)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, alpha=RMSPROP_ALPHA, eps=hp["eps"], momentum=0.0,
                                   centered=False, weight_decay=0.0, **common)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr_decay=0.0, weight_decay=0.0,
                                   initial_accumulator_value=0.0, eps=hp["eps"], **common)
    betas = (hp["beta1"], hp["beta2"])
    if name == "adam":
        return torch.optim.Adam(params, betas=betas, eps=hp["eps"], weight_decay=0.0,
                                amsgrad=False, **common)
    if name == "adamw":
        return torch.optim.AdamW(params, betas=betas, eps=hp["eps"],
                                 weight_decay=hp["weight_decay"], amsgrad=False, **common)
    raise ValueError(name)


def make_optimizer_case(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    init = {k: rng.uniform(-0.6, 0.6, shp) for k, shp in OPTIM_SHAPES.items()}
    # per-step scales put the global norm (about 8.8 * scale) on both sides of MAX_NORM
    scales = rng.uniform(0.03, 0.25, STEPS)
    grads = {k: np.stack([s * rng.standard_normal(shp) for s in scales])
             for k, shp in OPTIM_SHAPES.items()}
    lrs = rng.uniform(0.005, 0.05, STEPS)
    if name == "sgd" or name == "momentum":
        lrs *= 10.0  # their steps are not normalised: make them move the parameters visibly
    arrays: dict[str, np.ndarray] = {"optimizer": np.array(name), "steps": np.array(STEPS),
                                     "max_norm": np.array(MAX_NORM), "lr": lrs,
                                     "torch_version": np.array(str(torch.__version__))}
    arrays.update({f"init.{k}": v for k, v in init.items()})
    arrays.update({f"grad.{k}": v for k, v in grads.items()})
    for case, hp in HYPER.items():
        params = [torch.tensor(init[k], dtype=torch.float64) for k in OPTIM_SHAPES]
        opt = _torch_optimizer(name, params, hp)
        norms = np.empty(STEPS)
        trail: dict[str, list[np.ndarray]] = {}
        for t in range(STEPS):
            for p, k in zip(params, OPTIM_SHAPES):
                p.grad = torch.tensor(grads[k][t], dtype=torch.float64)
            norms[t] = float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=False))
            assert abs(norms[t] - MAX_NORM) > 1e-3, "too close to the clipping edge"
            opt.param_groups[0]["lr"] = float(lrs[t])
            opt.step()
            for p, k in zip(params, OPTIM_SHAPES):
                trail.setdefault(f"{case}.param.{k}", []).append(p.detach().numpy().copy())
                for sk, sv in opt.state[p].items():
                    if sk != "step":
                        trail.setdefault(f"{case}.state.{sk}.{k}", []).append(
                            sv.detach().numpy().copy())
        assert (norms > MAX_NORM).any() and (norms < MAX_NORM).any(), norms
        arrays.update({f"{case}.{k}": np.array(v) for k, v in hp.items()})
        arrays[f"{case}.grad_norm"] = norms
        arrays.update({k: np.stack(v) for k, v in trail.items()})
    _save(f"optim_{name}.npz", arrays)


# -- learning-rate schedules -------------------------------------------------------------

# name -> settings, as charrnn.optim.learning_rate's keyword arguments
SCHEDULES: dict[str, dict[str, float | int | str]] = {
    "constant": {"schedule": "constant", "base_lr": 0.01, "max_steps": 40, "warmup_steps": 0},
    "constant_warmup": {"schedule": "constant", "base_lr": 0.003, "max_steps": 40,
                        "warmup_steps": 7},
    "step": {"schedule": "step", "base_lr": 0.02, "max_steps": 60, "warmup_steps": 0,
             "decay": 0.5, "decay_every": 10},
    "step_warmup": {"schedule": "step", "base_lr": 0.1, "max_steps": 60, "warmup_steps": 4,
                    "decay": 0.7, "decay_every": 7},
    "exponential": {"schedule": "exponential", "base_lr": 0.02, "max_steps": 60,
                    "warmup_steps": 0, "decay": 0.5, "decay_every": 10},
    "exponential_warmup": {"schedule": "exponential", "base_lr": 0.05, "max_steps": 80,
                           "warmup_steps": 6, "decay": 0.9, "decay_every": 3},
    "cosine": {"schedule": "cosine", "base_lr": 0.01, "max_steps": 50, "warmup_steps": 0,
               "lr_min": 0.0},
    "cosine_warmup": {"schedule": "cosine", "base_lr": 0.002, "max_steps": 60,
                      "warmup_steps": 10, "lr_min": 1e-4},
}
SCHEDULE_EXTRA_STEPS = 15  # steps recorded past max_steps


def closed_form_lr(step: int, schedule: str, base_lr: float, max_steps: int,
                   warmup_steps: int = 0, decay: float = 0.5, decay_every: int = 1000,
                   lr_min: float = 0.0) -> float:
    """The schedules as charrnn.optim.learning_rate documents them, written out again here
    (not imported), with exp/log for the smooth exponential decay."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps  # linear, reaching base_lr at the last
    s = step - warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * decay ** math.floor(s / decay_every)
    if schedule == "exponential":
        return base_lr * math.exp(math.log(decay) * s / decay_every)
    if schedule == "cosine":
        span = max_steps - warmup_steps
        if s >= span:
            return lr_min
        return lr_min + (base_lr - lr_min) * (1.0 + math.cos(math.pi * s / span)) / 2.0
    raise ValueError(schedule)


def _torch_schedule(opt: torch.optim.Optimizer, cfg: dict) -> torch.optim.lr_scheduler.LRScheduler:
    sched = torch.optim.lr_scheduler
    w = int(cfg["warmup_steps"])
    kind = cfg["schedule"]
    if kind == "constant":
        main = sched.LambdaLR(opt, lambda _: 1.0)
    elif kind == "step":
        main = sched.StepLR(opt, step_size=int(cfg["decay_every"]), gamma=float(cfg["decay"]))
    elif kind == "exponential":
        gamma = float(cfg["decay"]) ** (1.0 / int(cfg["decay_every"]))  # per step
        main = sched.ExponentialLR(opt, gamma=gamma)
    else:
        main = sched.CosineAnnealingLR(opt, T_max=int(cfg["max_steps"]) - w,
                                       eta_min=float(cfg["lr_min"]))
    if w == 0:
        return main
    assert w >= 2, "LinearLR needs total_iters >= 1"
    warm = sched.LinearLR(opt, start_factor=1.0 / w, end_factor=1.0, total_iters=w - 1)
    return sched.SequentialLR(opt, [warm, main], milestones=[w])


def make_schedules() -> None:
    arrays: dict[str, np.ndarray] = {"torch_version": np.array(str(torch.__version__))}
    for case, cfg in SCHEDULES.items():
        n = int(cfg["max_steps"]) + SCHEDULE_EXTRA_STEPS
        opt = torch.optim.SGD([torch.zeros(1, dtype=torch.float64)], lr=float(cfg["base_lr"]))
        scheduler = _torch_schedule(opt, cfg)
        lrs = np.empty(n)
        from_torch = np.ones(n, dtype=bool)
        for step in range(n):
            closed = closed_form_lr(step, **cfg)
            lr = float(opt.param_groups[0]["lr"])
            if cfg["schedule"] == "cosine" and step > int(cfg["max_steps"]):
                from_torch[step] = False  # torch's cosine is periodic; charrnn's holds lr_min
                lr = closed
            assert math.isclose(lr, closed, rel_tol=1e-13, abs_tol=1e-18), (case, step, lr, closed)
            lrs[step] = lr
            opt.step()
            scheduler.step()
        arrays.update({f"{case}.{k}": np.array(v) for k, v in cfg.items()})
        arrays.update({f"{case}.steps": np.array(n), f"{case}.lr": lrs,
                       f"{case}.from_torch": from_torch})
    _save("lr_schedules.npz", arrays)


KINDS = ("model", "optim", "schedules")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", choices=KINDS, metavar="KIND",
                        help=f"which fixtures to write, of {', '.join(KINDS)} (default: all)")
    kinds = set(parser.parse_args(argv).kinds or KINDS)
    torch.use_deterministic_algorithms(True)
    if "model" in kinds:
        for i, cell in enumerate(CELLS):
            for j, emb in enumerate((5, 0)):
                make_case(cell, emb, seed=100 + 10 * i + j)
            make_default_case(cell, seed=7 + i)
    if "optim" in kinds:
        for i, name in enumerate(OPTIMIZERS):
            make_optimizer_case(name, seed=300 + i)
    if "schedules" in kinds:
        make_schedules()


if __name__ == "__main__":
    main()
