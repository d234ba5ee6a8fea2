"""Reliability: kills at any moment, exact resume after them, divergence, storage faults,
hostile files. Real `charrnn train` processes are started, killed and resumed here.

Every process and in-process run gets its own CHARRNN_CACHE_DIR under tmp_path, and one
BLAS thread, so that a straight run and a killed-and-resumed one compute the same numbers.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

import charrnn.data
import charrnn.fileio
import charrnn.train
from charrnn.checkpoint import DIGEST_KEY, checkpoint_digest, load_checkpoint
from charrnn.cli import cli
from charrnn.config import Config, config_from_dict, load_config
from charrnn.errors import CheckpointError, ConfigError
from charrnn.train import train

THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
QUIET = {"progress": False, "echo": lambda s: None}

_WORDS = ("the cat sat on a mat and then it ran to the café naïve über € so it goes "
          "while a bird sang — ROMEO: O, she doth teach the torches to burn bright").split()


def corpus_text(n_words: int = 5000, seed: int = 3) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(10)) for _ in range(n_words // 10)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A corpus, a cache dir and the environment for subprocesses, shared by the module."""
    root = tmp_path_factory.mktemp("reliability")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    env = {**os.environ, **THREADS, "CHARRNN_CACHE_DIR": str(root / "cache")}
    env.pop("PYTHONWARNINGS", None)
    return {"root": root, "corpus": corpus, "env": env, "straight": {}}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_CACHE_DIR", str(tmp_path / "cache"))


def config_dict(corpus: Path, run_dir: Path, **sections) -> dict:
    d = {
        "data": {"path": str(corpus), "val_fraction": 0.1},
        "model": {"cell": "lstm", "hidden_size": 160, "num_layers": 2, "embedding_size": 16,
                  "dropout": 0.2},
        "train": {"batch_size": 4, "seq_length": 16, "max_steps": 16, "eval_every": 4,
                  "checkpoint_every": 1, "log_every": 1, "learning_rate": 0.005,
                  "lr_schedule": "cosine", "warmup_steps": 3, "seed": 11,
                  "eval_max_chars": 2000},
        "output": {"dir": str(run_dir), "keep_last": 2},
    }
    for section, values in sections.items():
        d[section] = {**d.get(section, {}), **values}
    return d


def write_config(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return path


def charrnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "charrnn.cli", *map(str, args)]


def run_cli(env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(charrnn_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=timeout)


def invoke(*args, **kwargs):
    """The CLI in-process (click's CliRunner): exit code, stdout and stderr apart."""
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def error_line(stderr: str, max_lines: int = 1) -> str:
    """The one short error message of a failed command: at most `max_lines` lines on stderr
    after any progress output, starting with 'Error:', and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if ln.startswith("Error:")]
    assert errors, stderr
    assert len(lines) - errors[0] <= max_lines, stderr
    return lines[errors[0]]


def assert_cli_error(result, *names: str, code: int = 2, max_lines: int = 1) -> str:
    """A CliRunner result that failed cleanly: `code`, one line naming `names`."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception)
    stderr = result.stderr
    lines = stderr.strip().splitlines()
    assert 1 <= len(lines) <= 4, stderr
    line = error_line(stderr, max_lines)
    for name in names:
        assert str(name) in line, (name, line)
    return line


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in run_dir.glob("ckpt-*.safetensors"))


def temps(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.name.endswith(".tmp"))


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_tensors(a: Path, b: Path) -> None:
    """Every tensor (weights, optimizer moments, carried state) identical, bit for bit."""
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]), k


def assert_run_dir_loads(run_dir: Path) -> None:
    """Every .safetensors in the run directory is a whole, valid checkpoint."""
    for p in run_dir.glob("*.safetensors"):
        load_checkpoint(p, training_state=p.name.startswith("ckpt-"))


