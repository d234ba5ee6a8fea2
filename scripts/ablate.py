"""The ablation table of a recipe: the config as it is, then each ingredient removed in turn.

    python scripts/ablate.py --config configs/shakespeare-40min.yaml --minutes 10 \
        --out runs/ablation

Each run is a plain `charrnn train` (one after another: never run two at once on the same
cores, they would share the time budget's CPU), with `train.max_minutes` set to --minutes and
the overrides of its row. With --steps N instead, every row trains exactly N steps with the
same cosine over them (train.max_minutes=0): on a machine whose speed drifts from run to run
(a shared VM), that compares the ingredients at equal work rather than at equal, noisy, time;
take N from the recipe's planned steps at the budget of interest. --mpi N runs each row under
`mpiexec -n N` with `train.reduce=ordered` and one thread a rank: the same weights, bit for
bit, as one process with N threads, and faster on a machine where the GIL between threads
costs (15% on the 2-core machine of the README).

The table (markdown, to stdout and OUT/ablation.md) gives each run's
best and final validation loss and its steps; rerun with --report to rebuild it from the run
directories without training.

The moving average never feeds back into training, so "no EMA" needs no run of its own: with
--val-text FILE (the validation tail as a file), the table gains the row "no EMA (raw
weights)", the recipe run's last checkpoint scored with its raw training weights (its
`raw.*` tensors) instead of their average, as `charrnn eval --text FILE` scores. It is the
final loss of a run without EMA exactly; its best over the run is not known.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

# the ingredients of configs/shakespeare-40min.yaml, and what "removed" means for each
ABLATIONS: dict[str, list[str]] = {
    "recipe": [],
    "no weight drop": ["model.weight_drop=0"],
    "no EMA": ["train.ema=0"],
    "no state resets": ["train.reset_prob=0"],
    "no dropout": ["model.dropout=0"],
    "no weight decay": ["train.optimizer=adam"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def summarize(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    if not evals:
        return None
    return {"best": min(r["val_loss"] for r in evals), "final": evals[-1]["val_loss"],
            "steps": rows[-1]["step"], "minutes": rows[-1]["elapsed_sec"] / 60,
            "train": rows[-1]["train_loss"]}


def raw_weights_loss(run_dir: Path, val_text: Path) -> tuple[int, float] | None:
    """The step and loss on `val_text` of the run's last checkpoint with its raw training
    weights in place of their moving average; None without a checkpoint or without EMA."""
    from charrnn.api import Model
    from charrnn.checkpoint import load_checkpoint, step_checkpoints

    found = step_checkpoints(run_dir)
    if not found:
        return None
    ckpt = load_checkpoint(found[-1][1])
    raw = {k: ckpt.train_tensors.get("raw." + k) for k in ckpt.params}
    if any(v is None for v in raw.values()):
        return None
    params = {k: v.astype(ckpt.params[k].dtype) for k, v in raw.items()}
    return ckpt.step, Model(replace(ckpt, params=params)).score_file(val_text).loss


def table(out: Path, names: list[str], val_text: Path | None = None) -> str:
    lines = ["| run | steps | minutes | train loss | best val | final val | vs recipe |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = summarize(out / slug("recipe"))
    for name in names:
        s = summarize(out / slug(name))
        if s is None:
            lines.append(f"| {name} | (not run) | | | | | |")
            continue
        delta = "" if base is None or name == "recipe" else f"{s['best'] - base['best']:+.4f}"
        lines.append(f"| {name} | {s['steps']} | {s['minutes']:.1f} | {s['train']:.4f} | "
                     f"{s['best']:.4f} | {s['final']:.4f} | {delta} |")
    raw = None if val_text is None or base is None else raw_weights_loss(out / slug("recipe"),
                                                                         val_text)
    if raw is not None:
        step, loss = raw
        lines.append(f"| no EMA (raw weights) | {step} | | {base['train']:.4f} | | "
                     f"{loss:.4f} | {loss - base['final']:+.4f} (final) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/shakespeare-40min.yaml",
                    help="the recipe (default: %(default)s)")
    ap.add_argument("--minutes", type=float, default=10.0,
                    help="time budget of every run (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=0,
                    help="train every row exactly this many steps instead of --minutes "
                         "(default: %(default)s, off)")
    ap.add_argument("--out", default="runs/ablation", help="parent of the run directories "
                    "(default: %(default)s)")
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help=f"run only these rows (repeatable) of: {', '.join(ABLATIONS)}")
    ap.add_argument("--mpi", type=int, default=1, metavar="N",
                    help="run each row on N MPI ranks of one thread (default: %(default)s, "
                         "one process)")
    ap.add_argument("--report", action="store_true", help="only rebuild the table")
    ap.add_argument("--val-text", type=Path, default=None, metavar="FILE",
                    help="the validation tail as a file: adds the row 'no EMA (raw weights)' "
                         "(default: none)")
    args = ap.parse_args()
    out = Path(args.out)
    names = args.only or list(ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        ap.error(f"unknown row {unknown[0]!r}; rows: {', '.join(ABLATIONS)}")
    if not args.report:
        for name in names:
            budget = (["train.max_minutes=0", f"train.max_steps={args.steps}"] if args.steps
                      else [f"train.max_minutes={args.minutes:g}"])
            sets = [*budget, f"output.dir={out / slug(name)}", *ABLATIONS[name]]
            launch = []
            if args.mpi > 1:
                launch = ["mpiexec", "-n", str(args.mpi), "-genv", "CHARRNN_THREADS", "1"]
                sets.append("train.reduce=ordered")
            cmd = [*launch, sys.executable, "-m", "charrnn.cli", "train", "--config",
                   args.config, "--overwrite", "--no-progress"]
            for s in sets:
                cmd += ["--set", s]
            print(f"== {name}: {' '.join(cmd[len(launch) + 3:])}", flush=True)
            done = subprocess.run(cmd)
            if done.returncode != 0:
                print(f"{name}: exit {done.returncode}", file=sys.stderr)
                return done.returncode
    text = table(out, names if args.only else list(ABLATIONS), args.val_text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
