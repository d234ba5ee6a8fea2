"""`charrnn train` with a fault injected on one MPI rank, for tests/test_mpi_faults.py:

    mpiexec -n N python tests/mpi_fault.py KIND RANK STEP -- train --config ...

On rank RANK only, when its training step STEP (counted from 1 in this process, one
thread group a step: CHARRNN_THREADS=1) starts, KIND happens:

    error   a CharRNNError (DataError) found on this rank alone: bad input it alone sees
    crash   a RuntimeError: a bug on this rank alone (a traceback)
    kill    SIGKILL to itself: the rank dies, no Python code runs
    term    SIGTERM to itself: a stop request that only this rank receives
"""

from __future__ import annotations

import os
import signal
import sys


def _rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def main() -> None:
    kind, rank, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert sys.argv[4] == "--"
    if _rank() == rank:
        from charrnn.errors import DataError
        from charrnn.model import CharRNN

        original = CharRNN._group_loss_and_grads
        calls = [0]

        def faulty(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                if kind == "error":
                    raise DataError(f"injected: bad input that only rank {rank} sees")
                if kind == "crash":
                    raise RuntimeError(f"injected: a bug on rank {rank}")
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)

        CharRNN._group_loss_and_grads = faulty
    from charrnn.cli import main as charrnn_main

    sys.argv = ["charrnn", *sys.argv[5:]]
    charrnn_main()


if __name__ == "__main__":
    main()
