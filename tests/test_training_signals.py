"""The training signals of the evaluation rows: clip_fraction, sigma_max_hh,
val_gate_saturation; and that computing them changes nothing about training."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

import charrnn.train as train_module
from charrnn.checkpoint import load_checkpoint
from charrnn.signals import SATURATION_CHARS, TrainingSignals, sigma_max_hh
from charrnn.train import Trainer, TrainingInterrupted

QUIET = {"progress": False, "echo": lambda s: None}
SIGNALS = ("clip_fraction", "sigma_max_hh", "val_gate_saturation")


def eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "clip_fraction" in r]


def record_norms(monkeypatch) -> list[float]:
    """The pre-clip gradient norm of every step, as the trainer's clipping returns it."""
    norms: list[float] = []
    original = train_module.clip_by_global_norm_

    def clip(grads, max_norm):
        norm = original(grads, max_norm)
        norms.append(norm)
        return norm

    monkeypatch.setattr(train_module, "clip_by_global_norm_", clip)
    return norms


# -- clip_fraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(("grad_clip", "expected"), [(1e-6, 1.0), (1e6, 0.0), (0.0, 0.0)])
def test_clip_fraction_all_or_nothing(tiny_config, grad_clip, expected) -> None:
    cfg = tiny_config(train={"grad_clip": grad_clip, "max_steps": 20})
    Trainer(cfg).run(**QUIET)
    rows = eval_rows(Path(cfg.output.dir))
    assert [r["step"] for r in rows] == [10, 20]
    assert all(r["clip_fraction"] == expected for r in rows)


def test_clip_fraction_counts_the_clipped_updates(tiny_config, monkeypatch) -> None:
    """A threshold among the norms: each row's fraction is an independent count of the
    recorded norms above it, over the updates since the previous evaluation."""
    clip = 0.45
    norms = record_norms(monkeypatch)
    cfg = tiny_config(model={"num_layers": 2}, train={"grad_clip": clip, "max_steps": 30})
    Trainer(cfg).run(**QUIET)
    rows = eval_rows(Path(cfg.output.dir))
    assert len(norms) == 30 and [r["step"] for r in rows] == [10, 20, 30]
    expected = [sum(n > clip for n in norms[s - 10 : s]) / 10 for s in (10, 20, 30)]
    assert [r["clip_fraction"] for r in rows] == expected
    assert any(0 < f < 1 for f in expected)  # the threshold does split the norms


def test_record_step_matches_the_clipping_rule() -> None:
    s = TrainingSignals(grad_clip=5.0, cell="lstm")
    for norm in (1.0, 5.0, 5.000001, 7.0):  # clipped only when strictly above
        s.record_step(norm)
    assert (s.steps, s.clipped) == (4, 2)
    assert s.eval_signals({}, None)["clip_fraction"] == 0.5
    assert (s.steps, s.clipped) == (0, 0)  # the next interval starts afresh
    off = TrainingSignals(grad_clip=0.0, cell="lstm")
    off.record_step(1e9)
    assert off.clipped == 0


@pytest.mark.parametrize("state", [None, {}, {"steps": 3}, {"steps": 2, "clipped": 5},
                                   {"steps": -1, "clipped": 0}, {"steps": True, "clipped": 0},
                                   "junk"])
def test_counters_from_an_older_or_bad_checkpoint_reset(state) -> None:
    s = TrainingSignals(grad_clip=1.0, cell="gru")
    s.steps, s.clipped = 9, 4
    s.load_state_dict(state)
    assert (s.steps, s.clipped) == (0, 0)
    s.load_state_dict({"steps": 7, "clipped": 2})
    assert s.state_dict() == {"steps": 7, "clipped": 2}


# -- sigma_max_hh and val_gate_saturation ------------------------------------------------------


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_sigma_max_hh_is_the_largest_singular_value(tiny_config, cell) -> None:
    cfg = tiny_config(model={"cell": cell, "num_layers": 2}, train={"max_steps": 10})
    trainer = Trainer(cfg)
    trainer.run(**QUIET)
    (row,) = eval_rows(trainer.run_dir)
    params = load_checkpoint(trainer.run_dir / "ckpt-00000010.safetensors").params
    expected = [np.linalg.svd(params[f"rnn.weight_hh_l{k}"].astype(np.float64),
                              compute_uv=False)[0] for k in range(2)]
    assert row["sigma_max_hh"] == pytest.approx(expected, rel=1e-9)
    assert sigma_max_hh(params) == pytest.approx(expected, rel=1e-9)


