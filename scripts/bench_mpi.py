"""Scaling of data-parallel training over MPI on this machine: steps/s of one process with
threads against N ranks, and the time each step spends in the gradient reduction.

    pip install -e ".[mpi]"
    python scripts/bench_mpi.py                            # lstm-512, batch 64 x seq 100:
                                                           # 1x2, 2x1 and 4x1 (oversubscribed)
    python scripts/bench_mpi.py --layouts 1x2,2x1 --steps 30 --json bench-mpi.json

A layout RxT is R ranks of T threads each (CHARRNN_THREADS=T); R=1 is one process without
MPI. Each layout trains in its own job (`mpiexec -n R python scripts/bench_mpi.py --worker`)
on the same windows: `--warmup` steps, then `--steps` timed ones, each step the trainer's
(forward and backward of the rank's streams, the reduction, global-norm clipping, Adam).
Stdout gets a markdown table; progress goes to stderr. Run it on a quiet machine.

Columns:
- steps/s, chars/s: the timed steps (batch x seq chars each), the slowest rank's clock.
- reduce ms/step: rank 0's time inside the reduction per step (copy into the flat buffer,
  the Allreduce or Allgather, the ordered sum): the transfer, and the wait for the slowest
  rank (load imbalance; on an oversubscribed machine, time slices).
- allreduce ms: the Allreduce of the same buffer alone, the ranks lined up first by a
  barrier (the median of 20): what the network (here shared memory) costs.
- compute ms/step: a step minus its reduction (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65  # tiny-shakespeare's; a synthetic corpus of that many symbols by default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="lstm", choices=["rnn", "lstm", "gru"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embedding", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="global batch (streams)")
    p.add_argument("--seq", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--reduce", default="allreduce", choices=["allreduce", "ordered"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layouts", default="1x2,2x1,4x1",
                   help="comma-separated RANKSxTHREADS, e.g. 1x2,2x1,4x1")
    p.add_argument("--corpus", default=None,
                   help="a text file to train on (default: random symbols, vocab 65)")
    p.add_argument("--mpiexec", default=None,
                   help="the launcher (default: mpiexec beside this Python, else on PATH)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON output path
    return p.parse_args(argv)


# -- the worker: one layout, under mpiexec or alone --------------------------------------------


def _ids(args) -> tuple[np.ndarray, int]:
    need = args.batch * (args.seq * (args.warmup + args.steps + 2) + 1)
    if args.corpus:
        from charrnn.vocab import Vocab

        text = Path(args.corpus).read_text(encoding="utf-8")
        vocab = Vocab.build([text])
        ids, _ = vocab.encode(text)
        reps = -(-need // len(ids))
        return np.tile(ids, reps)[:need], vocab.size
    return np.random.default_rng(0).integers(0, VOCAB, need).astype(np.uint8), VOCAB


def worker(args) -> None:
    from charrnn.data import WindowStream
    from charrnn.distributed import rank_trainer
    from charrnn.model import CharRNN, ModelShape
    from charrnn.optim import Optimizer, clip_by_global_norm_
    from charrnn.parallel import stream_groups

    dist = rank_trainer(args.batch, args.reduce)
    ids, vocab = _ids(args)
    shape = ModelShape(args.cell, vocab, args.hidden, args.layers, args.embedding)
    model = CharRNN.create(shape, seed=1, dtype=args.dtype)
    opt = Optimizer("adam", model.params)
    cols = None if dist is None else dist.cols
    stream = WindowStream(ids, args.batch, args.seq, columns=cols)
    local = args.batch if dist is None else dist.local_batch
    state = model.zero_state(local)

    def step():
        nonlocal state
        x, y, _ = stream.next_window()
        if dist is None:
            loss, grads, state = model.loss_and_grads(x, y, state)
        else:
            loss, grads, state = dist.loss_and_grads(model, x, y, state)
        clip_by_global_norm_(grads, 5.0)
        opt.step(model.params, grads, 2e-3)
        return loss

    for _ in range(args.warmup):
        step()
    if dist is not None:
        dist.w.comm.Barrier()
        dist.reducer.seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    took = time.perf_counter() - t0
    reduce_s = 0.0 if dist is None else dist.reducer.seconds
    alone = []
    if dist is not None:
        w, flat = dist.w, dist.reducer.flat
        took = w.comm.allreduce(took, op=w.MPI.MAX)  # the slowest rank's clock
        for _ in range(20):
            w.comm.Barrier()
            t = time.perf_counter()
            w.wait([w.comm.Iallreduce(w.MPI.IN_PLACE, flat)])  # as the steps wait
            alone.append(time.perf_counter() - t)
        if not w.is_root:
            return
    ranks = 1 if dist is None else dist.w.size
    row = {
        "ranks": ranks,
        "threads": len(stream_groups(local)),
        "steps_per_sec": args.steps / took,
        "chars_per_sec": args.steps * args.batch * args.seq / took,
        "ms_per_step": 1e3 * took / args.steps,
        "allreduce_ms": 1e3 * reduce_s / args.steps,
        "allreduce_alone_ms": 1e3 * float(np.median(alone)) if alone else 0.0,
        "compute_ms": 1e3 * (took - reduce_s) / args.steps,
        "grad_bytes": int(sum(p.nbytes for p in model.params.values())),
        "params": int(sum(p.size for p in model.params.values())),
    }
    Path(args.worker).write_text(json.dumps(row))


# -- the driver: every layout in its own job ---------------------------------------------------


def _layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        r, _, t = item.strip().partition("x")
        out.append((int(r), int(t or 1)))
    return out


def _mpiexec() -> str:
    """mpiexec beside this Python (the mpich wheel puts it in the venv), else on PATH."""
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"


def run_layout(args, ranks: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out)]
        for k in ("cell", "hidden", "layers", "embedding", "batch", "seq", "dtype", "reduce",
                  "steps", "warmup", "corpus"):
            v = getattr(args, k)
            if v is not None:
                cmd += [f"--{k}", str(v)]
        if ranks > 1:
            cmd = [args.mpiexec or _mpiexec(), "-n", str(ranks), *cmd]
        env = {**os.environ, "CHARRNN_THREADS": str(threads),
               # as root, and with more ranks than cores, Open MPI needs these (MPICH: none)
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_rmaps_base_oversubscribe": "1"}
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def table(rows: list[dict], args) -> str:
    base = rows[0]["steps_per_sec"] if rows else 1.0
    lines = [
        f"{args.cell}-{args.hidden} x{args.layers}, batch {args.batch} x seq {args.seq}, "
        f"{args.dtype}, reduce={args.reduce}; {rows[0]['params']:,} parameters, "
        f"{rows[0]['grad_bytes'] / 1e6:.1f} MB of gradients a step; {args.steps} timed steps",
        "",
        "| layout | steps/s | chars/s | ms/step | compute ms/step | reduce ms/step "
        "| allreduce alone ms | vs first |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        threads = f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}"
        who = f"{r['ranks']} ranks x {threads}" if r["ranks"] > 1 else f"1 process x {threads}"
        lines.append(
            f"| {who} | {r['steps_per_sec']:.3f} | {r['chars_per_sec']:,.0f} | "
            f"{r['ms_per_step']:.1f} | {r['compute_ms']:.1f} | {r['allreduce_ms']:.2f} | "
            f"{r['allreduce_alone_ms']:.3f} | {r['steps_per_sec'] / base:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows = []
    for ranks, threads in _layouts(args.layouts):
        print(f"bench_mpi: {ranks} rank(s) x {threads} thread(s) ...", file=sys.stderr,
              flush=True)
        rows.append(run_layout(args, ranks, threads))
    print(table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
