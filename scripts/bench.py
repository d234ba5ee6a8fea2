"""Benchmark charrnn against an identical PyTorch model on the CPU.

How to run (from the repository root; PyTorch is a benchmark-only dependency, never a
runtime or test dependency of charrnn):

    pip install -e ".[bench]"                 # torch==2.13.0, the CPU build
    python scripts/bench.py --quick           # everything in under 2 minutes
    python scripts/bench.py                   # the full run, about 10 minutes
    python scripts/bench.py --configs lstm-512,gru-512 --json bench.json
    python scripts/bench.py --quick --profile # adds where charrnn's training step goes

Stdout gets markdown tables (they paste into the README) and a PASS/FAIL summary of the
targets; progress goes to stderr. Run it on a quiet machine: nothing else should compete
for the cores (never run two benchmarks at once).

What is measured, for each config (vocab 65, embedding 64, Adam lr 2e-3, clip 5):

    small-rnn   rnn  x1 x256, batch 32 x seq 64
    lstm-256    lstm x2 x256, batch 32 x seq 64
    lstm-512    lstm x2 x512, batch 64 x seq 100
    gru-512     gru  x2 x512, batch 64 x seq 100

* Training: charrnn and a PyTorch model (nn.Embedding -> nn.RNN(tanh)/LSTM/GRU ->
  nn.Linear, modules named embedding/rnn/head so that charrnn's parameters load into it
  through the CONTRACT tensor names: same sizes, same initial weights) train with the
  same optimizer (Adam, global-norm clip 5) on the same windows of the same data
  (charrnn.data.WindowStream; truncated BPTT, the state carried and detached). After a
  warm-up of each, timed blocks alternate, charrnn then PyTorch, `reps` times; chars/s is
  the median over a framework's blocks. The training losses of the first steps of both
  are compared, as a check that the two really compute the same thing.
* GFLOP/s: training FLOPs counted analytically per character, 3x the forward's
  (the backward costs about 2x the forward: input and weight gradients). Per layer the
  forward is 2 (I G H + H G H) with G gates and I its input width, the head 2 H V: the
  model's FLOPs as PyTorch computes them, for both frameworks (charrnn skips layer 0's
  input GEMM, a row gather from a (vocab x gates) table: about 1% of lstm-512's FLOPs, so
  its figure slightly overstates the arithmetic it does). The GEMM peak is the best of a
  few float32 2048 x 2048 x 2048 np.matmul in the same run.
* Peak memory: each framework trains each config alone in a child process
  (`bench.py --child charrnn|torch`), which loads its imports and the data, builds the
  initial weights, returns freed heap to the OS (glibc malloc_trim), takes its resident
  size (VmRSS), resets the kernel's high-water mark (writing 5 to /proc/self/clear_refs;
  without it ru_maxrss is used), builds its model and optimizer from those weights,
  trains a few steps (10; 2 with --quick), and reports
  VmHWM minus that baseline: the peak RSS growth due to training (weights, gradients,
  optimizer moments, activations, library workspaces). The two children of a config run
  at the same time (memory does not depend on speed). charrnn's peak is reached in the
  first step; PyTorch's creeps up for a few steps more (its allocator), so --quick
  understates it a little.
* Evaluation: forward only over the corpus's last characters in windows of batch 64 x
  seq 256 with the state carried (charrnn.evaluate.score; PyTorch under
  torch.inference_mode() with the same windows), both from the same initial weights;
  their bits per char are compared as a check.
* Sampling: chars/s generating at temperature 1 with one stream and with 32 streams at
  once (charrnn.sample.generate; PyTorch: a loop of one model step, softmax and
  torch.multinomial under torch.inference_mode()).
* --profile adds where charrnn's training step goes: the whole step (split over the
  threads, then clip and Adam), and what one thread does in it, timed alone: forward, loss
  and backward of its group of streams; of those, the recurrent loops (each step's packed
  GEMM and gate arithmetic), next to those loops' GEMMs alone; the rest is window-wide
  work (input projections, the head, weight gradients).

Both frameworks use all the cores this process may run on: torch.set_num_threads(cores);
charrnn splits each batch's streams over one thread per core (charrnn.parallel), each
calling BLAS single-threaded, and samples with numpy's BLAS at its default (every core).
Set CHARRNN_ACCEL=0 to measure charrnn's pure-numpy path instead of its compiled loops.
--isa avx2 emulates an AVX2-only CPU on an AVX-512 one, for both frameworks: charrnn's
avx2 GEMM and elementwise kernels, numpy's OpenBLAS as Haswell, and PyTorch's oneDNN, MKL
and ATen kernels capped at AVX2 (the bench re-runs itself with their variables set).
PyTorch runs with its defaults (oneDNN on);
--no-mkldnn turns oneDNN off, for comparison. Each timed block starts after a 0.2 s
pause, so that the threads of the framework that ran last have stopped spinning. The data
is ../shared/data/tinyshakespeare.txt relative to the repository, or --data PATH; when
absent, random text of 65 symbols.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

import numpy as np
import threadpoolctl

import charrnn
from charrnn import blas, cells
from charrnn.cells import accelerated, pack_panels
from charrnn.data import WindowStream
from charrnn.evaluate import EVAL_BATCH, EVAL_SEQ, score
from charrnn.model import CharRNN, ModelShape, cross_entropy_
from charrnn.optim import Optimizer, clip_by_global_norm_
from charrnn.parallel import available_cores, stream_groups
from charrnn.sample import generate
from charrnn.vocab import Vocab

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SYNTH_VOCAB, SYNTH_CHARS = 65, 1_115_394  # tiny-shakespeare's size, when it is absent

EMBEDDING, LR, CLIP, INIT_SEED = 64, 2e-3, 5.0, 1234
GEMM_N = 2048
SAMPLE_STREAMS = (1, 32)


@dataclass(frozen=True)
class Config:
    name: str
    cell: str
    layers: int
    hidden: int
    batch: int
    seq: int

    def shape(self, vocab: int) -> ModelShape:
        return ModelShape(self.cell, vocab, self.hidden, self.layers, EMBEDDING)


CONFIGS = {
    c.name: c
    for c in (
        Config("small-rnn", "rnn", 1, 256, 32, 64),
        Config("lstm-256", "lstm", 2, 256, 32, 64),
        Config("lstm-512", "lstm", 2, 512, 64, 100),
        Config("gru-512", "gru", 2, 512, 64, 100),
    )
}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs: --quick or full."""

    warmup_s: float  # training warm-up per framework (at least warmup_steps)
    warmup_steps: int
    block_s: float  # one timed training block (at least one step)
    reps: int  # timed blocks per framework, alternating
    eval_chars: int  # characters scored per evaluation pass
    eval_reps: int
    sample_s: float  # one timed sampling pass (steps sized from a short warm-up)
    sample_reps: int
    mem_steps: int  # training steps of each memory child


