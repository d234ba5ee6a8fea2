"""Training for quality (CONTRACT version 2): the weights' moving average (train.ema), the
time budget (train.max_minutes), resets of the carried state (train.reset_prob), and the
exact resume of each, weight drop included."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_train import QUIET, _interrupt_at, ckpt_steps, metrics

from charrnn.budget import SAFETY, TimeBudget
from charrnn.checkpoint import load_checkpoint
from charrnn.model import init_params
from charrnn.optim import WeightAverage
from charrnn.train import Trainer, TrainingInterrupted, train


def _ckpt(run_dir: Path, step: int):
    return load_checkpoint(run_dir / f"ckpt-{step:08d}.safetensors", training_state=True)


# -- train.ema --------------------------------------------------------------------------


def test_weight_average_follows_its_formula() -> None:
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    avg = WeightAverage(params, decay=0.9)
    expected = {k: v.copy() for k, v in params.items()}
    for t in range(30):
        for v in params.values():
            v += rng.standard_normal(v.shape)
        d = min(0.9, (1 + t) / (10 + t))
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * params[k]
        avg.update(params)
        for k in expected:
            np.testing.assert_allclose(avg.params[k], expected[k], rtol=1e-12, atol=1e-14)
    assert avg.updates == 30
    assert avg.params["w"] is not params["w"]


def test_ema_is_the_average_of_the_raw_trajectory(tiny_config) -> None:
    """With train.ema the raw weights train exactly as without it (the average never feeds
    back); the checkpoint's model tensors are the average of that trajectory, computed here
    directly, and the raw weights travel as `raw.*` training tensors."""
    steps, decay = 6, 0.8
    sections = dict(model={"dropout": 0.1},
                    train={"max_steps": steps, "checkpoint_every": 1, "eval_every": 100,
                           "dtype": "float64"},
                    output={"keep_last": steps})
    plain = train(tiny_config(run="plain", **sections), **QUIET)
    sections["train"]["ema"] = decay
    averaged = train(tiny_config(run="ema", **sections), **QUIET)

    first = _ckpt(plain.run_dir, 1)
    expected = init_params(first.shape, np.random.default_rng(7), "float64")  # train.seed 7
    for t in range(steps):
        raw = _ckpt(plain.run_dir, t + 1).params
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: d * v + (1 - d) * raw[k] for k, v in expected.items()}
        ema = _ckpt(averaged.run_dir, t + 1)
        for k, v in raw.items():
            assert np.array_equal(ema.train_tensors[f"raw.{k}"], v), k
            np.testing.assert_allclose(ema.params[k], expected[k], rtol=1e-12, atol=1e-15)
    assert ema.train_state["ema_updates"] == steps
    # best.safetensors and the evaluation use the average
    best = load_checkpoint(averaged.run_dir / "best.safetensors")
    np.testing.assert_allclose(best.params["head.bias"], expected["head.bias"], rtol=1e-12)
    rows = [r for r in metrics(averaged.run_dir) if "val_loss" in r]
    assert rows and math.isfinite(rows[-1]["val_loss"])


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_resume_is_bit_exact_with_ema_weight_drop_and_resets(tiny_config, monkeypatch,
                                                             cell) -> None:
    """Every random draw on (input dropout too), and a random offset per epoch: an epoch
    here is 26 windows of 32 x 16, so the run crosses two epochs and is interrupted in the
    second."""
    N = 60
    sections = dict(
        model={"cell": cell, "num_layers": 2, "hidden_size": 12, "dropout": 0.2,
               "weight_drop": 0.3, "input_dropout": 0.1},
        train={"max_steps": N, "lr_schedule": "cosine", "warmup_steps": 3, "ema": 0.9,
               "reset_prob": 0.2, "eval_every": 15, "log_every": 3, "batch_size": 32,
               "seq_length": 16, "random_offset": True},
        output={"keep_last": 5},
    )
    straight = train(tiny_config(run="straight", **sections), **QUIET)
    cfg = tiny_config(run="resumed", **sections)
    trainer = Trainer(cfg)
    with pytest.MonkeyPatch.context() as mp:  # `monkeypatch` holds the code path: keep it
        _interrupt_at(trainer, N // 2, mp)
        with pytest.raises(TrainingInterrupted):
            trainer.run(**QUIET)
    resumed = train(tiny_config(run="resumed", **sections), resume=True, **QUIET)
    assert resumed.steps == N
    a, b = _ckpt(straight.run_dir, N), _ckpt(resumed.run_dir, N)
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    assert a.train_tensors.keys() == b.train_tensors.keys()
    assert any(k.startswith("raw.") for k in a.train_tensors)
    for name in a.train_tensors:
        assert np.array_equal(a.train_tensors[name], b.train_tensors[name]), name
    assert a.train_state["rng"] == b.train_state["rng"]
    assert [(r["step"], r.get("val_loss"), r["train_loss"]) for r in metrics(straight.run_dir)] \
        == [(r["step"], r.get("val_loss"), r["train_loss"]) for r in metrics(resumed.run_dir)]


# -- train.reset_prob -------------------------------------------------------------------


def test_reset_prob_zeroes_the_drawn_streams(tiny_config) -> None:
    B, p = 64, 0.25
    trainer = Trainer(tiny_config(train={"batch_size": B, "reset_prob": p, "seq_length": 8}))
    trainer.stream.next_window()  # past the epoch's start, where every stream starts at zero
    trainer.state = [tuple(np.ones_like(s) for s in layer) for layer in trainer.state]
    expected = np.random.default_rng(7 + 1).random(B) < p  # the trainer's RNG: seed + 1
    trainer._next_window()
    for layer in trainer.state:
        for s in layer:
            assert np.array_equal(s[:, 0] == 0, expected)
            assert (s[~expected] == 1).all()
    assert 0 < expected.sum() < B


def test_reset_prob_zero_leaves_the_rng_alone(tiny_config) -> None:
    trainer = Trainer(tiny_config(train={"reset_prob": 0.0}))
    before = trainer.rng.bit_generator.state
    trainer._next_window()
    assert trainer.rng.bit_generator.state == before


# -- train.max_minutes ------------------------------------------------------------------

STEP_SEC, EVAL_SEC = 0.5, 2.0


class FakeClock:
    """Seconds that pass only when the trainer does work: STEP_SEC per training step,
    EVAL_SEC per validation (no real waiting)."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def _with_fake_clock(trainer: Trainer, clock: FakeClock, monkeypatch) -> None:
    trainer.clock = clock
    step, validate = trainer.model.loss_and_grads, trainer.validate

    def timed_step(*args, **kwargs):
        clock.now += STEP_SEC
        return step(*args, **kwargs)

    def timed_validate():
        clock.now += EVAL_SEC
        return validate()

    monkeypatch.setattr(trainer.model, "loss_and_grads", timed_step)
    monkeypatch.setattr(trainer, "validate", timed_validate)


