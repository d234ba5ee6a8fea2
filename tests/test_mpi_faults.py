"""Faults in an MPI job (charrnn.distributed): one rank's error or death ends the whole job
with one clear message and no rank left hanging; a stop signal, to one rank or to all, is
agreed by every rank and the checkpoint is written once, by rank 0; what a killed job leaves
resumes exactly, with another number of ranks.

Faults are injected on one rank by tests/mpi_fault.py, at a fixed step."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_mpi import (
    CELLS,
    MPIEXEC,
    TIMEOUT,
    Runs,
    assert_same_tensors,
    charrnn_train,
    mpi_env,
    ok,
    timeless_rows,
)
from test_mpi import pytestmark as _mpi_marks

pytestmark = _mpi_marks
FAULT = str(Path(__file__).with_name("mpi_fault.py"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("mpi-faults"))


def faulty_train(runs, name: str, kind: str, rank: int, step: int, max_steps: int = 40):
    """`mpiexec -n 2 charrnn train` with KIND injected on `rank` at `step`."""
    config = runs.config("lstm", *CELLS["lstm"])
    run_dir = runs.root / name
    return run_dir, charrnn_train(
        config, run_dir, ranks=2, sets=(f"train.max_steps={max_steps}",), cache=runs.cache,
        prefix=(FAULT, kind, str(rank), str(step), "--"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("rank", [1, 0])
def test_an_error_on_one_rank_ends_the_job_with_one_message(runs, rank) -> None:
    """Bad input that one rank alone finds (a CharRNNError at step 15): exit 2, one line
    naming the rank and the problem, and the job over in seconds, not hanging in the
    other rank's next collective."""
    start = time.monotonic()
    run_dir, r = faulty_train(runs, f"error-{rank}", "error", rank, 15)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert f"rank {rank} of 2" in lines[0] and f"only rank {rank} sees" in lines[0]
    assert time.monotonic() - start < TIMEOUT / 2
    assert (run_dir / "ckpt-00000010.safetensors").is_file()


def test_a_crash_on_one_rank_ends_the_job_with_its_traceback(runs) -> None:
    _, r = faulty_train(runs, "crash", "crash", 1, 15)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" in r.stderr and "RuntimeError: injected: a bug on rank 1" in r.stderr
    assert len(error_lines(r.stderr)) == 1


def test_sigkill_of_one_rank_ends_the_job_and_the_checkpoint_resumes_with_any_n(runs) -> None:
    """Rank 1 is SIGKILLed at step 25: the job ends (non-zero); its last checkpoint (step 20)
    resumes in one process to step 40, bit for bit the straight run."""
    run_dir, r = faulty_train(runs, "killed", "kill", 1, 25)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == [
        "ckpt-00000010.safetensors", "ckpt-00000020.safetensors"]
    config = runs.config("lstm", *CELLS["lstm"])
    straight = runs.run("lstm-1x2-40", config, threads=2, sets=("train.max_steps=40",))
    ok(charrnn_train(config, run_dir, threads=2, sets=("train.max_steps=40",), resume=True,
                     cache=runs.cache))
    for name in ("ckpt-00000030.safetensors", "ckpt-00000040.safetensors"):
        assert_same_tensors(straight / name, run_dir / name)
    assert timeless_rows(straight) == timeless_rows(run_dir)


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(runs) -> None:
    """SIGTERM reaches rank 1 alone during step 15: the ranks agree on it in that step's
    reduction, rank 0 writes the step-15 checkpoint once, every rank exits 143; the
    checkpoint resumes on 2 ranks to the straight run's step 40, bit for bit."""
    run_dir, r = faulty_train(runs, "termed", "term", 1, 15)
    assert r.returncode == 143, (r.stdout, r.stderr)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "SIGTERM: stopped at step 15" in lines[0], r.stderr
    assert (run_dir / "ckpt-00000015.safetensors").is_file()
    config = runs.config("lstm", *CELLS["lstm"])
    straight = runs.run("lstm-1x2-40", config, threads=2, sets=("train.max_steps=40",))
    ok(charrnn_train(config, run_dir, ranks=2, sets=("train.max_steps=40",), resume=True,
                     cache=runs.cache))
    assert_same_tensors(straight / "ckpt-00000040.safetensors",
                        run_dir / "ckpt-00000040.safetensors")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_to_mpiexec_reaches_every_rank(runs, sig, code) -> None:
    """Ctrl-C or SIGTERM to mpiexec (which passes it to every rank) once the first
    checkpoint is on disk: one message, one checkpoint of the last step, exit 130 / 143."""
    config = runs.config("lstm", *CELLS["lstm"])
    run_dir = runs.root / f"signal-{sig.name}"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "charrnn.cli", "train", "--config",
           str(config), "--set", f"output.dir={run_dir}", "--set", "train.max_steps=100000",
           "--no-progress", "--overwrite"]
    p = subprocess.Popen(cmd, env=mpi_env(1, runs.cache), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list(run_dir.glob("ckpt-*.safetensors")):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        p.send_signal(sig)
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, (out, err)
    lines = error_lines(err)
    assert len(lines) == 1 and "stopped at step" in lines[0], err
    step = int(lines[0].split("stopped at step ")[1].split(",")[0])
    assert (run_dir / f"ckpt-{step:08d}.safetensors").is_file()
    assert err.count("stopped at step") == 1