def timeless_rows(run_dir: Path) -> list[dict]:
    """All metrics rows without the wall-clock fields."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("chars_per_sec", "elapsed_sec")}
            for r in rows]


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" not in r]


# -- straight reference runs -----------------------------------------------------------------


def straight_run(shared, cell: str, steps: int = 16) -> Path:
    """The run directory of an uninterrupted subprocess run of the kill config for `cell`."""
    if (cell, steps) not in shared["straight"]:
        run_dir = shared["root"] / f"straight-{cell}-{steps}"
        model = {"cell": cell, "hidden_size": KILL_HIDDEN[cell]}
        cfg = write_config(shared["root"] / f"straight-{cell}-{steps}.yaml",
                           config_dict(shared["corpus"], run_dir, model=model,
                                       train={"max_steps": steps}))
        r = run_cli(shared["env"], "train", "--config", cfg)
        assert r.returncode == 0, r.stderr
        shared["straight"][cell, steps] = run_dir
    return shared["straight"][cell, steps]


# -- 1. kill at any moment ---------------------------------------------------------------------


class Child:
    """A `charrnn train` subprocess whose output goes to files (no pipe to fill up)."""

    def __init__(self, env: dict, log: Path, *args):
        self.log = log
        self.out = open(log.with_suffix(".out"), "w")
        self.err = open(log.with_suffix(".err"), "w")
        self.proc = subprocess.Popen(charrnn_cmd(*args), env=env, stdout=self.out,
                                     stderr=self.err)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, condition, timeout: float = 120) -> bool:
        """Polls `condition` (tight loop) until it holds or the process ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.0005)
        raise AssertionError(f"timed out waiting in {self.log}")

    def kill(self, sig=signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.finish()

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.out.close()
        self.err.close()
        return rc

    @property
    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text()


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _kill_somewhere(child: Child, run_dir: Path, policy: str, rng: random.Random) -> str:
    """SIGKILLs `child` at a point chosen by `policy`; returns what the point was."""
    if policy == "startup":  # importing, loading the corpus, taking the lock, restoring
        time.sleep(rng.uniform(0.0, 0.8))
    elif policy == "config":  # the run directory is set up, no checkpoint yet
        child.wait_for(lambda: (run_dir / "config.yaml").exists())
    elif policy == "write":  # in the middle of writing a checkpoint
        mine = f".safetensors.{child.pid}.tmp"
        child.wait_for(lambda: any(n.endswith(mine) for n in _listdir(run_dir)))
    elif policy == "steps":  # some steps further, between or during writes
        target = max(ckpt_steps(run_dir), default=0) + rng.randint(1, 3)
        child.wait_for(lambda: max(ckpt_steps(run_dir), default=0) >= target)
        time.sleep(rng.uniform(0.0, 0.05))
    rc = child.kill()
    return "finished" if rc == 0 else policy


def _check_after_sigkill(run_dir: Path, pids: list[int]) -> list[Path]:
    """What SIGKILLs may leave: whole checkpoints, a stale lock, temp files of the killed
    processes (`.<name>.<pid>.tmp`; a run killed before it took the lock cleans nothing)."""
    if not run_dir.exists():
        return []
    assert_run_dir_loads(run_dir)
    stale = temps(run_dir)
    for p in stale:
        m = TEMP.match(p.name)
        assert m and int(m.group("pid")) in pids, p.name
    lock = run_dir / ".lock"
    if lock.exists():
        assert lock.read_text().strip() in ["", *map(str, pids)]
    return stale


# hidden sizes that make each checkpoint (weights and Adam moments) about 4 MB: a write
# takes long enough for a kill to land inside it
KILL_HIDDEN = {"rnn": 320, "lstm": 160, "gru": 192}
# enough steps that a run outlasts the "startup" kill's random delay (up to 0.8 s)
KILL_STEPS = 48
KILL_PLANS = {
    # cell: where each of the successive runs is SIGKILLed; then a final --resume finishes
    "rnn": ["config", "startup", "write", "steps"],
    "lstm": ["write", "steps", "startup", "write"],
    "gru": ["steps", "write", "write", "startup"],
}


@pytest.mark.slow
@pytest.mark.parametrize("cell", list(KILL_PLANS))
def test_sigkill_anywhere_then_resume_finishes_bit_exact(shared, tmp_path, cell) -> None:
    """4 SIGKILLs per cell (12 in all) at random points, including mid-checkpoint-write;
    after each, every checkpoint loads and `--resume` continues; the finished run equals
    an uninterrupted one bit for bit (weights, optimizer moments, state, metrics)."""
    rng = random.Random(f"kill-{cell}")
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "kill.yaml", config_dict(
        shared["corpus"], run_dir, model={"cell": cell, "hidden_size": KILL_HIDDEN[cell]},
        train={"max_steps": KILL_STEPS}))
    reference = straight_run(shared, cell, KILL_STEPS)
    seen_stale: list[str] = []
    pids: list[int] = []
    lock_left = False
    args = ["train", "--config", cfg]
    for i, policy in enumerate(KILL_PLANS[cell]):
        before = max(ckpt_steps(run_dir), default=0) if run_dir.exists() else 0
        child = Child(shared["env"], tmp_path / f"run{i}.log", *args)
        what = _kill_somewhere(child, run_dir, policy, rng)
        assert what != "finished", f"run {i} finished before its kill ({policy})"
        assert "Traceback" not in child.stderr
        pids.append(child.pid)
        stale = _check_after_sigkill(run_dir, pids)
        seen_stale += [p.name for p in stale]
        lock_left |= (run_dir / ".lock").exists()
        # a resumed run never goes back: it starts from the newest checkpoint
        assert max(ckpt_steps(run_dir), default=0) >= before
        args = ["train", "--config", cfg, "--resume"]

    final = Child(shared["env"], tmp_path / "final.log", *args)
    assert final.finish() == 0, final.stderr
    assert ckpt_steps(run_dir) == [KILL_STEPS - 1, KILL_STEPS]
    assert not temps(run_dir), "stale temporary files were not cleaned up"
    assert not (run_dir / ".lock").exists()
    assert lock_left, "no SIGKILL left a stale lock behind: the takeover went untested"
    assert_run_dir_loads(run_dir)
    last = f"ckpt-{KILL_STEPS:08d}.safetensors"
    assert_same_tensors(run_dir / last, reference / last)
    # metrics.jsonl: each step exactly once, the same numbers as the straight run
    assert timeless_rows(run_dir) == timeless_rows(reference)
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, KILL_STEPS + 1))
    # the kills timed by a checkpoint temp file appearing left one at least behind
    assert any(".safetensors." in name for name in seen_stale), "no kill mid-write"
    print(f"{cell}: stale temp files left by SIGKILL and cleaned on resume: {seen_stale}")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                             (signal.SIGTERM, 143, "SIGTERM")])