def _budget_sections(minutes: float) -> dict:
    return dict(train={"max_minutes": minutes, "max_steps": 100_000, "lr_schedule": "cosine",
                       "eval_every": 20, "log_every": 5, "checkpoint_every": 20},
                output={"keep_last": 50})


def test_max_minutes_stops_within_one_step_of_the_budget(tiny_config, monkeypatch) -> None:
    minutes = 1.0
    trainer = Trainer(tiny_config(**_budget_sections(minutes)))
    _with_fake_clock(trainer, FakeClock(), monkeypatch)
    result = trainer.run(**QUIET)
    budget = trainer.budget
    assert budget.seconds_per_step == pytest.approx(STEP_SEC)
    # the plan: what fits at STEP_SEC a step plus an evaluation every 20 steps, and one kept
    # back for the end; training ends at it or at the deadline, whichever comes first
    assert result.steps == budget.planned_steps
    rows = metrics(result.run_dir)
    end = rows[-1]["elapsed_sec"]
    # the final evaluation follows the last step; 1 - SAFETY of the budget is the plan's margin
    assert 60 * minutes * SAFETY - 2 * STEP_SEC < end + EVAL_SEC <= 60 * minutes
    assert ckpt_steps(result.run_dir)[-1] == result.steps  # a checkpoint at the end
    # the cosine schedule spans the planned steps: it reaches its floor at the end
    assert rows[-1]["lr"] < 0.01 * 0.01
    assert _ckpt(result.run_dir, result.steps).train_state["budget"]["planned_steps"] \
        == budget.planned_steps


