"""Data-parallel training over MPI (charrnn.distributed): `mpiexec -n N charrnn train` against
one process with CHARRNN_THREADS=N, compared tensor by tensor and row by row.

Every run is a subprocess on a tiny model (a few thousand parameters, 20-40 steps). The runs
shared by several tests are made once per module. Skipped without mpi4py or mpiexec
(`pip install "charrnn[mpi]"`); `pytest -m mpi` runs these alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import small_text, tiny_config_dict
from test_reliability import assert_same_tensors, tensors_of, timeless_rows

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
HAVE_MPI = importlib.util.find_spec("mpi4py") is not None and MPIEXEC is not None
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not HAVE_MPI, reason='needs mpi4py and mpiexec: pip install "charrnn[mpi]"'),
]

# the launcher's settings for running as root and for more ranks than cores: MPICH's hydra
# needs none (it waits politely only through CHARRNN_MPI_WAIT, which charrnn sets itself when
# oversubscribed); Open MPI's mpirun refuses both without these
LAUNCHER_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "CHARRNN_MPI_FAIL_TIMEOUT": "2",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
TIMEOUT = 300

MODEL = {"cell": "lstm", "hidden_size": 16, "num_layers": 2, "embedding_size": 8,
         "dropout": 0.2}
TRAIN = {"reduce": "ordered", "max_steps": 20, "eval_every": 10, "log_every": 5}
# per cell: dropout everywhere; rnn on one-hot input; gru with every random draw the
# trainer makes (state resets, weight drop, input dropout), the moving average, and a random
# offset per epoch (64 streams: an epoch of this corpus is 13 windows, so 20 steps cross one)
CELLS = {
    "rnn": ({"cell": "rnn", "embedding_size": 0}, {}),
    "lstm": ({}, {}),
    "gru": ({"cell": "gru", "weight_drop": 0.3, "input_dropout": 0.1},
            {"reset_prob": 0.2, "ema": 0.9, "random_offset": True, "batch_size": 64}),
}


def mpi_env(threads: int, cache: Path) -> dict[str, str]:
    return {**os.environ, **LAUNCHER_ENV, "CHARRNN_THREADS": str(threads),
            "CHARRNN_CACHE_DIR": str(cache)}


def charrnn_train(config: Path, run_dir: Path, *, ranks: int = 0, threads: int = 1,
                  sets: tuple[str, ...] = (), resume: bool = False, cache: Path,
                  prefix: tuple[str, ...] = ("-m", "charrnn.cli")) -> subprocess.CompletedProcess:
    """`charrnn train` in one process (ranks=0) or under `mpiexec -n ranks`."""
    cmd = [sys.executable, *prefix, "train", "--config", str(config),
           "--set", f"output.dir={run_dir}", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    cmd += ["--resume"] if resume else ["--overwrite"]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, env=mpi_env(threads, cache), capture_output=True, text=True,
                          timeout=TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def assert_same_runs(a: Path, b: Path) -> None:
    """Every checkpoint of `a` in `b`, every tensor bit for bit; the same metrics rows."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        assert_same_tensors(a / name, b / name)
    assert timeless_rows(a) == timeless_rows(b)


class Runs:
    """The module's corpus, configs and runs, each made once."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.corpus = root / "corpus.txt"
        self.corpus.write_text(small_text(), encoding="utf-8")
        self.done: dict[str, Path] = {}

    def config(self, name: str, model: dict | None = None, train: dict | None = None) -> Path:
        d = tiny_config_dict(self.corpus, self.root / "unused",
                             model={**MODEL, **(model or {})}, train={**TRAIN, **(train or {})})
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
        return path

    def run(self, key: str, config: Path, **kwargs) -> Path:
        """The run directory of `charrnn train` with these arguments, trained once."""
        if key not in self.done:
            run_dir = self.root / key
            ok(charrnn_train(config, run_dir, cache=self.cache, **kwargs))
            self.done[key] = run_dir
        return self.done[key]

    def copy(self, run_dir: Path, name: str) -> Path:
        dest = self.root / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(run_dir, dest)
        return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("mpi"))


# -- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", list(CELLS))
def test_two_ranks_ordered_equal_two_threads_bit_for_bit(runs, cell) -> None:
    """`mpiexec -n 2` with CHARRNN_THREADS=1 and train.reduce=ordered: the weights, Adam's
    moments, the carried states (gathered from both ranks), the EMA and every metrics row
    (losses, gradient norms, validation split across the ranks) of one process with
    CHARRNN_THREADS=2, at every checkpoint."""
    model, train = CELLS[cell]
    config = runs.config(cell, model, train)
    one = runs.run(f"{cell}-1x2", config, threads=2)
    two = runs.run(f"{cell}-2x1", config, ranks=2, threads=1)
    assert_same_runs(one, two)
    assert "state.l1.h" in tensors_of(two / "ckpt-00000020.safetensors")


def test_four_ranks_ordered_equal_four_threads_oversubscribed(runs) -> None:
    """4 ranks on this machine's 2 cores (oversubscribed: ranks wait by sleeping)."""
    config = runs.config("four", {"cell": "gru", "weight_drop": 0.2},
                         {"batch_size": 8, "dtype": "float64", "reset_prob": 0.2})
    one = runs.run("four-1x4", config, threads=4)
    four = runs.run("four-4x1", config, ranks=4, threads=1)
    assert_same_runs(one, four)