QUICK = Plan(0.3, 1, 0.8, 2, 3 * EVAL_BATCH * EVAL_SEQ + 1, 2, 0.25, 2, 2)
FULL = Plan(3.0, 3, 6.0, 3, 200_000, 2, 2.0, 3, 10)
SAMPLE_WARMUP_STEPS = 20
# Before each timed block: the idle BLAS/OpenMP threads of the framework that ran last
# busy-wait a while (~0.1 s) before they sleep, and would steal a core from the next one.
SETTLE_S = 0.2


START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:5.0f} s] {msg}", file=sys.stderr, flush=True)


# -- machine and data ------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numpy_blas() -> str:
    """charrnn.blas.numpy_blas(), with the kernels that BLAS chose for this CPU (OpenBLAS: its
    core type), as threadpoolctl sees them."""
    arch = next((i.get("architecture") for i in threadpoolctl.threadpool_info()
                 if i.get("user_api") == "blas" and i.get("architecture")), None)
    return f"{blas.numpy_blas()}, {arch} kernels" if arch else blas.numpy_blas()


def charrnn_path() -> str:
    """Which of charrnn's code paths runs: the compiled loops (and their GEMM) or numpy."""
    if not accelerated():
        return "pure numpy"
    return f"compiled loops, {cells.kernels().gemm_name()} GEMM"


def load_data(path: Path | None) -> tuple[np.ndarray, int, str]:
    """Ids of the corpus (N,), vocabulary size, and where it came from."""
    if path is not None:
        text = path.read_text(encoding="utf-8")
        vocab = Vocab.build([text])
        ids, _ = vocab.encode(text)
        return ids, vocab.size, f"{path} ({len(ids):,} chars, vocab {vocab.size})"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SYNTH_VOCAB, SYNTH_CHARS).astype(np.uint8)
    return ids, SYNTH_VOCAB, f"random text ({SYNTH_CHARS:,} chars of {SYNTH_VOCAB} symbols)"