def test_max_minutes_deadline_beats_a_wrong_plan(tiny_config, monkeypatch) -> None:
    """Steps that turn slower than measured: the run stops at the deadline, within one step."""
    trainer = Trainer(tiny_config(**_budget_sections(0.5)))
    clock = FakeClock()
    _with_fake_clock(trainer, clock, monkeypatch)
    timed = trainer.model.loss_and_grads

    def slower(*args, **kwargs):
        if trainer.budget.planned_steps is not None:
            clock.now += STEP_SEC  # twice the measured time
        return timed(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "loss_and_grads", slower)
    result = trainer.run(**QUIET)
    assert result.steps < trainer.budget.planned_steps
    end = metrics(result.run_dir)[-1]["elapsed_sec"]
    assert 30 - 2 * STEP_SEC <= end <= 30 + EVAL_SEC  # the final evaluation may follow


def test_max_minutes_resume_keeps_the_schedule(tiny_config, monkeypatch) -> None:
    sections = _budget_sections(0.5)
    straight = Trainer(tiny_config(run="straight", **sections))
    _with_fake_clock(straight, FakeClock(), monkeypatch)
    a = straight.run(**QUIET)
    monkeypatch.undo()

    first = Trainer(tiny_config(run="resumed", **sections))
    _with_fake_clock(first, FakeClock(), monkeypatch)
    _interrupt_at(first, 30, monkeypatch)
    with pytest.raises(TrainingInterrupted):
        first.run(**QUIET)
    monkeypatch.undo()
    second = Trainer(tiny_config(run="resumed", **sections), resume=True)
    # the clock of a new process starts anywhere: only differences count
    _with_fake_clock(second, FakeClock(start=1000.0), monkeypatch)
    b = second.run(**QUIET)
    assert second.budget.planned_steps == straight.budget.planned_steps
    assert b.steps == a.steps
    ra, rb = _ckpt(a.run_dir, a.steps), _ckpt(b.run_dir, b.steps)
    for name in ra.params:
        assert np.array_equal(ra.params[name], rb.params[name]), name
    lrs = {r["step"]: r["lr"] for r in metrics(a.run_dir)}
    assert lrs == {r["step"]: r["lr"] for r in metrics(b.run_dir)}


def test_budget_plan_arithmetic() -> None:
    budget = TimeBudget(minutes=10, max_steps=10_000, eval_every=100)
    assert budget.horizon() == math.inf
    assert not budget.measured(1, 2.0)  # the warm-up step
    assert not budget.measured(5, 2.0 + 4 * 1.0)  # 4 s < 2% of 600 s
    assert budget.measured(14, 2.0 + 13 * 1.0)
    planned = budget.plan(14, 15.0, eval_seconds=10.0)
    # (SAFETY * (600 - 15) - 10) / (1.0 + 10 / 100) more steps
    assert planned == 14 + int((SAFETY * 585 - 10) // 1.1) and budget.horizon() == planned
    assert not budget.expired(598.9) and budget.expired(599.5)
    capped = TimeBudget(minutes=10, max_steps=100, eval_every=100)
    capped.measured(1, 0.0)
    assert capped.plan(20, 19.0, 0.0) == 100