def test_allreduce_agrees_to_rounding(runs) -> None:
    """The default train.reduce=allreduce, MPI's own order of summation: float64 weights and
    moments within rtol 1e-10 of the one-process run's, losses likewise."""
    config = runs.config("four", {"cell": "gru", "weight_drop": 0.2},
                         {"batch_size": 8, "dtype": "float64", "reset_prob": 0.2})
    one = runs.run("four-1x4", config, threads=4)
    reduced = runs.run("four-4x1-allreduce", config, ranks=4, threads=1,
                       sets=("train.reduce=allreduce",))
    name = "ckpt-00000020.safetensors"
    ta, tb = tensors_of(one / name), tensors_of(reduced / name)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], rtol=1e-10, atol=1e-14, err_msg=k)
    ra, rb = timeless_rows(one), timeless_rows(reduced)
    assert [r.keys() for r in ra] == [r.keys() for r in rb]
    for x, y in zip(ra, rb):
        for k in ("train_loss", "val_loss", "grad_norm"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-10), k


# -- resume with another number of ranks ----------------------------------------------------


@pytest.mark.parametrize("first, second", [(2, 0), (0, 2)], ids=["2-ranks-then-1", "1-then-2"])
def test_resume_with_another_number_of_ranks_is_exact(runs, first, second) -> None:
    """20 steps on 2 ranks, then --resume to 40 in one process (and the other way round):
    bit for bit the 40 steps of one straight run."""
    config = runs.config("lstm", *CELLS["lstm"])
    straight = runs.run("lstm-1x2-40", config, threads=2, sets=("train.max_steps=40",))
    half = runs.run("lstm-2x1" if first else "lstm-1x2", config, ranks=first,
                    threads=1 if first else 2)
    resumed = runs.copy(half, f"resume-{first}-{second}")
    ok(charrnn_train(config, resumed, ranks=second, threads=1 if second else 2,
                     sets=("train.max_steps=40",), resume=True, cache=runs.cache))
    for name in ("ckpt-00000030.safetensors", "ckpt-00000040.safetensors", "best.safetensors"):
        assert_same_tensors(straight / name, resumed / name)
    assert timeless_rows(straight) == timeless_rows(resumed)


# -- refusals and the user's path ------------------------------------------------------------


def test_batch_size_that_the_ranks_do_not_divide_is_refused_before_any_work(runs) -> None:
    config = runs.config("lstm", *CELLS["lstm"])
    run_dir = runs.root / "refused"
    r = charrnn_train(config, run_dir, ranks=2, sets=("train.batch_size=5",), cache=runs.cache)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # rank 0 alone reports
    assert "train.batch_size=5" in lines[0] and "2 MPI ranks" in lines[0]
    assert "4 or 6" in lines[0]
    assert not run_dir.exists()  # nothing was done


def test_rank_zero_alone_writes_and_reports(runs) -> None:
    """One banner naming the ranks, one summary, one line per evaluation; metrics.jsonl has
    each row once."""
    config = runs.config("lstm", *CELLS["lstm"])
    run_dir = runs.root / "report"
    r = ok(charrnn_train(config, run_dir, ranks=2, cache=runs.cache))
    assert r.stderr.count("charrnn: lstm") == 1 and "2 MPI ranks x 1 thread(s)" in r.stderr
    assert r.stderr.count("step 20/20") == 1
    assert r.stdout.count("trained 20 steps") == 1
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [5, 10, 10, 15, 20, 20]


def test_a_time_budget_is_decided_by_rank_zero(runs) -> None:
    """train.max_minutes: rank 0's clock plans the steps and says when time is up; every
    rank follows, so the job ends together (no rank waits in a collective for ever) at the
    step rank 0 reports, with its final checkpoint."""
    config = runs.config("lstm", *CELLS["lstm"])
    run_dir = runs.root / "budget"
    r = ok(charrnn_train(config, run_dir, ranks=2, cache=runs.cache,
                         sets=("train.max_minutes=0.04", "train.max_steps=1000000")))
    assert r.stderr.count("time budget") == 1, r.stderr
    steps = int(r.stdout.split("trained ")[1].split(" steps")[0])
    assert (run_dir / f"ckpt-{steps:08d}.safetensors").is_file()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps


def test_bench_script_runs_on_a_tiny_model(runs, tmp_path) -> None:
    """scripts/bench_mpi.py, its table for 1 process x 2 threads and 2 ranks x 1 thread."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_mpi.py"
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(script), "--hidden", "16", "--layers", "1", "--batch", "4",
         "--seq", "8", "--steps", "2", "--warmup", "1", "--layouts", "1x2,2x1",
         "--corpus", str(runs.corpus), "--json", str(out)],
        env=mpi_env(1, runs.cache), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rows = json.loads(out.read_text())["rows"]
    assert [(row["ranks"], row["threads"]) for row in rows] == [(1, 2), (2, 1)]
    assert all(row["steps_per_sec"] > 0 for row in rows)
    assert rows[0]["allreduce_ms"] == 0 and rows[1]["allreduce_ms"] > 0
    assert "| 2 ranks x 1 thread |" in r.stdout
