"""`charrnn lab memory`: how far back rnn, lstm and gru remember, against the truncation
window of truncated BPTT.

For each (cell, lag L, seq_length) of the grid:

1. generate the echo stream at lag L (`charrnn.lab.echo`: blocks `< k f ... f > k`, the echo
   repeating the key L steps later) for training, from the seed (seed, 0, L), and write it
   to a temporary file;
2. train on it with the ordinary trainer, `charrnn.train.Trainer`, from a `Config` built by
   `config_from_dict`: the same `CharRNN`, Adam, gradient clipping and stateful windows as
   `charrnn train`, no dropout, one layer, one-hot input. The hidden size is chosen per cell
   so that every cell has the same number of parameters (`--params`, within 5%). Every run
   sees the same characters: batch_size x seq_length = CHARS_PER_STEP characters a step,
   so a shorter window means more streams in the batch, the same number of updates. The
   learning rate is each cell's own (LEARNING_RATES). The training text is an epoch of
   EPOCH_STEPS windows, gone round again from the zero state. Training is checked on a
   validation stream, (seed, 2, L), every few hundred steps; the best model so far is
   kept, and training stops as soon as it has learned the lag (`train_and_score`);
3. score the kept model on the echo positions alone of a held-out stream generated from
   another seed, (seed, 1, L), in one stateful pass from the zero state, the first
   WARMUP_BLOCKS blocks not scored (`charrnn.lab.echo.echo_nll`). Chance is ln(A) nats; a
   cell has *learned* lag L when its echo loss is below 0.1 ln(A);
4. measure the trained model's effective gradient horizon on the held-out stream
   (`charrnn.inspect.gradients.gradient_flow`): the first lag at which the gradient of a
   step's loss with respect to the hidden state that far back has fallen below 1e-3 of its
   size at lag 0 (None: not within the lags measured).

Truncated BPTT with window T carries the state forward across window boundaries, but no
gradient goes back across them. A key and its echo L > T steps apart never share a window,
so nothing in the gradient asks the model to keep the key; the grid puts lags on both
sides of the windows to show what that does.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import config_from_dict
from ..errors import ConfigError, RunDirError
from ..fileio import atomic_write_bytes, check_writable
from ..inspect.plots import require_matplotlib
from ..model import CharRNN, ModelShape, num_params, param_shapes
from . import echo

CELLS = ("rnn", "lstm", "gru")
DEFAULT_LAGS = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_SEQ_LENGTHS = (16, 64)
DEFAULT_PARAMS = 20_000
DEFAULT_STEPS = 3000
DEFAULT_ALPHABET = 8
QUICK_LAGS = (2, 8, 32)
QUICK_SEQ_LENGTHS = (16,)
QUICK_STEPS = 1000
CHARS_PER_STEP = 2048  # batch_size x seq_length of every run
# Adam's learning rate, constant after a linear warm-up, per cell: the rate that learned
# fastest in a sweep of 0.002 .. 0.02 at lags 8 and 16. The vanilla RNN is unstable above
# about 0.003 (it learns, then loses it); the gated cells are slow below 0.01.
LEARNING_RATES = {"rnn": 0.002, "lstm": 0.01, "gru": 0.01}
WARMUP_STEPS = 100
GRAD_CLIP = 5.0  # global norm, as charrnn train
FIRST_CHECK = 250  # the first validation check, then one every CHECK_EVERY steps
CHECK_EVERY = 500
PARAM_TOLERANCE = 0.05  # every cell's parameter count within 5% of --params
LEARNED_FRACTION = 0.1  # learned: echo loss below this fraction of chance
HELD_OUT_BLOCKS = 2000  # at least this many echo positions in the held-out stream ...
HELD_OUT_CHARS = 65_536  # ... and at least this many characters
WARMUP_BLOCKS = 10  # blocks read from the zero state before the scoring starts
# Windows in an epoch of the training text. The trainer resets the state to zero at each
# epoch, and the models must meet that state in training: with a single epoch (no zero state
# after step 0), a gru at L = 4 learned to lean on state set early in training and held ever
# after, and from the zero state it predicted the echoes confidently wrong (10 nats).
EPOCH_STEPS = 250
HORIZON_MAX_LAG = 128  # the gradient horizon is measured up to 2 x the longest lag, <= this
HORIZON_WINDOWS = 4


# -- the grid's settings ---------------------------------------------------------------------


def vocab_size(alphabet: int, lag: int) -> int:
    """Characters in the echo stream: the A symbols, STORE, and RECALL (none at L = 1)."""
    return alphabet + (2 if lag >= 2 else 1)


def count_params(cell: str, vocab: int, hidden: int) -> int:
    shape = ModelShape(cell=cell, vocab_size=vocab, hidden_size=hidden, num_layers=1,
                       embedding_size=0)
    return sum(math.prod(s) for s in param_shapes(shape).values())


def hidden_size_for(cell: str, vocab: int, params: int) -> int:
    """The hidden size whose one-layer, one-hot model has the parameter count nearest
    `params`; ConfigError when even that is more than 5% off."""
    best = min(range(1, 4097), key=lambda h: abs(count_params(cell, vocab, h) - params))
    got = count_params(cell, vocab, best)
    if abs(got - params) > PARAM_TOLERANCE * params:
        raise ConfigError(
            f"--params {params}: the nearest {cell} has {got} parameters (hidden size {best}),"
            f" more than {PARAM_TOLERANCE:.0%} off; choose another --params"
        )
    return best


def batch_size_for(seq_length: int) -> int:
    return max(1, CHARS_PER_STEP // seq_length)


def horizon_max_lag(lags: Sequence[int]) -> int:
    return min(max(2 * max(lags), 64), HORIZON_MAX_LAG)


def check_options(cells: Sequence[str], lags: Sequence[int], seq_lengths: Sequence[int],
                  params: int, steps: int, alphabet: int, seed: int = 0) -> None:
    """ConfigError (one line, exit 2) for any option the grid cannot run."""
    for cell in cells:
        if cell not in CELLS:
            raise ConfigError(f"--cells: unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    if not cells:
        raise ConfigError("--cells: name at least one cell")
    for name, values in (("--lags", lags), ("--seq-lengths", seq_lengths)):
        if not values:
            raise ConfigError(f"{name}: give at least one value")
        for v in values:
            if v < 1:
                raise ConfigError(f"{name}: every value must be >= 1, got {v}")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if not 2 <= alphabet <= echo.MAX_ALPHABET:
        raise ConfigError(f"--alphabet must be 2 to {echo.MAX_ALPHABET}, got {alphabet}")
    if params < 1:
        raise ConfigError(f"--params must be >= 1, got {params}")
    for cell in cells:
        for lag in sorted({min(lags), max(lags)}):
            hidden_size_for(cell, vocab_size(alphabet, lag), params)


# -- one run -----------------------------------------------------------------------------------


def _gradient_horizon(params: dict, cell: str, ids, max_lag: int) -> int | None:
    """The trained model's effective gradient horizon (layer 0; the models have one layer)."""
    from ..inspect.gradients import gradient_flow

    flow = gradient_flow(params, cell, ids, max_lag=max_lag, windows=HORIZON_WINDOWS)
    return flow.horizons()[0]