def split_data(ids: np.ndarray, eval_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Training ids and the evaluation tail (the last eval_chars, or a fifth at most)."""
    n_eval = min(eval_chars, len(ids) // 5)
    return ids[:-n_eval], ids[-n_eval:]


def forward_flops_per_char(shape: ModelShape) -> float:
    """The forward pass's FLOPs per character as PyTorch computes it: every layer's input
    and recurrent GEMMs and the head (embedding lookups are free). charrnn's evaluation
    does less: layer 0's input projection is a row gather from a table of V rows."""
    H, V, gates = shape.hidden_size, shape.vocab_size, GATES[shape.cell] * shape.hidden_size
    fwd = 2.0 * H * V
    for k in range(shape.num_layers):
        width = shape.embedding_size if k == 0 else H
        fwd += 2.0 * (width * gates + H * gates)
    return fwd


def train_flops_per_char(shape: ModelShape) -> float:
    """Forward FLOPs per character times 3."""
    return 3.0 * forward_flops_per_char(shape)


def timed(fn: Callable[[], Any], settle: bool = True) -> float:
    """Seconds `fn` takes, after letting the other framework's spinning threads go idle."""
    if settle:
        time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gemm_peak(reps: int = 5) -> dict[str, float]:
    """Best float32 GFLOP/s of an N x N x N matmul, numpy and torch."""
    a = np.random.default_rng(0).standard_normal((GEMM_N, GEMM_N)).astype(np.float32)
    b, c = a.copy(), np.empty_like(a)
    flops = 2.0 * GEMM_N**3
    np.matmul(a, b, out=c)
    best = min(timed(lambda: np.matmul(a, b, out=c), settle=False) for _ in range(reps))
    out = {"numpy_gflops": flops / best / 1e9}
    torch = import_torch()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tc = torch.mm(ta, tb)
    best = min(timed(lambda: torch.mm(ta, tb, out=tc), settle=False) for _ in range(reps))
    out["torch_gflops"] = flops / best / 1e9
    return out


# -- PyTorch ---------------------------------------------------------------------------


USE_MKLDNN = True  # --no-mkldnn turns off PyTorch's oneDNN kernels (torch.backends.mkldnn)


def import_torch():
    import torch

    torch.set_num_threads(available_cores())
    torch.backends.mkldnn.enabled = USE_MKLDNN
    return torch


def torch_model(shape: ModelShape, params: dict[str, np.ndarray]) -> torch.nn.Module:
    """nn.Embedding -> nn.RNN(tanh)/LSTM/GRU -> nn.Linear holding charrnn's weights."""
    torch = import_torch()
    nn = torch.nn

    class TorchCharRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            V, H, E, L = (
                shape.vocab_size,
                shape.hidden_size,
                shape.embedding_size,
                shape.num_layers,
            )
            self.embedding = nn.Embedding(V, E)
            if shape.cell == "rnn":
                self.rnn = nn.RNN(E, H, num_layers=L, nonlinearity="tanh")
            else:
                self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[shape.cell](E, H, num_layers=L)
            self.head = nn.Linear(H, V)

        def forward(self, x, state=None):
            """x (T, B) ids -> logits (T, B, V) and the final state."""
            out, state = self.rnn(self.embedding(x), state)
            return self.head(out), state

    model = TorchCharRNN()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
    return model


def detach(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


# -- training --------------------------------------------------------------------------


@dataclass
class Trainer:
    """One framework training on its own WindowStream; times its two phases."""

    name: str
    chars_per_step: int
    losses: list[float] = field(default_factory=list)
    fwd_bwd_s: float = 0.0  # forward, loss and backward
    update_s: float = 0.0  # clip and optimizer step
    steps: int = 0

    def step(self) -> None:
        raise NotImplementedError

    def reset_timers(self) -> None:
        self.fwd_bwd_s = self.update_s = 0.0
        self.steps = 0


class NumpyTrainer(Trainer):
    def __init__(self, model: CharRNN, ids: np.ndarray, batch: int, seq: int) -> None:
        super().__init__("charrnn", batch * seq)
        self.model = model
        self.stream = WindowStream(ids, batch, seq)
        self.opt = Optimizer("adam", model.params)
        self.state = model.zero_state(batch)

    def step(self) -> None:
        x, y, new_epoch = self.stream.next_window()
        if new_epoch:
            self.state = self.model.zero_state(self.stream.batch_size)
        t0 = time.perf_counter()
        loss, grads, self.state = self.model.loss_and_grads(x, y, self.state)
        t1 = time.perf_counter()
        clip_by_global_norm_(grads, CLIP)
        self.opt.step(self.model.params, grads, LR)
        t2 = time.perf_counter()
        self.fwd_bwd_s += t1 - t0
        self.update_s += t2 - t1
        self.steps += 1
        self.losses.append(loss)


class TorchTrainer(Trainer):
    def __init__(self, model: torch.nn.Module, ids: np.ndarray, batch: int, seq: int) -> None:
        super().__init__("PyTorch", batch * seq)
        self.torch = import_torch()
        self.model = model
        self.stream = WindowStream(ids, batch, seq)
        self.opt = self.torch.optim.Adam(model.parameters(), lr=LR)
        self.state = None

    def step(self) -> None:
        torch = self.torch
        x, y, new_epoch = self.stream.next_window()
        if new_epoch:
            self.state = None
        t0 = time.perf_counter()
        logits, state = self.model(torch.from_numpy(x), self.state)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1)
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        t2 = time.perf_counter()
        self.state = detach(state)
        self.fwd_bwd_s += t1 - t0
        self.update_s += t2 - t1
        self.steps += 1
        self.losses.append(loss.item())


def run_block(trainer: Trainer, seconds: float, min_steps: int = 1) -> tuple[int, float]:
    """Steps until `seconds` have passed (and at least min_steps): (chars, seconds)."""
    time.sleep(SETTLE_S)  # see timed()
    n, t0 = 0, time.perf_counter()
    while True:
        trainer.step()
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= min_steps and elapsed >= seconds:
            return n * trainer.chars_per_step, elapsed


def bench_training(cfg: Config, train_ids: np.ndarray, vocab: int, plan: Plan) -> dict:
    shape = cfg.shape(vocab)
    model = CharRNN.create(shape, INIT_SEED)
    tmodel = torch_model(shape, model.params)
    trainers = [
        NumpyTrainer(model, train_ids, cfg.batch, cfg.seq),
        TorchTrainer(tmodel, train_ids, cfg.batch, cfg.seq),
    ]
    for tr in trainers:
        run_block(tr, plan.warmup_s, plan.warmup_steps)
        tr.reset_timers()
    rates: dict[str, list[float]] = {tr.name: [] for tr in trainers}
    for _ in range(plan.reps):
        for tr in trainers:
            chars, secs = run_block(tr, plan.block_s)
            rates[tr.name].append(chars / secs)
    ours, theirs = (median(rates[tr.name]) for tr in trainers)
    k = min(5, *(len(tr.losses) for tr in trainers))
    loss_diff = max(abs(a - b) for a, b in zip(trainers[0].losses[:k], trainers[1].losses[:k]))
    gflops = train_flops_per_char(shape) * ours / 1e9
    return {
        "params": model.num_params,
        "charrnn_cps": ours,
        "torch_cps": theirs,
        "ratio": ours / theirs,
        "charrnn_gflops": gflops,
        "torch_gflops": train_flops_per_char(shape) * theirs / 1e9,
        "blocks_cps": rates,
        "phases_ms": {
            tr.name: {
                "fwd_bwd": 1e3 * tr.fwd_bwd_s / tr.steps,
                "update": 1e3 * tr.update_s / tr.steps,
            }
            for tr in trainers
        },
        "loss_check_steps": k,
        "loss_check_max_abs_diff": loss_diff,
    }


# -- peak memory, one framework per child process ----------------------------------------


def rss_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def child_train_memory(framework: str, cfg: Config, data: Path | None, steps: int) -> dict:
    """Runs in the child: peak RSS growth of `steps` training steps above the baseline."""
    if framework == "torch":
        import_torch()
    ids, vocab, _ = load_data(data)
    shape = cfg.shape(vocab)
    source = CharRNN.create(shape, INIT_SEED).params  # the initial weights, like the data
    gc.collect()
    try:  # hand freed heap back to the OS, so that reusing it counts as growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    baseline = rss_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        peak_of: Callable[[], int] = lambda: rss_bytes("VmHWM")  # noqa: E731
        method = "VmHWM after clear_refs"
    except OSError:
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
        method = "ru_maxrss"
    trainer: Trainer
    if framework == "torch":
        trainer = TorchTrainer(torch_model(shape, source), ids, cfg.batch, cfg.seq)
    else:
        params = {k: v.copy() for k, v in source.items()}
        trainer = NumpyTrainer(CharRNN(shape, params), ids, cfg.batch, cfg.seq)
    del source
    for _ in range(steps):
        trainer.step()
    return {"baseline_bytes": baseline, "peak_growth_bytes": peak_of() - baseline, "method": method}


def bench_memory(cfg: Config, data: Path | None, steps: int) -> dict:
    """Both children of a config at once: peak memory does not depend on the speed."""
    procs = {}
    for framework in ("charrnn", "torch"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", framework]
        cmd += ["--configs", cfg.name, "--mem-steps", str(steps)]
        cmd += ["--data", str(data) if data is not None else ""]
        cmd += [] if USE_MKLDNN else ["--no-mkldnn"]
        procs[framework] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out: dict[str, Any] = {}
    for framework, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {framework} {cfg.name} failed:\n{stderr}")
        out[framework] = json.loads(stdout.strip().splitlines()[-1])
    mib = 1024 * 1024
    out["charrnn_mib"] = out["charrnn"]["peak_growth_bytes"] / mib
    out["torch_mib"] = out["torch"]["peak_growth_bytes"] / mib
    return out


# -- evaluation --------------------------------------------------------------------------


def torch_score(model: torch.nn.Module, ids: np.ndarray) -> tuple[float, int]:
    """charrnn.evaluate.score's computation in PyTorch, over the same windows."""
    from charrnn.data import eval_windows

    torch = import_torch()
    F = torch.nn.functional
    total, count, state = 0.0, 0, None
    with torch.inference_mode():
        for x, y, mask in eval_windows(ids, EVAL_BATCH, EVAL_SEQ):
            logits, state = model(torch.from_numpy(x), state)
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                torch.from_numpy(y).reshape(-1),
                reduction="none",
            )
            m = torch.from_numpy(mask.reshape(-1))
            total += float(nll[m].sum(dtype=torch.float64))
            count += int(m.sum())
    return total, count


def bench_eval(cfg: Config, eval_ids: np.ndarray, vocab: int, plan: Plan) -> dict:
    shape = cfg.shape(vocab)
    model = CharRNN.create(shape, INIT_SEED)
    tmodel = torch_model(shape, model.params)
    tmodel.eval()
    runs: dict[str, Callable[[np.ndarray], tuple[float, int]]] = {
        "charrnn": lambda ids: score(model, ids, EVAL_BATCH, EVAL_SEQ),
        "PyTorch": lambda ids: torch_score(tmodel, ids),
    }
    warm = eval_ids[: EVAL_BATCH * EVAL_SEQ + 1]
    for run in runs.values():
        run(warm)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    bpc: dict[str, float] = {}
    for _ in range(plan.eval_reps):
        for name, run in runs.items():
            time.sleep(SETTLE_S)  # see timed()
            t0 = time.perf_counter()
            total, count = run(eval_ids)
            rates[name].append(count / (time.perf_counter() - t0))
            bpc[name] = total / count / np.log(2)
    ours, theirs = median(rates["charrnn"]), median(rates["PyTorch"])
    flops = forward_flops_per_char(shape)
    return {
        "chars": len(eval_ids) - 1,
        "charrnn_cps": ours,
        "torch_cps": theirs,
        "ratio": ours / theirs,
        "bpc": bpc,
        "charrnn_gflops": flops * ours / 1e9,  # nominal: PyTorch's FLOPs at charrnn's speed
        "torch_gflops": flops * theirs / 1e9,
    }


# -- sampling ----------------------------------------------------------------------------


def charrnn_sample(model: CharRNN, seed: np.ndarray, steps: int, streams: int) -> None:
    rng = np.random.default_rng(0)
    for _ in generate(model, seed, steps, temperature=1.0, num_samples=streams, rng=rng):
        pass


def torch_sample(model: torch.nn.Module, seed: np.ndarray, steps: int, streams: int) -> None:
    torch = import_torch()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.from_numpy(np.repeat(seed[:, None], streams, axis=1))  # (T, B)
        logits, state = model(x, None)
        logits = logits[-1]  # (B, V)
        for _ in range(steps):
            probs = torch.softmax(logits, dim=-1)  # temperature 1
            ids = torch.multinomial(probs, 1, generator=gen)  # (B, 1)
            logits, state = model(ids.T, state)
            logits = logits[0]


def bench_sampling(cfg: Config, ids: np.ndarray, vocab: int, plan: Plan) -> dict:
    shape = cfg.shape(vocab)
    model = CharRNN.create(shape, INIT_SEED)
    tmodel = torch_model(shape, model.params)
    tmodel.eval()
    seed = ids[:16].astype(np.int64)
    out: dict[str, Any] = {}
    for streams in SAMPLE_STREAMS:
        runs = {
            "charrnn": lambda n, b=streams: charrnn_sample(model, seed, n, b),
            "PyTorch": lambda n, b=streams: torch_sample(tmodel, seed, n, b),
        }
        steps: dict[str, int] = {}  # each framework's steps per pass: about plan.sample_s
        for name, run in runs.items():
            run(SAMPLE_WARMUP_STEPS)
            secs = timed(lambda r=run: r(SAMPLE_WARMUP_STEPS))
            steps[name] = max(SAMPLE_WARMUP_STEPS, int(plan.sample_s / secs * SAMPLE_WARMUP_STEPS))
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(plan.sample_reps):
            for name, run in runs.items():
                n = steps[name]
                rates[name].append(streams * n / timed(lambda r=run, n=n: r(n)))
        ours, theirs = median(rates["charrnn"]), median(rates["PyTorch"])
        out[str(streams)] = {"charrnn_cps": ours, "torch_cps": theirs, "ratio": ours / theirs}
    return out


# -- charrnn's own profile (--profile) ----------------------------------------------------


def _timed(fn: Callable, totals: dict[str, float], key: str) -> Callable:
    """`fn`, its time added to totals[key] at each call."""

    def timed_fn(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0

    return timed_fn


def recurrent_gemms_alone(cfg: Config, vocab: int, streams: int, reps: int = 3) -> dict:
    """The recurrent products of one group's window alone, on random float32 arrays: per
    layer T forward (h @ W_rec.T) and T backward (dpre @ W_hh) products of `streams` rows,
    with the compiled packed GEMM (numpy's without the extension), BLAS single-threaded."""
    H, T, B = cfg.hidden, cfg.seq, streams
    G = GATES[cfg.cell] * H
    rng = np.random.default_rng(0)
    h, d = rng.standard_normal((B, H), np.float32), rng.standard_normal((B, G), np.float32)
    W = rng.standard_normal((G, H), np.float32)
    rec, dh = np.empty((B, G), np.float32), np.empty((B, H), np.float32)
    if accelerated():
        fused = cells.kernels()
        fwd, bwd = pack_panels(W), pack_panels(W.T)

        def run() -> None:
            for _ in range(cfg.layers * T):
                fused.gemm(h, fwd, rec, True)
                fused.gemm(d, bwd, dh, False)
    else:

        def run() -> None:
            for _ in range(cfg.layers * T):
                np.matmul(h, W.T, out=rec)
                np.matmul(d, W, out=dh)

    with blas.single_threaded():
        run()
        secs = min(timed(run, settle=False) for _ in range(reps))
    return {"ms": 1e3 * secs, "gflops": 4.0 * cfg.layers * T * B * G * H / secs / 1e9}


def profile_charrnn(cfg: Config, train_ids: np.ndarray, vocab: int, steps: int) -> dict:
    """Where charrnn's training step goes: the whole step as training runs it (the batch
    split over the threads, then clip and Adam); and what one group's thread does in it,
    timed alone with BLAS single-threaded: forward, loss and backward of its streams, of which
    the recurrent loops, next to those loops' GEMMs alone (recurrent_gemms_alone)."""
    model = CharRNN.create(cfg.shape(vocab), INIT_SEED)
    stream = WindowStream(train_ids, cfg.batch, cfg.seq)
    opt = Optimizer("adam", model.params)
    state = model.zero_state(cfg.batch)
    whole = dict.fromkeys(("loss_and_grads", "clip", "adam"), 0.0)

    def one_step() -> None:
        nonlocal state
        x, y, _ = stream.next_window()
        t = [time.perf_counter()]
        _, grads, state = model.loss_and_grads(x, y, state)
        t.append(time.perf_counter())
        clip_by_global_norm_(grads, CLIP)
        t.append(time.perf_counter())
        opt.step(model.params, grads, LR)
        t.append(time.perf_counter())
        for name, a, b in zip(whole, t, t[1:]):
            whole[name] += b - a

    one_step()
    whole = dict.fromkeys(whole, 0.0)
    for _ in range(steps):
        one_step()

    groups = stream_groups(cfg.batch)
    cols = groups[0]
    replica = CharRNN(model.shape, model.params)
    # the cells' forward and backward: the recurrent loops, and in backward the weight
    # gradient sum_t dpre_t^T h_{t-1} (cells._weight_grad), a window-wide GEMM, timed apart
    totals = {"cells": 0.0, "weight_grad": 0.0}
    cell = replica.cell
    replica.cell = cell._replace(forward=_timed(cell.forward, totals, "cells"),
                                 backward=_timed(cell.backward, totals, "cells"))
    weight_grad = cells._weight_grad
    cells._weight_grad = _timed(weight_grad, totals, "weight_grad")
    group_state = replica.zero_state(cols.stop - cols.start)
    phases = dict.fromkeys(("forward", "loss", "backward"), 0.0)

    def group_step() -> None:
        nonlocal group_state
        x, y, _ = stream.next_window()
        x, y = x[:, cols], y[:, cols]
        t = [time.perf_counter()]
        logits, group_state, cache = replica.forward(x, group_state)
        t.append(time.perf_counter())
        _, dlogits = cross_entropy_(logits, y.reshape(-1))
        t.append(time.perf_counter())
        replica.backward(dlogits, cache)
        t.append(time.perf_counter())
        for name, a, b in zip(phases, t, t[1:]):
            phases[name] += b - a

    try:
        with blas.single_threaded():
            group_step()
            phases = dict.fromkeys(phases, 0.0)
            totals.update(dict.fromkeys(totals, 0.0))  # in place: the timers hold it
            for _ in range(steps):
                group_step()
    finally:
        cells._weight_grad = weight_grad
    result = {f"{k}_ms": 1e3 * v / steps for k, v in whole.items()}
    result["step_ms"] = sum(result.values())
    result["groups"] = len(groups)
    result["group_streams"] = cols.stop - cols.start
    result["group"] = {f"{k}_ms": 1e3 * v / steps for k, v in phases.items()}
    result["group"]["loops_ms"] = 1e3 * (totals["cells"] - totals["weight_grad"]) / steps
    result["loop_gemms"] = recurrent_gemms_alone(cfg, vocab, cols.stop - cols.start)
    return result


def profile_table(profiles: dict[str, dict]) -> str:
    out = [
        "### Where charrnn's training step goes (ms)",
        "",
        "The whole step as training runs it; then what one of its threads does, timed alone:"
        " forward, loss and backward of its group of streams; of those, the recurrent loops"
        " (each step's GEMM and gate arithmetic), next to the loops' GEMMs alone; the rest"
        " is the window-wide work (input projections, head, weight gradients).",
        "",
        "| config | step | of which clip + Adam | threads x streams | one thread: forward"
        " | loss | backward | recurrent loops | their GEMMs alone | window-wide and the rest |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, p in profiles.items():
        g, gemms = p["group"], p["loop_gemms"]
        rest = g["forward_ms"] + g["loss_ms"] + g["backward_ms"] - g["loops_ms"]
        out.append(
            f"| {name} | {p['step_ms']:.1f} | {p['clip_ms'] + p['adam_ms']:.1f}"
            f" | {p['groups']} x {p['group_streams']} | {g['forward_ms']:.1f}"
            f" | {g['loss_ms']:.1f} | {g['backward_ms']:.1f} | {g['loops_ms']:.1f}"
            f" | {gemms['ms']:.1f} ({gemms['gflops']:.0f} GFLOP/s) | {rest:.1f} |"
        )
    return "\n".join(out)


# -- report ------------------------------------------------------------------------------


def fmt_cps(x: float) -> str:
    return f"{x:,.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: dict) -> str:
    m, g = results["machine"], results["gemm"]
    out = [
        "## charrnn vs PyTorch (CPU)",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores used by both frameworks",
        f"- Python {m['python']}, numpy {m['numpy']} ({m['blas']}), torch {m['torch']},"
        f" charrnn {m['charrnn']}",
        f"- data: {m['data']}",
        f"- kernels: {m.get('kernels', '?')}"
        + (f" (dropped from the environment: {m['dropped_env']})" if m.get("dropped_env") else ""),
        f"- float32 GEMM peak ({GEMM_N}^3, best at the start and the end):"
        f" numpy {g['numpy_gflops']:.1f} GFLOP/s,"
        f" torch {g['torch_gflops']:.1f} GFLOP/s",
        f"- mode: {m['mode']}; load average at the start {m['load_average_at_start']:.2f}",
        "",
        "### Training (Adam, clip 5, embedding 64)",
        "",
        "| config | params | batch x seq | charrnn chars/s | PyTorch chars/s | ratio"
        " | charrnn GFLOP/s | % GEMM peak | peak RSS growth charrnn / PyTorch (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["training"].items():
        cfg = CONFIGS[name]
        mem = results["memory"].get(name)
        mem_s = f"{mem['charrnn_mib']:.1f} / {mem['torch_mib']:.1f}" if mem else "-"
        out.append(
            f"| {name} | {r['params']:,} | {cfg.batch} x {cfg.seq} | {fmt_cps(r['charrnn_cps'])}"
            f" | {fmt_cps(r['torch_cps'])} | {r['ratio']:.2f} | {r['charrnn_gflops']:.1f}"
            f" | {100 * r['charrnn_gflops'] / g['numpy_gflops']:.0f}% | {mem_s} |"
        )
    out += [
        "",
        "Time per training step (ms): forward+loss+backward / clip+Adam",
        "",
        "| config | charrnn | PyTorch | loss check (max abs diff, first steps) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results["training"].items():
        p = r["phases_ms"]
        out.append(
            f"| {name} | {p['charrnn']['fwd_bwd']:.1f} / {p['charrnn']['update']:.1f}"
            f" | {p['PyTorch']['fwd_bwd']:.1f} / {p['PyTorch']['update']:.1f}"
            f" | {r['loss_check_max_abs_diff']:.1e} ({r['loss_check_steps']} steps) |"
        )
    if results["evaluation"]:
        out += [
            "",
            f"### Evaluation (forward only, batch {EVAL_BATCH} x seq {EVAL_SEQ})",
            "",
            "GFLOP/s count the forward pass's FLOPs as PyTorch computes it, for both (charrnn"
            " gathers layer 0's input projection from a table instead); % of the numpy GEMM"
            " peak above.",
            "",
            "| config | chars | charrnn chars/s | PyTorch chars/s | ratio"
            " | GFLOP/s charrnn / PyTorch | % GEMM peak charrnn / PyTorch"
            " | bpc charrnn / PyTorch |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        peak = g["numpy_gflops"]
        for name, r in results["evaluation"].items():
            out.append(
                f"| {name} | {r['chars']:,} | {fmt_cps(r['charrnn_cps'])}"
                f" | {fmt_cps(r['torch_cps'])} | {r['ratio']:.2f}"
                f" | {r['charrnn_gflops']:.1f} / {r['torch_gflops']:.1f}"
                f" | {100 * r['charrnn_gflops'] / peak:.0f}%"
                f" / {100 * r['torch_gflops'] / peak:.0f}%"
                f" | {r['bpc']['charrnn']:.4f} / {r['bpc']['PyTorch']:.4f} |"
            )
    if results["sampling"]:
        out += [
            "",
            "### Sampling (temperature 1, chars/s over all streams)",
            "",
            "| config | streams | charrnn chars/s | PyTorch chars/s | ratio |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in results["sampling"].items():
            for streams, s in r.items():
                out.append(
                    f"| {name} | {streams} | {fmt_cps(s['charrnn_cps'])}"
                    f" | {fmt_cps(s['torch_cps'])} | {s['ratio']:.2f} |"
                )
    out += ["", "### Targets", ""]
    for t in results["targets"]:
        out.append(f"- {verdict(t['pass'])}: {t['target']} -- {t['observed']}")
    return "\n".join(out)


def check_targets(results: dict) -> list[dict]:
    def target(name: str, values: dict[str, float], ok: Callable[[float], bool], unit: str = ""):
        if not values:
            return None
        observed = ", ".join(f"{k} {v:.2f}{unit}" for k, v in values.items())
        return {
            "target": name,
            "observed": observed,
            "pass": all(map(ok, values.values())),
            "values": values,
        }

    tr, ev, sa, mem = (results[k] for k in ("training", "evaluation", "sampling", "memory"))
    peak = results["gemm"]["numpy_gflops"]
    targets = [
        target(
            "training chars/s ratio charrnn/PyTorch >= 1.0 on every config",
            {k: r["ratio"] for k, r in tr.items()},
            lambda v: v >= 1.0,
        ),
        target(
            "lstm-512 training at >= 60% of the GEMM peak",
            {k: 100 * r["charrnn_gflops"] / peak for k, r in tr.items() if k == "lstm-512"},
            lambda v: v >= 60.0,
            "%",
        ),
        target(
            "evaluation chars/s ratio >= 1.1",
            {k: r["ratio"] for k, r in ev.items()},
            lambda v: v >= 1.1,
        ),
        target(
            "sampling one stream chars/s ratio >= 2.0",
            {k: r["1"]["ratio"] for k, r in sa.items()},
            lambda v: v >= 2.0,
        ),
        target(
            "sampling 32 streams chars/s ratio >= 1.0",
            {k: r["32"]["ratio"] for k, r in sa.items()},
            lambda v: v >= 1.0,
        ),
        target(
            "peak RSS growth in training charrnn <= PyTorch (ratio <= 1.0)",
            {k: r["charrnn_mib"] / r["torch_mib"] for k, r in mem.items()},
            lambda v: v <= 1.0,
        ),
    ]
    return [t for t in targets if t is not None]


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs: under 2 minutes in all")
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {', '.join(CONFIGS)}",
    )
    ap.add_argument(
        "--data",
        default=None,
        help=f"training text (default {DEFAULT_DATA}); '' or absent: random text",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="add charrnn's time per phase of a step and its GEMMs alone",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    ap.add_argument(
        "--no-mkldnn",
        action="store_true",
        help="run PyTorch without its oneDNN kernels (its default oneDNN LSTM is slow"
        " for one-step calls, as in sampling)",
    )
    ap.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="native (default): every library picks the best kernels this CPU runs; avx2:"
        " an AVX2-only CPU emulated on an AVX-512 one, for both frameworks (charrnn's avx2"
        " kernels and GEMM, OpenBLAS as Haswell, oneDNN, MKL and ATen capped at AVX2)",
    )
    ap.add_argument("--child", choices=("charrnn", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--mem-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        ap.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    args.configs = names
    if args.data is None:  # the default corpus, or random text when it is absent
        args.data = DEFAULT_DATA if DEFAULT_DATA.is_file() else None
    elif args.data == "":  # random text (how the parent tells a child)
        args.data = None
    elif not Path(args.data).is_file():
        ap.error(f"--data: {args.data}: no such file")
    else:
        args.data = Path(args.data)
    return args


# What caps each library at AVX2. The libraries read them when they load, so the bench
# re-runs itself with them set; the memory children inherit them.
AVX2_ENV = {
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's OpenBLAS (charrnn's window-wide GEMMs)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # PyTorch's LSTM/GRU/RNN and linear layers
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorized kernels (softmax, gates)
}


def rerun(argv: list[str] | None) -> None:
    """Replace this process with the bench again, same arguments, under os.environ as it is
    now (the libraries read their ISA settings only when they load)."""
    script = [sys.executable, os.path.abspath(__file__)]
    os.execv(sys.executable, script + (sys.argv[1:] if argv is None else list(argv)))


def cap_to_avx2(argv: list[str] | None) -> None:
    """--isa avx2: both frameworks on AVX2 code only, as on an AVX2-only CPU."""
    if any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.environ.update(AVX2_ENV)
        rerun(argv)
    fused = cells.kernels()
    if fused is not None:
        if "avx2+fma" not in fused.gemm_variants() or "avx2" not in fused.kernel_variants():
            raise SystemExit("bench: --isa avx2 needs a CPU with AVX2 and FMA")
        fused.set_gemm("avx2+fma")
        fused.set_kernels("avx2")


def uncap_native(argv: list[str] | None) -> None:
    """--isa native: no ISA cap inherited from the environment. Some machines set one (this
    project's sandboxes export OPENBLAS_CORETYPE=Haswell, which halves numpy's GEMM on an
    AVX-512 CPU while PyTorch's MKL and oneDNN go on using AVX-512), so the bench re-runs
    itself without them and says which it dropped (--json: machine.dropped_env)."""
    inherited = [k for k in AVX2_ENV if k in os.environ]
    if inherited:
        os.environ["CHARRNN_BENCH_DROPPED_ENV"] = ", ".join(
            f"{k}={os.environ.pop(k)}" for k in inherited)
        rerun(argv)


def isa_description() -> str:
    """Which kernels each framework runs."""
    torch = import_torch()
    fused = cells.kernels()
    ours = (f"GEMM {fused.gemm_name()}, elementwise {fused.kernels_name()}" if fused is not None
            else "pure numpy")
    capped = ", ".join(f"{k}={os.environ[k]}" for k in AVX2_ENV if k in os.environ)
    return (f"charrnn {ours}; PyTorch ATen {torch.backends.cpu.get_cpu_capability()}"
            + (f" ({capped})" if capped else ""))


def main(argv: list[str] | None = None) -> int:
    global USE_MKLDNN
    args = parse_args(argv)
    USE_MKLDNN = not args.no_mkldnn
    if args.isa == "avx2":
        cap_to_avx2(argv)
    else:
        uncap_native(argv)
    if args.child:  # one framework's training memory, reported as one JSON line
        result = child_train_memory(args.child, CONFIGS[args.configs[0]], args.data, args.mem_steps)
        print(json.dumps(result))
        return 0

    if os.getloadavg()[0] > 0.5:
        log(
            f"warning: load average {os.getloadavg()[0]:.2f}: other work competes for the"
            " cores, the numbers will be noisy (BLAS threads suffer most)"
        )
    plan = QUICK if args.quick else FULL
    torch = import_torch()
    ids, vocab, data_desc = load_data(args.data)
    train_ids, eval_ids = split_data(ids, plan.eval_chars)
    configs = [CONFIGS[n] for n in args.configs]
    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cores": available_cores(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "blas": numpy_blas(),
            "torch": f"{torch.__version__} ({torch.get_num_threads()} threads,"
            f" oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'})",
            "charrnn": f"{getattr(charrnn, '__version__', '?')} ({charrnn_path()},"
            f" {len(stream_groups(1 << 20))} threads)",
            "data": data_desc,
            "kernels": isa_description(),
            "dropped_env": os.environ.get("CHARRNN_BENCH_DROPPED_ENV", ""),
            "mode": "--quick" if args.quick else "full",
            "load_average_at_start": os.getloadavg()[0],
        },
        "plan": asdict(plan),
        "training": {},
        "memory": {},
        "evaluation": {},
        "sampling": {},
        "profile": {},
    }
    log("GEMM peak ...")
    gemm_runs = [gemm_peak()]
    for cfg in configs:
        log(f"training {cfg.name} ...")
        results["training"][cfg.name] = bench_training(cfg, train_ids, vocab, plan)
    for cfg in configs:
        log(f"evaluation {cfg.name} ...")
        results["evaluation"][cfg.name] = bench_eval(cfg, eval_ids, vocab, plan)
        log(f"sampling {cfg.name} ...")
        results["sampling"][cfg.name] = bench_sampling(cfg, ids, vocab, plan)
    if not args.no_memory:
        for cfg in configs:
            log(f"peak memory {cfg.name} ...")
            results["memory"][cfg.name] = bench_memory(cfg, args.data, plan.mem_steps)
    if args.profile:
        for cfg in configs:
            log(f"profile {cfg.name} ...")
            steps = 3 if args.quick else 10
            results["profile"][cfg.name] = profile_charrnn(cfg, train_ids, vocab, steps)
    log("GEMM peak again ...")
    gemm_runs.append(gemm_peak())  # the best of the start and the end of the run
    results["gemm"] = {k: max(g[k] for g in gemm_runs) for k in gemm_runs[0]}
    results["gemm"]["runs"] = gemm_runs
    results["targets"] = check_targets(results)
    results["elapsed_s"] = time.perf_counter() - START
    print(report(results))
    if results["profile"]:
        print("\n" + profile_table(results["profile"]))
    print(f"\n(benchmark took {time.perf_counter() - START:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
