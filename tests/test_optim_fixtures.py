"""The optimizers, global-norm clipping and learning-rate schedules against PyTorch's, step
by step (numpy only: torch is never imported here).

tests/fixtures/optim_*.npz hold 10 steps of torch.optim's SGD, SGD with momentum, RMSprop,
Adagrad, Adam and AdamW in float64, each fed the same fixed gradients through
torch.nn.utils.clip_grad_norm_ with a learning rate that changes every step, under
charrnn's default hyperparameters and under another set; lr_schedules.npz holds
torch.optim.lr_scheduler's values (closed forms past the end of the cosine) for every
schedule, with and without warm-up. Both were written by scripts/make_fixtures.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from charrnn.config import TrainConfig, config_from_dict
from charrnn.optim import Optimizer, clip_by_global_norm_, learning_rate
from charrnn.train import _lr

FIXTURES = Path(__file__).parent / "fixtures"
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adagrad", "adam", "adamw")
HYPER = ("momentum", "beta1", "beta2", "eps", "weight_decay")
# torch.optim's state key -> charrnn.optim.Optimizer's moment of the same meaning
TORCH_STATE = {"momentum_buffer": "velocity", "square_avg": "square_avg", "sum": "sum_sq",
               "exp_avg": "m", "exp_avg_sq": "v"}
# measured over the 10 steps: at most 2.2e-16 absolute (about 1 ulp of the parameters),
# 8e-13 relative on entries passing near zero; atol covers those, a float32 slip is 1e-8
RTOL, ATOL = 1e-12, 1e-15


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_fixtures_present() -> None:
    assert sorted(p.name for p in FIXTURES.glob("optim_*.npz")) == sorted(
        f"optim_{n}.npz" for n in OPTIMIZERS)
    assert (FIXTURES / "lr_schedules.npz").is_file()


def test_the_defaults_are_the_trainers() -> None:
    """The `defaults` fixtures use the values the trainer passes (TrainConfig's defaults),
    and Optimizer's own defaults are the same."""
    cfg = TrainConfig()
    kw = Optimizer.__init__.__kwdefaults__
    for name in OPTIMIZERS:
        data = _load(f"optim_{name}.npz")
        for k in HYPER:
            assert float(data[f"defaults.{k}"]) == getattr(cfg, k) == kw[k], (name, k)


@pytest.mark.parametrize("case", ["defaults", "custom"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps_match_torch(name: str, case: str) -> None:
    data = _load(f"optim_{name}.npz")
    assert str(data["optimizer"]) == name
    steps, max_norm = int(data["steps"]), float(data["max_norm"])
    keys = [k[len("init."):] for k in data if k.startswith("init.")]
    params = {k: data[f"init.{k}"].copy() for k in keys}
    assert all(p.dtype == np.float64 for p in params.values())
    # "defaults": exactly as constructed without options; "custom": every option passed
    hp = {} if case == "defaults" else {k: float(data[f"{case}.{k}"]) for k in HYPER}
    opt = Optimizer(name, params, **hp)

    # every moment torch keeps is one of ours, and the other way round
    torch_state = {k.split(".")[2] for k in data if k.startswith(f"{case}.state.")}
    assert {TORCH_STATE[s] for s in torch_state} == set(Optimizer.MOMENTS[name])

    norms = data[f"{case}.grad_norm"]
    assert (norms > max_norm).any() and (norms < max_norm).any()  # clipping cuts some steps
    for t in range(steps):
        grads = {k: data[f"grad.{k}"][t].copy() for k in keys}
        norm = clip_by_global_norm_(grads, max_norm)
        np.testing.assert_allclose(norm, norms[t], rtol=RTOL, err_msg=f"grad norm, step {t}")
        opt.step(params, grads, float(data["lr"][t]))
        for k in keys:
            np.testing.assert_allclose(params[k], data[f"{case}.param.{k}"][t], rtol=RTOL,
                                       atol=ATOL, err_msg=f"{name} {case}: {k} after step {t}")
            for s in torch_state:
                np.testing.assert_allclose(
                    opt.state[TORCH_STATE[s]][k], data[f"{case}.state.{s}.{k}"][t], rtol=RTOL,
                    atol=ATOL, err_msg=f"{name} {case}: {s} of {k} after step {t}")
    assert opt.t == steps
    # not a vacuous comparison: the parameters moved far beyond the tolerance
    moved = max(float(np.abs(params[k] - data[f"init.{k}"]).max()) for k in keys)
    assert moved > 0.01, moved


# -- learning-rate schedules ------------------------------------------------------------


def _schedules() -> dict[str, dict]:
    data = _load("lr_schedules.npz")
    cases = sorted({k.split(".")[0] for k in data if k != "torch_version"})
    out = {}
    for case in cases:
        fields = {k.split(".", 1)[1]: data[k] for k in data if k.startswith(f"{case}.")}
        out[case] = fields
    return out


SCHEDULES = _schedules()
SCHEDULE_ARGS = {"base_lr": float, "max_steps": int, "warmup_steps": int, "decay": float,
                 "decay_every": int, "lr_min": float}
# learning_rate keyword -> the train section's key
CONFIG_KEYS = {"base_lr": "learning_rate", "schedule": "lr_schedule", "max_steps": "max_steps",
               "warmup_steps": "warmup_steps", "decay": "lr_decay",
               "decay_every": "lr_decay_every", "lr_min": "lr_min"}


def test_every_schedule_is_covered() -> None:
    kinds = {(str(c["schedule"]), int(c["warmup_steps"]) > 0) for c in SCHEDULES.values()}
    assert kinds == {(s, w) for s in ("constant", "step", "exponential", "cosine")
                     for w in (False, True)}


@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_schedule_matches_torch(case: str) -> None:
    c = SCHEDULES[case]
    kw = {k: cast(c[k]) for k, cast in SCHEDULE_ARGS.items() if k in c}
    kw["schedule"] = str(c["schedule"])
    cfg = config_from_dict({"data": {"path": "unused.txt"},
                            "train": {CONFIG_KEYS[k]: v for k, v in kw.items()}})
    expected = c["lr"]
    assert len(expected) == int(c["steps"]) > kw["max_steps"]  # past the end, too
    ours = np.array([learning_rate(s, **kw) for s in range(len(expected))])
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-18, err_msg=case)
    # the trainer's own lookup: the config's keys reach learning_rate unchanged
    trainer = np.array([_lr(cfg, s) for s in range(len(expected))])
    np.testing.assert_array_equal(trainer, ours)
    assert c["from_torch"][: kw["max_steps"] + 1].all()  # torch's values wherever it has them