def test_sigint_sigterm_save_then_exit_with_the_resume_command(shared, tmp_path, sig, code,
                                                               name) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "sig.yaml", config_dict(shared["corpus"], run_dir))
    child = Child(shared["env"], tmp_path / "sig.log", "train", "--config", cfg,
                  "--set", "train.checkpoint_every=5")
    assert child.wait_for(lambda: ckpt_steps(run_dir)[-1:] >= [5])
    assert child.kill(sig) == code, child.stderr
    line = error_line(child.stderr)
    m = re.fullmatch(rf"Error: {name}: stopped at step (\d+), checkpoint (\S+); "
                     r"resume with: (charrnn train .* --resume)", line)
    assert m, line
    step, ckpt = int(m.group(1)), Path(m.group(2))
    assert ckpt == run_dir / f"ckpt-{step:08d}.safetensors" and 5 <= step < 16
    assert load_checkpoint(ckpt, training_state=True).step == step  # written before exit
    assert not (run_dir / ".lock").exists() and not temps(run_dir)
    # the printed command, as given, finishes the run exactly
    resume = shlex.split(m.group(3))
    assert resume[:2] == ["charrnn", "train"]
    r = subprocess.run(charrnn_cmd(*resume[1:]), env=shared["env"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # checkpoint_every differs from the straight run, the weights do not
    reference = straight_run(shared, "lstm")
    a, b = tensors_of(run_dir / "ckpt-00000016.safetensors"), tensors_of(
        reference / "ckpt-00000016.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_signal_while_starting_exits_at_once(tmp_path, monkeypatch) -> None:
    """A signal before the first step (loading the corpus) stops at once, 143, one line."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text(500))
    cfg = write_config(tmp_path / "c.yaml", config_dict(corpus, tmp_path / "run"))
    real = charrnn.train.load_corpus

    def slow_load(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(charrnn.train, "load_corpus", slow_load)
    line = assert_cli_error(invoke("train", "--config", cfg), "SIGTERM", code=143)
    assert "before the first training step" in line
    assert not (tmp_path / "run" / ".lock").exists()


def test_stale_lock_and_temps_of_a_dead_process_are_taken_over(shared, tmp_path) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(shared["corpus"], run_dir,
                                                        model={"hidden_size": 16},
                                                        train={"max_steps": 4}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir.mkdir()
    (run_dir / ".lock").write_text(str(dead.pid))
    junk = [f".ckpt-00000004.safetensors.{dead.pid}.tmp", f".best.safetensors.{dead.pid}.tmp",
            f".config.yaml.{dead.pid}.tmp"]
    for name in junk:
        (run_dir / name).write_bytes(b"\0half a checkpoint")
    r = run_cli(shared["env"], "train", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert not temps(run_dir) and not (run_dir / ".lock").exists()
    assert ckpt_steps(run_dir) == [3, 4]


def test_live_lock_pid_is_refused(shared, tmp_path) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(shared["corpus"], run_dir,
                                                        model={"hidden_size": 16}))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir.mkdir()
        (run_dir / ".lock").write_text(str(alive.pid))
        r = run_cli(shared["env"], "train", "--config", cfg)
        assert r.returncode == 2
        line = error_line(r.stderr)
        assert f"pid {alive.pid}" in line and str(run_dir / ".lock") in line
        assert (run_dir / ".lock").read_text() == str(alive.pid)  # left alone
        assert not list(run_dir.glob("*.safetensors"))
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.slow
def test_second_train_on_a_busy_run_dir_is_refused(shared, tmp_path) -> None:
    """Two real trainers: the second (even with --resume) exits 2 naming the first's pid."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(shared["corpus"], run_dir,
                                                        train={"max_steps": 2000}))
    first = Child(shared["env"], tmp_path / "first.log", "train", "--config", cfg)
    try:
        assert first.wait_for(lambda: ckpt_steps(run_dir)[-1:] >= [2])
        for extra in ([], ["--resume"]):
            r = run_cli(shared["env"], "train", "--config", cfg, *extra)
            assert r.returncode == 2, r.stderr
            line = error_line(r.stderr)
            assert f"pid {first.pid}" in line and str(run_dir / ".lock") in line, line
        assert first.proc.poll() is None  # undisturbed
    finally:
        assert first.kill(signal.SIGTERM) == 143


# -- 2. divergence ----------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["1e6", "1e30"])
def test_divergence_stops_at_its_step_and_keeps_the_good_checkpoints(shared, tmp_path,
                                                                     lr) -> None:
    """6 good sgd steps, then --resume with a learning rate that blows up: exit 1 at the
    step it happens, one line that says what to try, and no checkpoint touched."""
    run_dir = tmp_path / "run"
    small = {"model": {"hidden_size": 32, "num_layers": 1, "dropout": 0.0},
             "train": {"optimizer": "sgd", "learning_rate": 0.5, "max_steps": 6,
                       "eval_every": 2, "checkpoint_every": 2, "lr_schedule": "constant",
                       "warmup_steps": 0}, "output": {"keep_last": 3}}
    cfg = write_config(tmp_path / "c.yaml", config_dict(shared["corpus"], run_dir, **small))
    assert run_cli(shared["env"], "train", "--config", cfg).returncode == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
              for p in run_dir.glob("*.safetensors")}
    assert set(before) == {"best.safetensors", "ckpt-00000002.safetensors",
                           "ckpt-00000004.safetensors", "ckpt-00000006.safetensors"}
    r = run_cli(shared["env"], "train", "--config", cfg, "--resume", "--set",
                "train.max_steps=20", "--set", f"train.learning_rate={lr}",
                "--set", "train.grad_clip=0")
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr)
    # update 7 uses the new rate; its result is seen at step 7 (weights) or 8 (loss)
    m = re.match(r"Error: step (\d+): (.*)", line)
    assert m and int(m.group(1)) in (7, 8), line
    assert re.search(r"non-finite|diverged", line), line
    assert "no checkpoint written since ckpt-00000006.safetensors" in line
    assert "train.learning_rate" in line and "train.grad_clip=5" in line
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
             for p in run_dir.glob("*.safetensors")}
    assert after == before
    assert_run_dir_loads(run_dir)  # loading refuses NaN/Inf weights
    assert not (run_dir / ".lock").exists()