try:
    import charrnn.inspect.gradients  # noqa: F401

    HAVE_GRADIENTS = True
except ImportError:  # no `charrnn inspect gradients` in this build: horizons are null
    HAVE_GRADIENTS = False


def _train_text(alphabet: int, lag: int, batch: int, seq_length: int, steps: int,
                seed: int) -> str:
    """One epoch of the echo stream: EPOCH_STEPS windows of batch x seq_length (fewer when
    `steps` is smaller). The trainer goes round it again, from the zero state, each epoch."""
    chars = batch * (min(steps, EPOCH_STEPS) * seq_length + 1)
    return echo.generate(alphabet, lag, chars // echo.block_length(lag) + 1, seed=[seed, 0, lag])


def _held_out(alphabet: int, lag: int, seed: int, which: int, size: int = 1) -> str:
    """The held-out stream (which = 1) or the validation stream (2, half the size), with
    WARMUP_BLOCKS more blocks, which are not scored."""
    blocks = max(HELD_OUT_BLOCKS, HELD_OUT_CHARS // echo.block_length(lag)) // size
    return echo.generate(alphabet, lag, blocks + WARMUP_BLOCKS, seed=[seed, which, lag])


def _echo_loss(model, ids, lag: int) -> tuple[float, int]:
    """Mean echo NLL of one long stream after WARMUP_BLOCKS blocks, and the echoes scored."""
    total, count = echo.echo_nll(model, ids, lag, batch_size=1,
                                 warmup=WARMUP_BLOCKS * echo.block_length(lag))
    return total / count, count


def check_steps(steps: int) -> list[int]:
    """The steps after which the validation echo loss is checked: FIRST_CHECK, then every
    CHECK_EVERY, and the last."""
    return sorted({min(FIRST_CHECK, steps), *range(CHECK_EVERY, steps, CHECK_EVERY), steps})


def train_and_score(
    cell: str,
    lag: int,
    seq_length: int,
    *,
    params: int = DEFAULT_PARAMS,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    alphabet: int = DEFAULT_ALPHABET,
    horizon_lag: int | None = None,
    stop_below: float | None = None,
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """One point of the grid: train with `Trainer` on the echo stream at `lag`, then score
    the echo positions of a held-out stream. Returns the result row (see `run_grid`).

    Training runs in stages between the `check_steps`, each a resumed `Trainer` run (so it
    goes on exactly where the last stopped; the learning rate is constant after the
    warm-up). After each stage the echo loss on a validation stream, from the seed
    (seed, 2, L), is measured and the parameters with the lowest so far are kept: training
    can unlearn (the vanilla RNN does). Training stops once that loss is below the learned
    threshold, otherwise at `steps`. The model kept is scored on the held-out stream
    (seed, 1, L), which decides nothing; "steps" is its step, "trained_steps" all trained.

    `horizon_lag`: the lags up to which the gradient horizon is measured (None: not at all).
    `stop_below`: the validation echo loss that stops training (default: the threshold).
    """
    from ..train import Trainer  # the trainer pulls in the run-directory machinery

    vocab = vocab_size(alphabet, lag)
    hidden = hidden_size_for(cell, vocab, params)
    batch = batch_size_for(seq_length)
    threshold = LEARNED_FRACTION * echo.chance(alphabet)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="charrnn-memory-", dir=workdir) as tmp:
        corpus = Path(tmp) / "echo.txt"
        try:
            corpus.write_text(_train_text(alphabet, lag, batch, seq_length, steps, seed),
                              encoding="ascii")
        except OSError as e:
            raise RunDirError(f"cannot write the training text {corpus}: {e.strerror or e}") \
                from None
        config = {
            "data": {"path": str(corpus), "val_fraction": 0.0, "cache": False},
            "model": {"cell": cell, "hidden_size": hidden, "num_layers": 1,
                      "embedding_size": 0, "dropout": 0.0},
            "train": {"batch_size": batch, "seq_length": seq_length, "stateful": True,
                      "learning_rate": LEARNING_RATES[cell], "lr_schedule": "constant",
                      "warmup_steps": WARMUP_STEPS, "grad_clip": GRAD_CLIP, "seed": seed},
            "output": {"dir": str(Path(tmp) / "run"), "keep_last": 1},
        }
        done, val_ids, best = 0, None, None  # best: (validation echo loss, step, params)
        for stage in check_steps(steps):
            config["train"].update(max_steps=stage, eval_every=stage, log_every=stage)
            trainer = Trainer(config_from_dict(config, source="charrnn lab memory"),
                              resume=done > 0)
            if trainer.vocab.size != vocab:  # every character occurs in a text this long
                raise RunDirError(f"{corpus}: {trainer.vocab.size} characters, not {vocab}")
            result = trainer.run(progress=False, echo=lambda _: None)
            done = result.steps
            if val_ids is None:
                val_ids, _ = trainer.vocab.encode(_held_out(alphabet, lag, seed, 2, size=2))
            val_loss, _ = _echo_loss(trainer.model, val_ids, lag)
            if best is None or val_loss < best[0]:
                best = (val_loss, done,
                        {k: p.copy() for k, p in trainer.model.params.items()})
            if best[0] < (threshold if stop_below is None else stop_below):
                break
    seconds = time.perf_counter() - started
    model = CharRNN(trainer.model.shape, best[2])
    ids, _ = trainer.vocab.encode(_held_out(alphabet, lag, seed, 1))  # (N,)
    loss, count = _echo_loss(model, ids, lag)
    horizon = None
    if horizon_lag is not None and HAVE_GRADIENTS:
        horizon = _gradient_horizon(model.params, cell, ids, horizon_lag)
    return {
        "cell": cell, "lag": lag, "seq_length": seq_length, "hidden_size": hidden,
        "params": num_params(model.params), "steps": best[1], "trained_steps": done,
        "batch_size": batch, "val_loss": best[0],
        "loss": loss, "learned": bool(loss < threshold), "horizon": horizon,
        "echo_positions": count, "train_loss": result.final_train_loss, "seconds": seconds,
    }


# -- the grid ----------------------------------------------------------------------------------


def run_grid(
    cells: Sequence[str] = CELLS,
    lags: Sequence[int] = DEFAULT_LAGS,
    seq_lengths: Sequence[int] = DEFAULT_SEQ_LENGTHS,
    *,
    params: int = DEFAULT_PARAMS,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    alphabet: int = DEFAULT_ALPHABET,
    progress: bool = False,
    horizons: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every (cell, lag, seq_length), one after another. The report:

        {"alphabet": A, "chance": ln A, "threshold": 0.1 ln A, "params": --params,
         "steps", "chars_per_step", "horizon_max_lag" (null: not measured), "seconds",
         "results": [{"cell", "lag", "seq_length", "hidden_size", "params", "steps",
                      "trained_steps", "batch_size", "val_loss", "loss", "learned",
                      "horizon", "echo_positions", "train_loss", "seconds"}, ...]}

    `loss` is the echo loss in nats; `horizon` null means beyond horizon_max_lag (or not
    measured)."""
    from tqdm import tqdm

    check_options(cells, lags, seq_lengths, params, steps, alphabet, seed)
    horizon_lag = horizon_max_lag(lags) if horizons and HAVE_GRADIENTS else None
    grid = [(c, t, lag) for c in cells for t in seq_lengths for lag in lags]
    started = time.perf_counter()
    results = []
    with tqdm(grid, disable=not progress, unit="run", file=sys.stderr, dynamic_ncols=True,
              leave=False) as bar:
        for cell, seq_length, lag in bar:
            bar.set_postfix_str(f"{cell} T={seq_length} L={lag}", refresh=True)
            row = train_and_score(cell, lag, seq_length, params=params, steps=steps,
                                  seed=seed, alphabet=alphabet, horizon_lag=horizon_lag)
            results.append(row)
            if on_result is not None:
                on_result(row)
    return {
        "alphabet": alphabet, "chance": echo.chance(alphabet),
        "threshold": LEARNED_FRACTION * echo.chance(alphabet), "params": params,
        "steps": steps, "chars_per_step": CHARS_PER_STEP, "horizon_max_lag": horizon_lag,
        "seconds": time.perf_counter() - started, "results": results,
    }


# -- output ------------------------------------------------------------------------------------


def _horizon_text(row: dict[str, Any], max_lag: int | None) -> str:
    if max_lag is None:
        return "-"
    return f">{max_lag}" if row["horizon"] is None else str(row["horizon"])


def format_table(report: dict[str, Any]) -> str:
    """The per-run table, then echo loss by lag for each (cell, seq_length)."""
    chance, threshold = report["chance"], report["threshold"]
    max_lag = report.get("horizon_max_lag")
    rows = report["results"]
    lines = [
        f"echo task: {report['alphabet']} symbols, chance ln {report['alphabet']} = "
        f"{chance:.3f} nats, learned below {threshold:.3f}; {report['steps']} steps of "
        f"{report['chars_per_step']} chars, ~{report['params']:,} parameters",
        f"{'cell':<5} {'seq':>4} {'lag':>4} {'hidden':>6} {'params':>7} {'steps':>6} "
        f"{'echo loss':>9} {'learned':>7} {'horizon':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r['cell']:<5} {r['seq_length']:>4} {r['lag']:>4} {r['hidden_size']:>6} "
            f"{r['params']:>7,} {r['steps']:>6} {r['loss']:>9.4f} "
            f"{'yes' if r['learned'] else 'no':>7} {_horizon_text(r, max_lag):>7}"
        )
    lags = sorted({r["lag"] for r in rows})
    lines += ["", "echo loss (nats) by lag, * = learned:",
              f"{'cell':<5} {'seq':>4} " + " ".join(f"{'L=' + str(lag):>7}" for lag in lags)]
    for cell, seq in dict.fromkeys((r["cell"], r["seq_length"]) for r in rows):
        by_lag = {r["lag"]: r for r in rows if r["cell"] == cell and r["seq_length"] == seq}
        cells = [f"{by_lag[lag]['loss']:>6.3f}{'*' if by_lag[lag]['learned'] else ' '}"
                 if lag in by_lag else f"{'':>7}" for lag in lags]
        lines.append(f"{cell:<5} {seq:>4} " + " ".join(cells))
    lines.append(f"({report['seconds']:.0f} s)")
    return "\n".join(lines)


CELL_COLOURS = {"rnn": "tab:red", "lstm": "tab:blue", "gru": "tab:green"}
SEQ_STYLES = ("-", "--", ":", "-.")


def check_plot_path(path: str | os.PathLike) -> None:
    """Refuses (one line) a plot that cannot be written: no matplotlib, the path a
    directory, or its folder missing or not writable."""
    check_writable(Path(path))
    require_matplotlib()


def plot_memory(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Echo loss against lag (log2 axis), one line per (cell, seq_length), with chance,
    the learned threshold and the windows marked; beside it the gradient horizons, when
    they were measured (open markers: beyond the lags measured). A PNG, written atomically."""
    import io

    Figure = require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = report["results"]
    max_lag = report.get("horizon_max_lag")
    panels = 2 if max_lag is not None else 1
    fig = Figure(figsize=(5.6 * panels, 4.4), dpi=100, constrained_layout=True)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    seqs = sorted({r["seq_length"] for r in rows})
    lags = sorted({r["lag"] for r in rows})
    for cell, seq in dict.fromkeys((r["cell"], r["seq_length"]) for r in rows):
        line = sorted((r for r in rows if r["cell"] == cell and r["seq_length"] == seq),
                      key=lambda r: r["lag"])
        style = dict(color=CELL_COLOURS.get(cell, "black"),
                     linestyle=SEQ_STYLES[seqs.index(seq) % len(SEQ_STYLES)])
        x = [r["lag"] for r in line]
        axes[0].plot(x, [r["loss"] for r in line], marker="o", markersize=4,
                     label=f"{cell}, seq_length {seq}", **style)
        if panels == 2:
            y = [max_lag if r["horizon"] is None else r["horizon"] for r in line]
            axes[1].plot(x, y, **style)
            for xi, yi, r in zip(x, y, line, strict=True):
                axes[1].plot([xi], [yi], marker="o", markersize=5, linestyle="none",
                             color=style["color"],
                             markerfacecolor="white" if r["horizon"] is None else style["color"])
    ax = axes[0]
    ax.axhline(report["chance"], color="grey", linewidth=1)
    ax.text(lags[0], report["chance"], f" chance, ln {report['alphabet']}", va="bottom",
            fontsize=8, color="grey")
    ax.axhline(report["threshold"], color="grey", linewidth=1, linestyle="--")
    ax.text(lags[0], report["threshold"], f" learned below 0.1 ln {report['alphabet']}",
            va="bottom", fontsize=8, color="grey")
    ax.set_ylabel("echo loss on held-out text (nats)")
    ax.set_title("echo loss")
    ax.legend(fontsize=7, loc="center left")
    if panels == 2:
        ax = axes[1]
        ax.set_yscale("log", base=2)
        ax.axhline(max_lag, color="grey", linewidth=1, linestyle="--")
        ax.text(lags[0], max_lag, f" measured up to {max_lag}", va="top", fontsize=8,
                color="grey")
        ticks = [2**k for k in range(0, int(math.log2(max_lag)) + 1)]
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.plot(lags, lags, color="grey", linewidth=0.8, linestyle="-.")
        middle = lags[len(lags) // 2]
        ax.text(middle, middle, " horizon = lag", ha="left", va="top", fontsize=8,
                color="grey")
        ax.set_ylabel("gradient horizon of the trained model (steps)")
        ax.set_title("gradient horizon (grad norm < 1e-3 of lag 0)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lags, [str(lag) for lag in lags])
        ax.set_xlabel("lag L (steps from the key to its echo)")
        for seq in seqs:
            ax.axvline(seq, color="black", linewidth=0.8, linestyle=":")
            ax.text(seq, 0.98, f" T={seq}", transform=ax.get_xaxis_transform(), ha="left",
                    va="top", fontsize=8)
    fig.suptitle(f"echo task: {report['alphabet']} symbols, ~{report['params']:,} parameters "
                 f"a model, at most {report['steps']} steps of {report['chars_per_step']} "
                 "chars; T = truncated-BPTT window", fontsize=9)
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100)
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"cannot write the plot {path}: it is a directory")
    atomic_write_bytes(path, buf.getvalue())
