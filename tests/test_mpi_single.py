"""charrnn.distributed without an MPI job: nothing changes, mpi4py is never imported; and the
pieces that need no launcher (the batch split, a rank's windows, the refusals)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import charrnn.distributed as distributed
from charrnn import blas
from charrnn.data import WindowStream
from charrnn.errors import ConfigError, MissingExtraError

NO_MPI_ENV = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARS}


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**NO_MPI_ENV, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def fresh_world(monkeypatch):
    """world() asked anew (it is cached per process), the launcher's variables cleared."""
    monkeypatch.setattr(distributed, "_WORLD", distributed._UNSET)
    for var in distributed.LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


def test_outside_mpiexec_there_is_no_world_and_mpi4py_is_not_imported() -> None:
    r = _python("import sys, charrnn.cli, charrnn.train\n"
                "from charrnn.distributed import world, rank_trainer\n"
                "assert world() is None and rank_trainer(4, 'ordered') is None\n"
                "assert 'mpi4py' not in sys.modules, 'imported'\n")
    assert r.returncode == 0, r.stderr


def test_a_job_of_one_process_is_no_world_either() -> None:
    """`mpiexec -n 1`: the launcher's variables say size 1, so MPI is not even loaded."""
    r = _python("import sys\nfrom charrnn.distributed import world\n"
                "assert world() is None and 'mpi4py' not in sys.modules\n",
                PMI_RANK="0", PMI_SIZE="1", MPI_LOCALNRANKS="1")
    assert r.returncode == 0, r.stderr


def test_several_ranks_without_mpi4py_are_refused(fresh_world, monkeypatch) -> None:
    """Every rank would otherwise train a model of its own, into the same output.dir."""
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    with pytest.raises(MissingExtraError, match=r'one of 2 processes.*charrnn\[mpi\]'):
        distributed.world()


def test_without_mpi4py_rank_zero_alone_reports(tmp_path) -> None:
    """The CLI under a 2-rank launch without mpi4py: rank 0 one line, exit 2; rank 1 exits 2
    without a word."""
    code = ("import sys\nsys.modules['mpi4py'] = None\nfrom charrnn.cli import main\n"
            "sys.argv = ['charrnn', 'train', '--config', 'missing.yaml']\nmain()\n")
    for rank, lines in (("0", 1), ("1", 0)):
        r = _python(code, PMI_SIZE="2", PMI_RANK=rank)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == lines, r.stderr
        if lines:
            assert 'pip install "charrnn[mpi]"' in r.stderr


@pytest.mark.parametrize("batch, ranks, near", [(5, 2, [4, 6]), (3, 4, [4]), (30, 8, [24, 32])])
def test_a_batch_the_ranks_do_not_divide_is_refused_naming_the_nearest(batch, ranks,
                                                                       near) -> None:
    assert distributed.nearest_batch_sizes(batch, ranks) == near
    with pytest.raises(ConfigError) as e:
        distributed.check_batch_size(batch, ranks)
    msg = str(e.value)
    assert "\n" not in msg and f"train.batch_size={batch}" in msg and f"{ranks} MPI ranks" in msg
    assert " or ".join(map(str, near)) in msg
    assert distributed.is_collective(e.value)  # every rank finds it: rank 0 reports it
    distributed.check_batch_size(near[-1], ranks)


def _model_and_window(cell: str, B: int = 8, T: int = 6):
    from charrnn.model import CharRNN, ModelShape

    shape = ModelShape(cell, 13, hidden_size=7, num_layers=2, embedding_size=5, dropout=0.3,
                       weight_drop=0.4)
    model = CharRNN.create(shape, seed=3, dtype="float32")
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 13, (T, B)), rng.integers(0, 13, (T, B))
    state = [tuple(rng.standard_normal((B, 7)).astype(np.float32)
                   for _ in range(model.cell.num_states)) for _ in range(2)]
    return model, x, y, state, model.dropout_masks(rng, B), model.weight_drop_masks(rng)


@pytest.mark.skipif(not blas.controllable(), reason="without BLAS control, one thread group")
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_summed_in_order_are_the_thread_groups_bit_for_bit(monkeypatch, cell,
                                                                 ranks) -> None:
    """What `train.reduce: ordered` computes, without MPI: each rank's block of streams
    (CharRNN.summed_groups, one thread, the whole batch's denominator), summed in rank order,
    then the weight-drop mask, is CharRNN.loss_and_grads on `ranks` thread groups: the same
    loss, gradients and states, bit for bit."""
    model, x, y, state, masks, wmasks = _model_and_window(cell)
    T, B = x.shape
    monkeypatch.setenv("CHARRNN_THREADS", str(ranks))
    loss, grads, new_state = model.loss_and_grads(x, y, state, masks, weight_masks=wmasks)
    monkeypatch.setenv("CHARRNN_THREADS", "1")
    n = B // ranks
    parts = []
    for r in range(ranks):
        cols = slice(r * n, (r + 1) * n)
        parts.append(model.summed_groups(
            np.ascontiguousarray(x[:, cols]), np.ascontiguousarray(y[:, cols]),
            [tuple(s[cols].copy() for s in layer) for layer in state],
            [m[cols] for m in masks], None, wmasks, T * B, single_blas=True))
    total, summed = parts[0][0], {k: g.copy() for k, g in parts[0][1].items()}
    for other in parts[1:]:
        total += other[0]
        for k, g in summed.items():
            g += other[1][k]
    for k, M in enumerate(parts[0][3]):
        summed[f"rnn.weight_hh_l{k}"] *= M
    assert total == loss
    assert list(summed) == list(grads)  # the order the global norm is summed in
    for k in grads:
        assert np.array_equal(summed[k], grads[k]), k
    for layer, *rank_layers in zip(new_state, *(p[2] for p in parts)):
        for i, s in enumerate(layer):
            assert np.array_equal(s, np.concatenate([rl[i] for rl in rank_layers]))


def test_a_rank_hands_out_its_columns_of_every_window() -> None:
    ids = np.arange(1000) % 37
    whole = WindowStream(ids, 8, 5)
    parts = [WindowStream(ids, 8, 5, columns=slice(r * 2, r * 2 + 2)) for r in range(4)]
    for _ in range(len(whole) + 3):  # past an epoch's end
        x, y, new = whole.next_window()
        for r, part in enumerate(parts):
            px, py, pnew = part.next_window()
            np.testing.assert_array_equal(px, x[:, 2 * r : 2 * r + 2])
            np.testing.assert_array_equal(py, y[:, 2 * r : 2 * r + 2])
            assert pnew == new and part.state_dict() == whole.state_dict()
