"""The trainer: run directory, checkpoints, exact resume, optimizers, schedules, clipping,
and what happens when the numbers stop being finite."""

from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from charrnn.checkpoint import load_checkpoint, step_checkpoints
from charrnn.config import config_from_dict
from charrnn.data import split_sizes
from charrnn.errors import CheckpointError, NonFiniteError, RunDirError
from charrnn.optim import clip_by_global_norm_, learning_rate
from charrnn.train import Trainer, TrainingInterrupted, train
from charrnn.vocab import Vocab

QUIET = {"progress": False, "echo": lambda s: None}
CONTRACT_KEYS = {"step", "train_loss", "lr", "grad_norm", "chars_per_sec", "elapsed_sec"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ckpt_steps(run_dir: Path) -> list[int]:
    return [s for s, _ in step_checkpoints(run_dir)]


# -- the run directory -------------------------------------------------------------------


def test_run_directory_files(corpus_path, corpus_text, config_dict, tmp_path,
                             monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = config_dict("corpus.txt", "runs/tiny", train={"max_steps": 20, "eval_every": 10,
                                                              "checkpoint_every": 5})
    result = train(config_from_dict(d), **QUIET)
    run_dir = tmp_path / "runs" / "tiny"
    assert result.run_dir.resolve() == run_dir.resolve()
    assert result.steps == 20

    # config.yaml: the full config, paths resolved against the working directory
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(saved) == {"data", "model", "train", "output"}
    assert saved["data"]["path"] == str(corpus_path.resolve())
    assert saved["output"]["dir"] == str(run_dir.resolve())
    assert saved["model"] == {"cell": "lstm", "hidden_size": 16, "num_layers": 1,
                              "embedding_size": 8, "dropout": 0.0, "weight_drop": 0.0,
                              "input_dropout": 0.0}
    assert saved["train"]["optimizer"] == "adam"  # defaults filled in
    config_from_dict(saved)  # and valid

    # vocab.json: the corpus characters in index order
    vocab = json.loads((run_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["chars"] == sorted(set(corpus_text))
    assert Vocab.from_json(vocab).chars == vocab["chars"]

    # metrics.jsonl: a train row every log_every steps, a val row every eval_every steps
    rows = metrics(run_dir)
    train_rows = [r for r in rows if "val_loss" not in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert [r["step"] for r in val_rows] == [10, 20]
    for r in rows:
        assert CONTRACT_KEYS <= set(r)
        assert all(math.isfinite(r[k]) for k in CONTRACT_KEYS)
        assert r["lr"] == pytest.approx(0.01)
        assert r["grad_norm"] > 0 and r["chars_per_sec"] > 0 and r["elapsed_sec"] >= 0
    for r in val_rows:
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
        assert 0 < r["val_loss"] < math.log(len(vocab["chars"])) + 1
    assert result.best_val_loss == pytest.approx(min(r["val_loss"] for r in val_rows))

    # checkpoints: keep_last of the numbered ones, and the best
    assert ckpt_steps(run_dir) == [15, 20]
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == [
        "best.safetensors", "ckpt-00000015.safetensors", "ckpt-00000020.safetensors"]
    best = load_checkpoint(run_dir / "best.safetensors")
    best_row = min(val_rows, key=lambda r: r["val_loss"])
    assert best.step == best_row["step"]
    assert best.info["best_val_loss"] == pytest.approx(best_row["val_loss"])
    last = load_checkpoint(run_dir / "ckpt-00000020.safetensors", training_state=True)
    assert last.step == 20
    assert last.vocab.chars == vocab["chars"]
    assert any(k.startswith("optim.") for k in last.train_tensors)
    assert not (run_dir / ".lock").exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("keep_last", [1, 3])
def test_keep_last_rotation(tiny_config, keep_last) -> None:
    cfg = tiny_config(train={"max_steps": 24, "checkpoint_every": 4, "eval_every": 100},
                      output={"keep_last": keep_last})
    result = train(cfg, **QUIET)
    assert ckpt_steps(result.run_dir) == [24, 20, 16][:keep_last][::-1]
    assert result.last_checkpoint.name == "ckpt-00000024.safetensors"


def test_without_validation_best_is_lowest_training_loss(tiny_config) -> None:
    cfg = tiny_config(data={"val_fraction": 0.0}, train={"max_steps": 20, "eval_every": 5})
    result = train(cfg, **QUIET)
    assert result.best_val_loss is None
    rows = metrics(result.run_dir)
    assert rows and not any("val_loss" in r for r in rows)
    best = load_checkpoint(result.best_checkpoint)
    assert best.info["best_val_loss"] is None
    assert best.info["best_loss"] == pytest.approx(result.best_train_loss)
    assert best.step in (5, 10, 15, 20)


# -- refusing to clobber or mix runs -------------------------------------------------------


def test_refuses_a_run_dir_with_checkpoints(tiny_config) -> None:
    cfg = tiny_config(train={"max_steps": 10})
    first = train(cfg, **QUIET)
    before = {p.name: p.read_bytes() for p in first.run_dir.glob("*.safetensors")}
    with pytest.raises(RunDirError, match="--resume") as err:
        train(cfg, **QUIET)
    assert err.value.exit_code == 2
    assert str(first.run_dir) in str(err.value)
    assert {p.name: p.read_bytes() for p in first.run_dir.glob("*.safetensors")} == before
    # --overwrite starts over: the old checkpoints are gone, the new run is complete
    again = train(tiny_config(train={"max_steps": 6, "eval_every": 3}), overwrite=True, **QUIET)
    assert again.steps == 6
    assert ckpt_steps(again.run_dir) == [3, 6]
    assert max(r["step"] for r in metrics(again.run_dir)) == 6


def test_resume_refuses_a_changed_model(tiny_config) -> None:
    train(tiny_config(train={"max_steps": 10}), **QUIET)
    changed = tiny_config(model={"hidden_size": 24}, train={"max_steps": 20})
    with pytest.raises(CheckpointError, match="model"):
        train(changed, resume=True, **QUIET)
    with pytest.raises(CheckpointError, match="max_steps"):  # nothing left to do
        train(tiny_config(train={"max_steps": 10}), resume=True, **QUIET)


def test_resume_without_checkpoint_is_refused(tiny_config) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(), resume=True, **QUIET)


# -- exact resume --------------------------------------------------------------------------


def _interrupt_at(trainer: Trainer, step: int, monkeypatch) -> None:
    """Deliver a real SIGINT while update `step` is being computed."""
    original = trainer.model.loss_and_grads

    def loss_and_grads(*args, **kwargs):
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "loss_and_grads", loss_and_grads)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_resume_is_bit_exact(tiny_config, monkeypatch, cell) -> None:
    """N steps straight == N/2 steps, Ctrl-C, --resume, N/2 more: every tensor identical."""
    N = 40
    sections = dict(
        model={"cell": cell, "num_layers": 2, "hidden_size": 12, "dropout": 0.2},
        train={"max_steps": N, "lr_schedule": "cosine", "warmup_steps": 5, "stateful": True,
               "eval_every": 8, "log_every": 4, "batch_size": 16, "seq_length": 50},
        output={"keep_last": 5},
    )
    straight = train(tiny_config(run="straight", **sections), **QUIET)

    cfg = tiny_config(run="resumed", **sections)
    trainer = Trainer(cfg)
    assert N // 2 < 2 * len(trainer.stream) < N  # an epoch ends after the interruption
    _interrupt_at(trainer, N // 2, monkeypatch)
    with pytest.raises(TrainingInterrupted, match=f"step {N // 2}") as err:
        trainer.run(**QUIET)
    assert err.value.exit_code == 130
    assert ckpt_steps(cfg_dir := Path(cfg.output.dir))[-1] == N // 2
    monkeypatch.undo()
    resumed = train(tiny_config(run="resumed", **sections), resume=True, **QUIET)
    assert resumed.steps == N

    a = load_checkpoint(straight.run_dir / f"ckpt-{N:08d}.safetensors", training_state=True)
    b = load_checkpoint(cfg_dir / f"ckpt-{N:08d}.safetensors", training_state=True)
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        assert a.params[name].dtype == b.params[name].dtype
        assert np.array_equal(a.params[name], b.params[name]), name
    assert a.train_tensors.keys() == b.train_tensors.keys()
    assert any(k.startswith("state.") for k in a.train_tensors)  # the carried hidden state
    for name in a.train_tensors:
        assert np.array_equal(a.train_tensors[name], b.train_tensors[name]), name
    assert a.train_state["rng"] == b.train_state["rng"]
    assert a.train_state["data"] == b.train_state["data"]

    # the logged losses agree too; the rows logged before the interruption are kept once
    def losses(run_dir):
        return [(r["step"], r.get("val_loss"), r["train_loss"], r["lr"])
                for r in metrics(run_dir)]

    assert losses(cfg_dir) == losses(straight.run_dir)
    assert straight.best_val_loss == resumed.best_val_loss
    best_a = load_checkpoint(straight.run_dir / "best.safetensors")
    best_b = load_checkpoint(cfg_dir / "best.safetensors")
    assert best_a.step == best_b.step
    for name in best_a.params:
        assert np.array_equal(best_a.params[name], best_b.params[name]), name


def test_resume_from_a_middle_checkpoint_is_bit_exact(tiny_config) -> None:
    """Resuming again from an older checkpoint of a finished run redoes the same steps."""
    sections = dict(model={"cell": "gru", "dropout": 0.1},
                    train={"max_steps": 20, "checkpoint_every": 10, "eval_every": 10,
                           "optimizer": "adamw", "lr_schedule": "step", "lr_decay_every": 7})
    result = train(tiny_config(**sections), **QUIET)
    final = result.run_dir / "ckpt-00000020.safetensors"
    expected = load_checkpoint(final).params
    final.unlink()
    again = train(tiny_config(**sections), resume=True, **QUIET)
    assert again.steps == 20
    got = load_checkpoint(final).params
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_stateless_training_still_learns(tiny_config) -> None:
    result = train(tiny_config(train={"stateful": False, "max_steps": 60}), **QUIET)
    rows = [r for r in metrics(result.run_dir) if "val_loss" not in r]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    stateful = train(tiny_config(run="stateful", train={"max_steps": 60}), **QUIET)
    a = load_checkpoint(result.best_checkpoint).params
    b = load_checkpoint(stateful.best_checkpoint).params
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # the flag did something


# -- optimizers, schedules, clipping -------------------------------------------------------


def bigram_loss(text: str) -> float:
    """The cross-entropy (nats/char) of the best bigram model for `text`, fitted on `text`
    itself: no model that sees only the previous character can score lower on it."""
    pairs = Counter(zip(text, text[1:]))
    firsts = Counter(text[:-1])
    return -sum(n * math.log(n / firsts[a]) for (a, _), n in pairs.items()) / (len(text) - 1)


@pytest.mark.parametrize(
    "optimizer,lr",
    [("sgd", 2.0), ("momentum", 0.2), ("rmsprop", 0.02), ("adagrad", 0.2), ("adam", 0.02),
     ("adamw", 0.02)],
)
def test_every_optimizer_decreases_the_loss(tiny_config, corpus_text, optimizer, lr) -> None:
    """Each optimizer trains the model past what the previous character alone predicts.

    A model in which only head.bias learns (a unigram, 2.93 nats/char on this validation
    text) or one without recurrence (at best a bigram, 1.44) fails; measured: 0.86-0.96."""
    cfg = tiny_config(run=optimizer, train={"optimizer": optimizer, "learning_rate": lr,
                                            "max_steps": 300, "eval_every": 100})
    result = train(cfg, **QUIET)
    rows = [r for r in metrics(result.run_dir) if "val_loss" not in r]
    first, last = rows[0]["train_loss"], rows[-1]["train_loss"]
    assert last < first - 0.5, (first, last)
    _, n_val, _ = split_sizes(len(corpus_text), cfg.data.val_fraction, cfg.data.test_fraction)
    val_text = corpus_text[len(corpus_text) - n_val:]
    assert len(val_text) <= cfg.train.eval_max_chars  # the whole validation split is scored
    bigram = bigram_loss(val_text)
    assert result.best_val_loss < bigram - 0.3, (result.best_val_loss, bigram)


def test_adamw_decays_weights_and_adam_does_not(tiny_config) -> None:
    from charrnn.optim import Optimizer

    for name, shrinks in (("adamw", True), ("adam", False)):
        p = {"w": np.ones(4)}
        opt = Optimizer(name, p, weight_decay=0.5)
        opt.step(p, {"w": np.zeros(4)}, lr=0.1)  # no gradient: only the decay can move it
        expected = 1.0 - 0.1 * 0.5 if shrinks else 1.0
        np.testing.assert_allclose(p["w"], expected)


def lr(step, **kw):
    args = dict(base_lr=1.0, schedule="constant", max_steps=100)
    args.update(kw)
    return learning_rate(step, **args)


def test_constant_schedule() -> None:
    assert [lr(s) for s in (0, 1, 50, 99, 1000)] == [1.0] * 5
    assert [lr(s, warmup_steps=4) for s in (0, 1, 2, 3, 4, 50)] == [0.25, 0.5, 0.75, 1, 1, 1]


def test_step_schedule() -> None:
    kw = dict(schedule="step", decay=0.5, decay_every=10)
    assert [lr(s, **kw) for s in (0, 9, 10, 19, 20, 35)] == [1, 1, 0.5, 0.5, 0.25, 0.125]
    # warm-up first; the decay counts from its end
    kw["warmup_steps"] = 5
    assert [lr(s, **kw) for s in (0, 4, 5, 14, 15, 25)] == [0.2, 1, 1, 1, 0.5, 0.25]


def test_exponential_schedule() -> None:
    kw = dict(schedule="exponential", decay=0.5, decay_every=10)
    assert lr(0, **kw) == 1.0
    assert lr(5, **kw) == pytest.approx(0.5**0.5)
    assert lr(10, **kw) == pytest.approx(0.5)
    assert lr(30, **kw) == pytest.approx(0.125)
    assert lr(12, warmup_steps=2, **kw) == pytest.approx(0.5)


def test_cosine_schedule() -> None:
    kw = dict(schedule="cosine", max_steps=100, base_lr=0.1)
    assert lr(0, **kw) == pytest.approx(0.1)
    assert lr(50, **kw) == pytest.approx(0.05)
    assert lr(25, **kw) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr(100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr(150, **kw) == pytest.approx(0.0, abs=1e-12)  # stays at the floor
    assert lr(100, lr_min=0.01, **kw) == pytest.approx(0.01)
    assert lr(50, lr_min=0.01, **kw) == pytest.approx(0.055)
    # with warm-up: linear up to base_lr, then the cosine over the remaining steps
    kw["warmup_steps"] = 20
    assert [lr(s, **kw) for s in (0, 9, 19)] == pytest.approx([0.005, 0.05, 0.1])
    assert lr(20, **kw) == pytest.approx(0.1)
    assert lr(60, **kw) == pytest.approx(0.05)
    assert lr(100, **kw) == pytest.approx(0.0, abs=1e-12)
    values = [lr(s, **kw) for s in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_trainer_logs_the_scheduled_learning_rate(tiny_config) -> None:
    cfg = tiny_config(train={"max_steps": 20, "lr_schedule": "cosine", "warmup_steps": 6,
                             "log_every": 1, "learning_rate": 0.02})
    result = train(cfg, **QUIET)
    for r in metrics(result.run_dir):  # the row of step k reports the rate of update k
        assert r["lr"] == pytest.approx(
            lr(r["step"] - 1, base_lr=0.02, schedule="cosine", max_steps=20, warmup_steps=6))


def test_clip_by_global_norm() -> None:
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0], [12.0]])}  # norm 13
    norm = clip_by_global_norm_(grads, 5.0)
    assert norm == 13.0  # exact: sqrt(169)
    scale = 5.0 / (13.0 + 1e-6)  # torch.nn.utils.clip_grad_norm_'s factor, its 1e-6 included
    np.testing.assert_allclose(grads["a"], [3 * scale, 0], rtol=1e-15)
    np.testing.assert_allclose(grads["b"], [[4 * scale], [12 * scale]], rtol=1e-15)
    after = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    assert after == pytest.approx(5.0 * 13.0 / (13.0 + 1e-6), rel=1e-14) and after < 5.0

    small = {"a": np.array([0.3, 0.4])}
    assert clip_by_global_norm_(small, 5.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])  # under the limit: untouched

    off = {"a": np.array([300.0, 400.0])}
    assert clip_by_global_norm_(off, 0.0) == pytest.approx(500.0)  # 0 disables clipping
    np.testing.assert_array_equal(off["a"], [300.0, 400.0])

    f32 = {"a": np.full(1000, 1.0, np.float32)}
    assert clip_by_global_norm_(f32, 1.0) == pytest.approx(math.sqrt(1000))
    assert f32["a"].dtype == np.float32
    assert float(np.linalg.norm(f32["a"].astype(np.float64))) == pytest.approx(1.0, rel=1e-5)

    bad = {"a": np.array([1.0, np.nan])}
    assert math.isnan(clip_by_global_norm_(bad, 5.0))
    with np.errstate(invalid="ignore"):  # inf * 0: the caller must check the norm
        assert math.isinf(clip_by_global_norm_({"a": np.array([np.inf])}, 5.0))


# -- non-finite numbers ----------------------------------------------------------------------


def _poison_loss(trainer: Trainer, monkeypatch, at_step: int, calls: list[int]) -> None:
    """Make update number `at_step` (1-based) see a NaN loss and NaN gradients."""
    original = trainer.model.loss_and_grads

    def loss_and_grads(*args, **kwargs):
        loss, grads, state = original(*args, **kwargs)
        calls.append(trainer.step + 1)
        if trainer.step + 1 == at_step:
            for g in grads.values():
                g[...] = np.nan
            return float("nan"), grads, state
        return loss, grads, state

    monkeypatch.setattr(trainer.model, "loss_and_grads", loss_and_grads)


def test_nan_loss_stops_with_the_step_and_keeps_best(tiny_config, monkeypatch) -> None:
    trainer = Trainer(tiny_config(train={"max_steps": 30, "eval_every": 10}))
    _poison_loss(trainer, monkeypatch, 17, calls := [])
    with pytest.raises(NonFiniteError, match="step 17") as err:
        trainer.run(**QUIET)
    assert err.value.exit_code == 1
    assert "non-finite" in str(err.value)
    assert max(calls) == 17  # stopped right there
    run_dir = trainer.run_dir
    best = load_checkpoint(run_dir / "best.safetensors")
    assert best.step == 10
    ckpt10 = load_checkpoint(run_dir / "ckpt-00000010.safetensors")
    for name, p in best.params.items():
        assert np.isfinite(p).all()
        assert np.array_equal(p, ckpt10.params[name])
    assert ckpt_steps(run_dir) == [10]
    assert all(r["step"] <= 16 for r in metrics(run_dir))
    assert not (run_dir / ".lock").exists()


def test_nan_weights_stop_training(tiny_config, monkeypatch) -> None:
    trainer = Trainer(tiny_config(train={"max_steps": 30, "eval_every": 10, "log_every": 1}))
    original = trainer.optimizer.step

    def step(params, grads, lr):
        original(params, grads, lr)
        if trainer.step + 1 == 13:
            params["head.bias"][0] = np.inf

    monkeypatch.setattr(trainer.optimizer, "step", step)
    with pytest.raises(NonFiniteError, match="step 13") as err:
        trainer.run(**QUIET)
    assert err.value.exit_code == 1
    best = load_checkpoint(trainer.run_dir / "best.safetensors")  # still loads: finite
    assert best.step == 10
    assert ckpt_steps(trainer.run_dir) == [10]


def test_nan_loss_skipped_when_asked(tiny_config, monkeypatch) -> None:
    trainer = Trainer(tiny_config(train={"max_steps": 30, "eval_every": 10,
                                         "on_nonfinite": "skip"}))
    _poison_loss(trainer, monkeypatch, 17, calls := [])
    messages: list[str] = []
    result = trainer.run(progress=False, echo=messages.append)
    assert result.steps == 30
    assert calls == list(range(1, 31))
    assert any("step 17" in m and "skipped" in m for m in messages)
    final = load_checkpoint(trainer.run_dir / "ckpt-00000030.safetensors")
    assert all(np.isfinite(p).all() for p in final.params.values())
    assert math.isfinite(result.best_val_loss)


def test_the_progress_bar_shows_the_latest_validation_loss(tiny_config, capsys) -> None:
    """The bar's postfix: the training loss and chars/s, and once there is one the latest
    validation loss and bits/char."""
    result = train(tiny_config(train={"max_steps": 20, "eval_every": 10, "log_every": 5}),
                   progress=True, echo=lambda s: None)
    last = [r for r in metrics(result.run_dir) if "val_loss" in r][-1]["val_loss"]
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # as left
    assert "20/20" in final and "loss=" in final and "chars_s=" in final
    assert f"val={last:.3f}" in final and f"bpc={last / math.log(2):.3f}" in final