def test_divergence_with_on_nonfinite_skip_gives_up_after_a_streak(shared, tmp_path) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(
        shared["corpus"], run_dir, model={"hidden_size": 32, "num_layers": 1},
        train={"optimizer": "sgd", "learning_rate": 1e6, "grad_clip": 0, "max_steps": 40,
               "checkpoint_every": 0, "eval_every": 50, "on_nonfinite": "skip"}))
    r = run_cli(shared["env"], "train", "--config", cfg)
    assert r.returncode == 1, r.stderr
    skipped = [ln for ln in r.stderr.splitlines() if "update skipped" in ln]
    assert len(skipped) == charrnn.train.MAX_SKIPPED_IN_A_ROW - 1
    line = error_line(r.stderr)
    assert "steps in a row" in line and "no checkpoint written (none yet)" in line
    assert not list(run_dir.glob("*.safetensors"))


def _poison(monkeypatch, at_step: int, where: str) -> None:
    """Update number `at_step` sees a NaN loss, an Inf gradient, or ends with Inf weights."""
    from charrnn.model import CharRNN
    from charrnn.optim import Optimizer

    calls = {"n": 0}
    original_loss, original_step = CharRNN.loss_and_grads, Optimizer.step

    def loss_and_grads(self, *a, **k):
        loss, grads, state = original_loss(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == at_step and where == "loss":
            loss = float("nan")
        if calls["n"] == at_step and where == "grad":
            next(iter(grads.values())).flat[0] = np.inf
        return loss, grads, state

    def step(self, params, grads, lr):
        original_step(self, params, grads, lr)
        if calls["n"] == at_step and where == "weights":
            params["head.bias"][0] = np.inf

    monkeypatch.setattr(CharRNN, "loss_and_grads", loss_and_grads)
    monkeypatch.setattr(Optimizer, "step", step)


@pytest.mark.parametrize("where", ["loss", "grad", "weights"])
def test_nonfinite_is_caught_at_its_step_not_at_the_next_log(shared, tmp_path, monkeypatch,
                                                             where) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(
        shared["corpus"], run_dir, model={"hidden_size": 16, "num_layers": 1},
        train={"max_steps": 20, "log_every": 10, "eval_every": 5, "checkpoint_every": 0}))
    _poison(monkeypatch, 13, where)
    line = assert_cli_error(invoke("train", "--config", cfg), "step 13", code=1)
    assert "non-finite" in line and "since ckpt-00000010.safetensors" in line
    assert ckpt_steps(run_dir) == [5, 10]
    assert_run_dir_loads(run_dir)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_on_nonfinite_skip_skips_the_step_and_goes_on(shared, tmp_path, monkeypatch,
                                                      where) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(
        shared["corpus"], run_dir, model={"hidden_size": 16, "num_layers": 1},
        train={"max_steps": 20, "eval_every": 5, "on_nonfinite": "skip"}))
    _poison(monkeypatch, 13, where)
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert "step 13: the " in result.stderr and "update skipped" in result.stderr
    assert [r["step"] for r in train_rows(run_dir)] == [s for s in range(1, 21) if s != 13]
    assert_run_dir_loads(run_dir)


def test_nonfinite_weights_stop_even_with_skip(shared, tmp_path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(
        shared["corpus"], run_dir, model={"hidden_size": 16, "num_layers": 1},
        train={"max_steps": 20, "eval_every": 5, "checkpoint_every": 0,
               "on_nonfinite": "skip"}))
    _poison(monkeypatch, 7, "weights")
    line = assert_cli_error(invoke("train", "--config", cfg), "step 7", code=1)
    assert "weights became non-finite" in line
    assert ckpt_steps(run_dir) == [5]


# -- 4. storage faults ------------------------------------------------------------------------