def test_val_gate_saturation_is_the_mean_over_the_validation_prefix(tiny_config) -> None:
    gates = pytest.importorskip("charrnn.inspect.gates")
    cfg = tiny_config(model={"cell": "lstm", "num_layers": 2}, train={"max_steps": 10})
    trainer = Trainer(cfg)
    assert len(trainer.val_ids) > 0
    trainer.run(**QUIET)
    (row,) = eval_rows(trainer.run_dir)
    ids = trainer.val_ids[:SATURATION_CHARS]
    expected = gates.mean_saturation(trainer.model.params, "lstm", ids)
    assert len(row["val_gate_saturation"]) == 2
    assert row["val_gate_saturation"] == pytest.approx(expected, rel=1e-12)
    assert all(0.0 <= v <= 1.0 for v in row["val_gate_saturation"])


def test_without_validation_the_eval_row_still_carries_the_signals(tiny_config) -> None:
    cfg = tiny_config(data={"val_fraction": 0.0}, train={"max_steps": 10})
    trainer = Trainer(cfg)
    trainer.run(**QUIET)
    (row,) = eval_rows(trainer.run_dir)
    assert "val_loss" not in row and "val_gate_saturation" not in row
    assert row["step"] == 10 and len(row["sigma_max_hh"]) == 1
    assert {"train_loss", "lr", "grad_norm", "chars_per_sec", "elapsed_sec"} <= set(row)


# -- training is unchanged --------------------------------------------------------------------


def test_the_signals_do_not_change_training(tiny_config, monkeypatch) -> None:
    """Weights, optimizer state and RNG are the same with the signals computed or not."""
    sections = dict(model={"cell": "lstm", "num_layers": 2, "dropout": 0.2},
                    train={"max_steps": 20, "eval_every": 5})
    Trainer(tiny_config(run="with", **sections)).run(**QUIET)
    with monkeypatch.context() as m:
        m.setattr(TrainingSignals, "eval_signals", lambda self, params, val_ids: {})
        Trainer(tiny_config(run="without", **sections)).run(**QUIET)
    a, b = (load_checkpoint(Path(tiny_config(run=r).output.dir) / "ckpt-00000020.safetensors",
                            training_state=True) for r in ("with", "without"))
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    for name in a.train_tensors:
        assert np.array_equal(a.train_tensors[name], b.train_tensors[name]), name
    assert a.train_state["rng"] == b.train_state["rng"]


def test_resume_mid_interval_logs_the_same_signals(tiny_config, monkeypatch) -> None:
    """Ctrl-C between two evaluations, --resume: the rows, signals included, and the weights
    equal those of a straight run (the clip counters travel in the checkpoint)."""
    sections = dict(model={"cell": "gru", "num_layers": 2, "dropout": 0.1},
                    train={"max_steps": 30, "eval_every": 10, "grad_clip": 0.45})
    straight = Trainer(tiny_config(run="straight", **sections))
    straight.run(**QUIET)

    resumed = Trainer(tiny_config(run="resumed", **sections))
    original = resumed.model.loss_and_grads

    def loss_and_grads(*args, **kwargs):
        if resumed.step + 1 == 15:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(resumed.model, "loss_and_grads", loss_and_grads)
    with pytest.raises(TrainingInterrupted, match="step 15"):
        resumed.run(**QUIET)
    monkeypatch.undo()
    ckpt = load_checkpoint(resumed.run_dir / "ckpt-00000015.safetensors", training_state=True)
    assert ckpt.train_state["signals"]["steps"] == 5
    Trainer(tiny_config(run="resumed", **sections), resume=True).run(**QUIET)

    def signals(run_dir: Path) -> list[tuple]:
        return [(r["step"], *(json.dumps(r.get(k)) for k in SIGNALS)) for r in eval_rows(run_dir)]

    assert signals(resumed.run_dir) == signals(straight.run_dir)
    assert any(0 < r["clip_fraction"] < 1 for r in eval_rows(straight.run_dir))
    a = load_checkpoint(straight.run_dir / "ckpt-00000030.safetensors").params
    b = load_checkpoint(resumed.run_dir / "ckpt-00000030.safetensors").params
    for name in a:
        assert np.array_equal(a[name], b[name]), name