class _FullDisk:
    """A file that takes half of what is written to it, then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fileno(self):
        return self.f.fileno()

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def _faulty_open(pattern: str, fault: str):
    """An `open` that fails for files whose name matches `pattern` (fnmatch)."""
    import builtins
    from fnmatch import fnmatch

    def fake(file, mode="r", *args, **kwargs):
        if fnmatch(Path(file).name, pattern) and ("w" in mode or "a" in mode):
            if fault == "EACCES":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return _FullDisk(builtins.open(file, mode, *args, **kwargs))
        return builtins.open(file, mode, *args, **kwargs)

    return fake


def test_output_dir_under_a_regular_file(shared, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    cfg = write_config(tmp_path / "c.yaml",
                       config_dict(shared["corpus"], tmp_path / "file" / "run"))
    line = assert_cli_error(invoke("train", "--config", cfg), tmp_path / "file" / "run")
    assert "cannot create output.dir" in line


def test_unwritable_run_dir(shared, tmp_path, monkeypatch) -> None:
    """Permission denied (simulated: tests run as root) on the files, then on the lock."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(shared["corpus"], run_dir))
    monkeypatch.setattr(charrnn.fileio, "open", _faulty_open("*.tmp", "EACCES"),
                        raising=False)
    line = assert_cli_error(invoke("train", "--config", cfg), run_dir / "config.yaml")
    assert "Permission denied" in line
    assert not temps(run_dir) and not (run_dir / ".lock").exists()
    monkeypatch.delattr(charrnn.fileio, "open")

    real_open = os.open

    def os_open(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    line = assert_cli_error(invoke("train", "--config", cfg), run_dir)
    assert "Permission denied" in line


@pytest.mark.parametrize("victim", [".ckpt-00000006.safetensors.*.tmp",
                                    ".best.safetensors.*.tmp", "metrics.jsonl"])
def test_disk_full_mid_write_keeps_every_earlier_checkpoint(shared, tmp_path, monkeypatch,
                                                            victim) -> None:
    """ENOSPC halfway through a checkpoint (or metrics) write: exit 2, one line naming the
    file, the temp file removed, the earlier checkpoints intact; resume then finishes the
    run exactly as if nothing had happened."""
    sections = {"model": {"hidden_size": 24, "num_layers": 1},
                "train": {"max_steps": 12, "checkpoint_every": 1}, "output": {"keep_last": 3}}
    straight = train(config_from_dict(config_dict(shared["corpus"], tmp_path / "straight",
                                                  **sections)), **QUIET)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config_dict(shared["corpus"], run_dir, **sections))
    if victim == "metrics.jsonl":  # the 7th metrics row hits a full disk
        rows = {"n": 0}
        real_write = charrnn.train.MetricsLog.write

        def write(self, row):
            rows["n"] += 1
            if rows["n"] == 7:
                self._f = _FullDisk(self._f)
            real_write(self, row)

        monkeypatch.setattr(charrnn.train.MetricsLog, "write", write)
        name = "metrics.jsonl"
    else:
        monkeypatch.setattr(charrnn.fileio, "open", _faulty_open(victim, "ENOSPC"),
                            raising=False)
        name = victim.split(".")[1] + ".safetensors"  # ckpt-00000006 / best (at step 8)
    result = invoke("train", "--config", cfg)
    line = assert_cli_error(result, run_dir / name, "No space left on device",
                            "resume with: charrnn train --config")
    assert "intact" in line
    assert not temps(run_dir) and not (run_dir / ".lock").exists()
    assert_run_dir_loads(run_dir)
    steps = ckpt_steps(run_dir)
    assert steps and steps[-1] <= 7
    # space freed
    if victim == "metrics.jsonl":
        monkeypatch.setattr(charrnn.train.MetricsLog, "write", real_write)
    else:
        monkeypatch.delattr(charrnn.fileio, "open")
    result = invoke("train", "--config", cfg, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_tensors(run_dir / "ckpt-00000012.safetensors",
                        straight.run_dir / "ckpt-00000012.safetensors")


def test_disk_full_for_the_corpus_cache_is_not_fatal(shared, tmp_path, monkeypatch,
                                                     caplog) -> None:
    cfg = write_config(tmp_path / "c.yaml", config_dict(
        shared["corpus"], tmp_path / "run", model={"hidden_size": 16}, train={"max_steps": 2}))
    monkeypatch.setattr(charrnn.data, "open", _faulty_open("*.tmp", "ENOSPC"), raising=False)
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert "cannot write the corpus cache" in caplog.text
    assert not list((tmp_path / "cache").glob("*.npy"))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


# -- 5. hostile and broken files --------------------------------------------------------------


@pytest.fixture(scope="module")
def good_ckpt(shared) -> Path:
    run_dir = shared["root"] / "good"
    d = config_dict(shared["corpus"], run_dir, model={"hidden_size": 8, "num_layers": 1},
                    train={"max_steps": 2, "eval_every": 2}, data={"cache": False})
    train(config_from_dict(d), **QUIET)
    return run_dir / "ckpt-00000002.safetensors"


def _parts(path: Path) -> tuple[dict, dict[str, np.ndarray], bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return header, tensors_of(path), raw


def resave(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """A crafted checkpoint, its checksum made to match: the checks behind it must hold."""
    return save(tensors, metadata={**meta, DIGEST_KEY: checkpoint_digest(tensors, meta)})


def hostile_checkpoints(good: Path, out: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a broken checkpoint file, a piece of the message that must name it)."""
    header, tensors, raw = _parts(good)
    meta = header["__metadata__"]
    n = int.from_bytes(raw[:8], "little")
    made: dict[str, tuple[bytes, str]] = {}
    for cut in (0, 5, 8, 40, n + 7, n + 8, n + 200, len(raw) - 1):
        made[f"truncated-{cut}"] = (raw[:cut], "")
    made["random-bytes"] = (np.random.default_rng(0).bytes(4096), "")
    made["json-renamed"] = (json.dumps({"model": "lstm"}).encode(), "")
    made["plain-safetensors"] = (save({"a": np.zeros(3, np.float32)}), "not a charrnn")

    def with_meta(**kw):
        return resave(tensors, {**meta, **kw})

    def with_config(edit):
        c = json.loads(meta["config"])
        edit(c)
        return with_meta(config=json.dumps(c))

    made["config-bad-json"] = (with_meta(config='{"model": '), "'config'")
    made["config-unknown-key"] = (with_config(lambda c: c["model"].update(bogus=1)),
                                  "model.bogus")
    made["config-bad-value"] = (with_config(lambda c: c["model"].update(cell="transformer")),
                                "model.cell")
    v = json.loads(meta["vocab"])
    made["vocab-mismatch"] = (with_meta(vocab=json.dumps({"chars": v["chars"][:-1]})),
                              "embedding.weight")
    made["vocab-not-chars"] = (with_meta(vocab=json.dumps({"chars": ["ab"]})), "vocab")
    made["shape-mismatch"] = (with_config(lambda c: c["model"].update(hidden_size=9)),
                              "rnn.weight_ih_l0")
    made["format-version"] = (with_meta(format_version="99"), "'99'")
    made["step-negative"] = (with_meta(step="-3"), "step")
    made["info-not-object"] = (with_meta(info="[1]"), "'info'")
    for name, edit, key in [
        ("int32-tensor", lambda t: t["head.bias"].astype(np.int32), "int32"),
        ("nan-weights", lambda t: np.full_like(t["head.bias"], np.nan), "NaN"),
        ("inf-weights", lambda t: np.full_like(t["head.bias"], -np.inf), "NaN or Inf"),
    ]:
        made[name] = (resave({**tensors, "head.bias": edit(tensors)}, meta), key)
    made["tensor-missing"] = (resave({k: t for k, t in tensors.items() if k != "head.bias"},
                                     meta), "head.bias")
    made["tensor-stray"] = (resave({**tensors, "evil": np.zeros(2, np.float32)}, meta),
                            "evil")
    made["header-2**60"] = ((2**60).to_bytes(8, "little") + raw[8:], "")
    made["header-past-end"] = ((len(raw)).to_bytes(8, "little") + raw[8:], "")
    h = json.loads(raw[8 : 8 + n])
    first = next(k for k in h if k != "__metadata__")
    h[first]["data_offsets"][1] += 10**12
    hb = json.dumps(h).encode()
    made["offsets-beyond-file"] = (len(hb).to_bytes(8, "little") + hb + raw[8 + n :], "")
    out.mkdir(exist_ok=True)
    files = {}
    for name, (data, key) in made.items():
        (out / f"{name}.safetensors").write_bytes(data)
        files[name] = (out / f"{name}.safetensors", key)
    return files


HOSTILE = ["truncated-0", "truncated-5", "truncated-8", "truncated-40", "truncated-n+7",
           "truncated-n+8", "truncated-n+200", "truncated-len-1", "random-bytes",
           "json-renamed", "plain-safetensors", "config-bad-json", "config-unknown-key",
           "config-bad-value", "vocab-mismatch", "vocab-not-chars", "shape-mismatch",
           "format-version", "step-negative", "info-not-object", "int32-tensor",
           "nan-weights", "inf-weights", "tensor-missing", "tensor-stray", "header-2**60",
           "header-past-end", "offsets-beyond-file"]


@pytest.fixture(scope="module")
def hostile(good_ckpt, shared):
    files = hostile_checkpoints(good_ckpt, shared["root"] / "hostile")
    header_len = int.from_bytes(good_ckpt.read_bytes()[:8], "little")
    size = good_ckpt.stat().st_size
    renamed = {}
    for name, value in files.items():
        if name.startswith("truncated-"):
            cut = int(name.split("-", 1)[1])
            label = {header_len + 7: "n+7", header_len + 8: "n+8", header_len + 200: "n+200",
                     size - 1: "len-1"}.get(cut, str(cut))
            name = f"truncated-{label}"
        renamed[name] = value
    assert sorted(renamed) == sorted(HOSTILE)
    return renamed


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_checkpoint_is_refused_in_one_line(hostile, shared, name) -> None:
    path, key = hostile[name]
    for args in (["sample", "--checkpoint", path, "--seed", "the", "--length", "5"],
                 ["info", path],
                 ["eval", "--checkpoint", path, "--text", shared["corpus"]]):
        line = assert_cli_error(invoke(*args), path, key)
        assert len(line) < 400
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_hostile_checkpoints_through_the_real_cli(hostile, shared) -> None:
    for name in ("truncated-n+200", "json-renamed", "nan-weights", "header-2**60"):
        path, key = hostile[name]
        r = run_cli(shared["env"], "sample", "--checkpoint", path, "--seed", "a")
        assert r.returncode == 2 and r.stdout == ""
        line = error_line(r.stderr)
        assert str(path) in line and key in line


def _make_run(shared, tmp_path, name="run", **train_keys) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    d = config_dict(shared["corpus"], run_dir, model={"hidden_size": 16, "num_layers": 1},
                    train={"max_steps": 8, "eval_every": 4, "checkpoint_every": 2,
                           "lr_schedule": "constant", **train_keys},
                    output={"keep_last": 3})
    return write_config(tmp_path / f"{name}.yaml", d), run_dir


def test_resume_skips_a_damaged_newest_checkpoint(shared, tmp_path) -> None:
    """A checkpoint damaged on disk is moved aside; resume goes on from the one before."""
    cfg, run_dir = _make_run(shared, tmp_path)
    assert invoke("train", "--config", cfg).exit_code == 0
    newest = run_dir / "ckpt-00000008.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    ref_cfg, ref_dir = _make_run(shared, tmp_path, "ref", max_steps=12)
    assert invoke("train", "--config", ref_cfg).exit_code == 0
    result = invoke("train", "--config", cfg, "--resume", "--set", "train.max_steps=12",
                    "--set", "output.keep_last=1")
    assert result.exit_code == 0, result.output
    assert "moved aside to ckpt-00000008.safetensors.corrupt" in result.stderr
    assert ckpt_steps(run_dir) == [12]
    assert_same_tensors(run_dir / "ckpt-00000012.safetensors",
                        ref_dir / "ckpt-00000012.safetensors")


@pytest.mark.parametrize("damage, key", [
    ("state-shape", "state.l0.h"),
    ("rng", "incomplete training state"),
    ("optim-nan", "NaN"),
    ("data-position", "data position"),
    ("best-loss", "best loss"),
    ("all-truncated", "no readable checkpoint"),
])
def test_resume_refuses_damaged_training_state(shared, tmp_path, damage, key) -> None:
    cfg, run_dir = _make_run(shared, tmp_path)
    assert invoke("train", "--config", cfg).exit_code == 0
    for p in run_dir.glob("ckpt-*.safetensors"):
        header, tensors, raw = _parts(p)
        meta = header["__metadata__"]
        ts = json.loads(meta["train_state"])
        if damage == "state-shape":
            tensors["state.l0.h"] = np.zeros((3, 3), np.float32)
        elif damage == "rng":
            ts["rng"] = {"bit_generator": "nonsense"}
        elif damage == "optim-nan":
            k = next(k for k in tensors if k.startswith("optim.") and tensors[k].ndim)
            tensors[k] = np.full_like(tensors[k], np.nan)
        elif damage == "data-position":
            ts["data"]["position"] = 10**9
        elif damage == "best-loss":
            ts["best_loss"] = "low"
        if damage == "all-truncated":
            p.write_bytes(raw[:100])
        else:
            p.write_bytes(resave(tensors, {**meta, "train_state": json.dumps(ts)}))
    result = invoke("train", "--config", cfg, "--resume", "--set", "train.max_steps=12")
    assert_cli_error(result, key)


# corpora


def _corpus_cases(tmp: Path) -> dict[str, tuple[Path, dict, list[str]]]:
    """name -> (data.path, extra data keys, pieces the message must hold)."""
    tmp.mkdir(exist_ok=True)
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "short.txt").write_text("just a few words\n")
    (tmp / "binary.bin").write_bytes(b"\x7fELF\x02\x01\x01\0\0\0" + bytes(range(256)) * 4)
    bad = b"a perfectly fine line\n" * 50
    (tmp / "latin1.txt").write_bytes(bad + "café".encode("latin-1") + b"\n")
    (tmp / "docs").mkdir(exist_ok=True)
    (tmp / "docs" / "readme.md").write_text("# not a .txt\n" * 200)
    return {
        "missing": (tmp / "nope.txt", {}, ["no such file"]),
        "empty": (tmp / "empty.txt", {}, ["empty"]),
        "shorter-than-a-window": (tmp / "short.txt", {}, ["window"]),
        "binary": (tmp / "binary.bin", {}, ["binary"]),
        "invalid-utf8": (tmp / "latin1.txt", {}, [f"byte offset {len(bad) + 3}"]),
        "no-matching-files": (tmp / "docs", {"include": "*.txt"}, ["'*.txt'"]),
        "glob-matches-nothing": (tmp / "*.nothing", {}, ["no files match"]),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "shorter-than-a-window", "binary",
                                  "invalid-utf8", "no-matching-files",
                                  "glob-matches-nothing"])
def test_broken_corpus_is_refused_in_one_line(tmp_path, case) -> None:
    path, extra, pieces = _corpus_cases(tmp_path / "data")[case]
    d = config_dict(path, tmp_path / "run", data=extra)
    if case == "shorter-than-a-window":
        d["data"]["val_fraction"] = 0.0
    cfg = write_config(tmp_path / "c.yaml", d)
    line = assert_cli_error(invoke("train", "--config", cfg), path, *pieces)
    assert len(line) < 400
    assert not list((tmp_path / "run").glob("*.safetensors"))


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "invalid-utf8"])
def test_broken_eval_text_is_refused_in_one_line(good_ckpt, tmp_path, case) -> None:
    path, _, pieces = _corpus_cases(tmp_path / "data")[case]
    assert_cli_error(invoke("eval", "--checkpoint", good_ckpt, "--text", path), path,
                     *pieces)


# configs

CONFIG_CASES = {
    "unknown-key": ("train:\n  max_step: 5\n", ["train.max_step", "train.max_steps"]),
    "unknown-section": ("trian:\n  max_steps: 5\n", ["trian", "train"]),
    "wrong-type": ("train:\n  batch_size: lots\n", ["train.batch_size", "lots"]),
    "wrong-type-bool": ("train:\n  stateful: 3\n", ["train.stateful"]),
    "out-of-range": ("model:\n  dropout: 1.5\n", ["model.dropout", "1.5"]),
    "negative": ("train:\n  max_steps: -1\n", ["train.max_steps"]),
    "bad-choice": ("model:\n  cell: transformer\n", ["model.cell", "transformer"]),
    "yaml-syntax": ("train:\n  max_steps: [1, 2\n", ["invalid YAML"]),
    "yaml-tabs": ("train:\n\tmax_steps: 1\n", ["invalid YAML"]),
    "python-tag": ("train: !!python/object/apply:os.system ['touch {marker}']\n",
                   ["invalid YAML"]),
    "python-name": ("model:\n  cell: !!python/name:os.system\n", ["invalid YAML"]),
    # PyYAML raises ValueError / OverflowError, not YAMLError, for these values
    "yaml-impossible-date": ("train:\n  seed: 2001-02-30\n", ["invalid YAML"]),
    "yaml-escape-past-unicode": ('model:\n  cell: "\\U7fffffff"\n', ["invalid YAML"]),
    "yaml-escape-past-c-int": ('model:\n  cell: "\\Uffffffff"\n', ["invalid YAML"]),
    "not-a-mapping": ("- a\n- b\n", ["top level"]),
    "section-not-mapping": ("train: 5\n", ["train"]),
    "no-data-path": ("", ["data.path"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_refused_in_one_line(shared, tmp_path, case) -> None:
    body, pieces = CONFIG_CASES[case]
    marker = tmp_path / "pwned"
    whole_file = case in ("no-data-path", "not-a-mapping")
    head = "" if whole_file else f"data:\n  path: {shared['corpus']}\n"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(head + body.format(marker=marker))
    assert_cli_error(invoke("train", "--config", cfg), cfg, *pieces)
    assert not marker.exists()  # nothing was executed


def test_bad_override_and_config_through_the_real_cli(shared, tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {shared['corpus']}\n"
                   f"train: !!python/object/apply:os.system ['touch {tmp_path / 'x'}']\n")
    r = run_cli(shared["env"], "train", "--config", cfg)
    assert r.returncode == 2 and str(cfg) in error_line(r.stderr)
    assert not (tmp_path / "x").exists()
    cfg.write_text(f"data:\n  path: {shared['corpus']}\n")
    r = run_cli(shared["env"], "train", "--config", cfg, "--set", "model.hidden_size=big")
    assert r.returncode == 2 and "model.hidden_size" in error_line(r.stderr)
    r = run_cli(shared["env"], "train", "--config", cfg, "--set", 'model.hidden_size="\\Uffffffff"')
    assert r.returncode == 2 and "model.hidden_size" in error_line(r.stderr)


# sample arguments

SAMPLE_CASES = {
    "unknown-seed-chars": (["--seed", "the ☃ \x00"], ["--seed", "'☃'"]),
    "temperature-negative": (["--temperature", "-0.5"], ["--temperature"]),
    "temperature-nan": (["--temperature", "nan"], ["--temperature"]),
    "top-p-zero": (["--top-p", "0"], ["--top-p"]),
    "top-p-above-one": (["--top-p", "1.5"], ["--top-p"]),
    "top-p-nan": (["--top-p", "nan"], ["--top-p"]),
    "length-negative": (["--length", "-1"], ["--length"]),
    "top-k-negative": (["--top-k", "-2"], ["--top-k"]),
    "num-samples-zero": (["--num-samples", "0"], ["--num-samples"]),
    "rng-seed-negative": (["--rng-seed", "-1"], ["--rng-seed"]),
    "length-not-a-number": (["--length", "ten"], ["--length"]),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_bad_sample_arguments_exit_2(good_ckpt, case) -> None:
    args, pieces = SAMPLE_CASES[case]
    result = invoke("sample", "--checkpoint", good_ckpt, "--length", "3", *args)
    assert_cli_error(result, *pieces)
    assert result.stdout == ""


def test_missing_checkpoint_and_empty_run_dir(tmp_path) -> None:
    assert_cli_error(invoke("sample", "--checkpoint", tmp_path / "nope.safetensors"),
                     tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    assert_cli_error(invoke("info", tmp_path / "empty"), tmp_path / "empty", "no checkpoint")


# properties


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["1e-3", "lstm", "~", "!!python/none", "*x", "&x 1", "{", "[", "@", "%"]))
yaml_docs = st.recursive(
    st.dictionaries(st.sampled_from(["data", "model", "train", "output", "path", "cell",
                                     "max_steps", "dropout", "x"]), yaml_scalars, max_size=4),
    lambda inner: st.dictionaries(st.sampled_from(["data", "model", "train", "output", "y"]),
                                  inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=yaml_docs, noise=st.text(max_size=20), where=st.integers(0, 200),
       raw=st.booleans())
def test_config_files_give_config_or_config_error(tmp_path, doc, noise, where, raw) -> None:
    """Any YAML-ish text: a Config or a one-line ConfigError naming the file, nothing else."""
    text = yaml.safe_dump(doc) if not raw else str(doc)
    text = text[:where] + noise + text[where:]
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg and len(msg) < 500
        return
    assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoint_bytes_give_checkpoint_or_checkpoint_error(good_ckpt, tmp_path,
                                                                      data) -> None:
    raw = bytearray(good_ckpt.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip-header", "flip-any", "cut", "splice"]))
        if op == "cut":
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        elif op == "splice":
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = data.draw(st.binary(max_size=16))
        elif raw:
            hi = min(len(raw), n + 8) if op == "flip-header" else len(raw)
            at = data.draw(st.integers(0, max(hi - 1, 0)))
            raw[at] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        ckpt = load_checkpoint(path, training_state=data.draw(st.booleans()))
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert all(np.isfinite(p).all() for p in ckpt.params.values())


def test_model_too_big_for_memory_is_one_line(shared, tmp_path) -> None:
    cfg = write_config(tmp_path / "c.yaml", config_dict(shared["corpus"], tmp_path / "run"))
    line = assert_cli_error(invoke("train", "--config", cfg, "--set",
                                   "model.hidden_size=1000000000"), "out of memory")
    assert "model.hidden_size" in line
