"""The command line: train, sample, eval, vocab, info.

Domain errors (charrnn.errors) are raised deep inside and become one-line click errors
here, with the exit codes of the CONTRACT: 2 bad input, 1 non-finite training,
130 / 143 after Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import sys

import click

from . import __version__
from .dynamic import DEFAULT_DECAY as DYNAMIC_DECAY
from .dynamic import DEFAULT_LR as DYNAMIC_LR
from .dynamic import DEFAULT_SEQ as DYNAMIC_SEQ
from .errors import CharRNNError
from .evaluate import EVAL_BATCH, EVAL_SEQ


class CommandError(click.ClickException):
    """A CharRNNError at the CLI boundary: 'Error: <one line>' on stderr, its exit code."""

    def __init__(self, error: CharRNNError):
        super().__init__(" ".join(str(error).split("\n")))
        self.exit_code = error.exit_code


class CharRNNGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CharRNNError as e:
            raise CommandError(e) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `charrnn sample ... | head`
            sys.stderr.close()
            ctx.exit(0)
        except OSError as e:  # an I/O fault no check above anticipated: still one line
            where = f"{e.filename}: " if e.filename else ""
            raise _one_line_error(f"{where}{e.strerror or e}") from None
        except MemoryError as e:
            raise _one_line_error(
                f"out of memory ({e or 'allocation failed'}); try a smaller model.hidden_size, "
                "train.batch_size or train.seq_length"
            ) from None


def _mpi_guarded(command):
    """Under mpiexec, a command's errors end the whole MPI job, reported once
    (charrnn.distributed.guard); outside it, the command unchanged."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from .distributed import guard

        with guard():
            return command(*args, **kwargs)

    return run


def _one_line_error(message: str) -> click.ClickException:
    err = click.ClickException(" ".join(message.split()))
    err.exit_code = 2
    return err


@click.group(cls=CharRNNGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charrnn")
def cli() -> None:
    """Train character-level RNN/LSTM/GRU language models on a CPU, sample and evaluate them.

    \b
      charrnn train --config configs/default.yaml
      charrnn sample --checkpoint runs/default --seed "def " --temperature 0.8
      charrnn eval --checkpoint runs/default --text held_out.txt

    Training and evaluation run on every core this process may use; CHARRNN_THREADS=N sets
    how many (results differ between thread counts by float rounding only).
    """
    from .parallel import thread_count

    _mpi_guarded(thread_count)()  # a bad CHARRNN_THREADS is refused before any work


# -- train -----------------------------------------------------------------------------


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML config file (see configs/ and the README's config reference).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, typed by the schema, e.g. --set "
                   "model.hidden_size=128. Repeatable.")
@click.option("--resume", is_flag=True, default=False,
              help="Continue the run in output.dir from its last checkpoint, exactly where "
                   "it stopped.  [default: off]")
@click.option("--overwrite", is_flag=True, default=False,
              help="Start over in an output.dir that already holds checkpoints, deleting "
                   "them.  [default: off]")
@click.option("--progress/--no-progress", default=None,
              help="Show the progress bar (loss, chars/s, ETA).  [default: when stderr is a "
                   "terminal; otherwise one line per evaluation]")
@_mpi_guarded
def train(config_path: str, overrides: tuple[str, ...], resume: bool, overwrite: bool,
          progress: bool | None) -> None:
    """Train a model from a YAML config; checkpoints and metrics go to output.dir.

    \b
    On several processes, one machine or many (pip install "charrnn[mpi]"):
      mpiexec -n 4 charrnn train --config FILE
      mpiexec -f hostfile -n 8 -ppn 2 charrnn train --config FILE
    trains the same model: each rank takes train.batch_size / N of the streams, which N
    must divide. Rank 0 reads the config and the corpus (the other nodes need neither, only
    this installation at the same path) and alone writes output.dir. CHARRNN_THREADS
    defaults to a node's cores over its ranks. --set train.reduce=ordered: the weights of
    one process with CHARRNN_THREADS=N, bit for bit. --resume works with any N. As root, or
    with more ranks than cores, see the README's "Beyond one machine".
    """
    from .api import train as train_run
    from .distributed import cli_config, world
    from .parallel import serial_note, stream_groups
    from .train import Trainer

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if progress is None:
        progress = sys.stderr.isatty()
    mpi = world()  # None outside mpiexec
    config = config_path
    if mpi is not None:  # rank 0's config on every rank; rank 0 alone prints
        config, overrides = cli_config(mpi, config_path, overrides)
        progress = progress and mpi.is_root
    resume_cmd = " ".join(
        ["charrnn", "train", "--config", shlex.quote(config_path)]
        + [f"--set {shlex.quote(o)}" for o in overrides] + ["--resume"]
    )
    started: list[Trainer] = []

    def on_start(trainer: Trainer) -> None:
        """The banner, printed once the run directory checks pass (a refusal stays a
        one-line message)."""
        started.append(trainer)
        t = trainer.cfg.train
        banner = (
            f"charrnn: {trainer.cfg.model.cell} x{trainer.cfg.model.num_layers} "
            f"hidden {trainer.cfg.model.hidden_size}, {trainer.model.num_params:,} parameters; "
            f"corpus {trainer.corpus.num_chars:,} chars ({len(trainer.corpus.train):,} train, "
            f"{len(trainer.corpus.val):,} val), vocab {trainer.vocab.size}; "
            + (f"{t.max_minutes:g} minutes" if t.max_minutes else f"{t.max_steps} steps")
            + f" of {t.batch_size}x{t.seq_length} on "
            + (f"{mpi.size} MPI ranks x " if mpi is not None else "")
            + f"{len(stream_groups(t.batch_size // (mpi.size if mpi else 1)))} thread(s)"
            + (f"; {note}" if (note := serial_note()) else ""))
        click.echo(banner, err=True)

    # Ctrl-C / SIGTERM: while loading, stop at once (exit 130 / 143); once training, finish
    # the step, write a checkpoint, then stop with the same exit codes
    result = train_run(config, overrides, resume, overwrite=overwrite, progress=progress,
                       echo=lambda s: click.echo(s, err=True), on_start=on_start,
                       resume_hint=resume_cmd)
    if not started:  # an MPI rank other than 0: rank 0 reports
        return
    trainer = started[0]
    lines = [f"trained {result.steps} steps, {result.num_params:,} parameters, "
             f"{result.chars_per_sec:,.0f} chars/s"]
    if result.best_val_loss is not None:
        lines.append(f"best val loss {result.best_val_loss:.4f} nats/char "
                     f"({result.best_val_loss / math.log(2):.4f} bits/char)")
    else:
        lines.append(f"best train loss {result.best_train_loss:.4f} nats/char (no validation)")
    from .lab.ngram import stored_baseline

    baseline = stored_baseline(trainer.corpus.files, trainer.cfg.data)  # from `lab ngram`
    if baseline is not None and result.best_val_loss is not None:
        b, n_val = baseline["best"], baseline["val_chars"]
        scope = "" if len(trainer.val_ids) == n_val else f", all {n_val:,} val chars"
        lines.append(f"n-gram baseline (order {b['order']}, KN{scope}): {b['val_loss']:.4f} "
                     f"nats/char ({b['val_bpc']:.4f} bits/char)")
    lines.append(f"checkpoints in {result.run_dir} (best: {result.best_checkpoint.name})")
    lines.append(f"sample: charrnn sample --checkpoint {shlex.quote(str(result.run_dir))} "
                 "--seed \"...\" --length 500")
    click.echo("\n".join(lines))


# -- sample ----------------------------------------------------------------------------


class _FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which pass its comparisons or make
    no sense as a temperature or a probability)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A .safetensors checkpoint, or a run directory (then its best checkpoint).")
@click.option("--seed", default="", show_default=True,
              help="Text to prime the model with; printed before the generated text. Empty: "
                   "start from the zero state.")
@click.option("--length", default=500, show_default=True, type=click.IntRange(min=0),
              help="Number of characters to generate (the seed not counted).")
@click.option("--temperature", default=1.0, show_default=True, type=_FiniteRange(min=0),
              help="Softmax temperature; 0 is greedy argmax, below 1 is more conservative.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Sample only among the K most likely characters (0: no limit).")
@click.option("--top-p", default=1.0, show_default=True,
              type=_FiniteRange(min=0, max=1, min_open=True),
              help="Nucleus sampling: only the most likely characters holding P of the mass.")
@click.option("--rng-seed", default=None, type=click.IntRange(min=0),
              help="Random seed; the same seed gives the same text.  [default: random]")
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Independent samples, drawn as one batch; printed one after another, "
                   "separated by a blank line (the first streamed as the batch runs, the "
                   "others as soon as it is done).")
@click.option("--skip-unknown", is_flag=True, default=False,
              help="Drop seed characters outside the vocabulary instead of refusing them "
                   "(exit 2).  [default: off]")
@click.option("--interactive", is_flag=True, default=False,
              help="A prompt: type a seed, the continuation streams back; ':help' lists the "
                   "commands that change the settings (the options above give the first "
                   "ones). Ctrl-C stops a generation, Ctrl-D or ':quit' leaves.  "
                   "[default: off]")
def sample(checkpoint: str, seed: str, length: int, temperature: float, top_k: int,
           top_p: float, rng_seed: int | None, num_samples: int, skip_unknown: bool,
           interactive: bool) -> None:
    """Generate text from a trained model, streamed to stdout as it is produced."""
    if interactive:  # the prompt loop of charrnn/interactive.py, until Ctrl-D or :quit
        from .interactive import run_interactive

        run_interactive(checkpoint, seed=seed, length=length, temperature=temperature,
                        top_k=top_k, top_p=top_p, rng_seed=rng_seed, num_samples=num_samples,
                        skip_unknown=skip_unknown)
        return
    from .api import load

    # the first sample streams as the batch generates it; the others (they finish together)
    # follow once it is done, each after a blank line
    out, current = sys.stdout, 0
    for i, piece in load(checkpoint).stream_samples(
            num_samples, seed, length, temperature, top_k, top_p, rng_seed, skip_unknown):
        if i != current:
            out.write("\n\n")
            current = i
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


# -- eval ------------------------------------------------------------------------------


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Refuses nan and inf, which click's FloatRange lets through."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


@cli.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A .safetensors checkpoint, or a run directory (then its best checkpoint).")
@click.option("--text", required=True, type=click.Path(),
              help="Held-out UTF-8 text file to score.")
@click.option("--unknown", type=click.Choice(["skip", "error"]), default="skip",
              show_default=True,
              help="Characters outside the vocabulary: skip drops them from the stream "
                   "(and counts them); error refuses the file with exit code 2.")
@click.option("--json", "as_json", is_flag=True, default=False, show_default=True,
              help="Print one JSON object with loss, bpc, perplexity, chars, unknown_chars "
                   "(with --dynamic also dynamic, static_loss, static_bpc, static_perplexity, "
                   "gain_bpc, seq_length, dynamic_lr, dynamic_decay).")
@click.option("--batch-size", default=EVAL_BATCH, show_default=True, type=click.IntRange(min=1),
              help="Parallel streams the text is cut into (--dynamic: always one stream).")
@click.option("--seq-length", default=EVAL_SEQ, show_default=True, type=click.IntRange(min=1),
              help=f"Window length of the stateful pass; with --dynamic the segment length, "
                   f"{DYNAMIC_SEQ} unless given.")
@click.option("--dynamic", is_flag=True, default=False, show_default=True,
              help="Dynamic evaluation: adapt a copy of the weights to the text as it is "
                   "scored (see above); the checkpoint file is never changed.  "
                   "[default: off]")
@click.option("--dynamic-lr", default=DYNAMIC_LR, show_default=True,
              type=click.FloatRange(min=0), callback=_finite,
              help="Learning rate of the RMS-normalised update: about how far each weight "
                   "moves per segment. 0: no adaptation (the static score).")
@click.option("--dynamic-decay", default=DYNAMIC_DECAY, show_default=True,
              type=click.FloatRange(0, 1), callback=_finite,
              help="Fraction of the way back to the trained weights each update takes.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar with --dynamic.  [default: when stderr is a terminal]")
@click.pass_context
def eval_(ctx: click.Context, checkpoint: str, text: str, unknown: str, as_json: bool,
          batch_size: int, seq_length: int, dynamic: bool, dynamic_lr: float,
          dynamic_decay: float, progress: bool | None) -> None:
    """Score a held-out text: nats/char, bits/char and perplexity.

    \b
    --dynamic: dynamic evaluation (Krause et al. 2018). The text is one stream, scored in
    segments of --seq-length characters, the hidden state carried. Each segment's loss is
    counted first, with the weights adapted on the segments before it, and only then is the
    segment used for an update, so no character is scored by weights that have seen it:
      g = clip(grad of the segment's mean NLL, global norm 5)
      MS = bias-corrected EMA (0.99) of g**2 over the segments so far
      theta += -lr * g / (sqrt(MS) + 1e-8) + decay * (theta0 - theta)
    The static loss of the same segments is reported beside, and the gain.
    """
    from .api import load

    if not dynamic:
        for name in ("dynamic_lr", "dynamic_decay"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--{name.replace('_', '-')} needs --dynamic")
    model = load(checkpoint)
    if dynamic:
        if ctx.get_parameter_source("seq_length") is click.core.ParameterSource.DEFAULT:
            seq_length = DYNAMIC_SEQ
        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(unit="char", unit_scale=True, disable=not show, file=sys.stderr,
                  desc="dynamic eval", leave=False, dynamic_ncols=True) as bar:

            def advance(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            r = model.score_file(text, unknown=unknown, seq_length=seq_length, dynamic=True,
                                 dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay,
                                 progress=advance)
    else:
        r = model.score_file(text, unknown=unknown, batch_size=batch_size, seq_length=seq_length)
    if as_json:
        click.echo(json.dumps(r.to_json()))
        return
    tag = " (dynamic)" if dynamic else ""
    lines = [f"loss        {r.loss:.4f} nats/char{tag}",
             f"bpc         {r.bpc:.4f} bits/char{tag}",
             f"perplexity  {r.perplexity:.3f}{tag}"]
    if dynamic:
        lines += [f"static      {r.static_loss:.4f} nats/char, {r.static_bpc:.4f} bits/char, "
                  f"perplexity {r.static_perplexity:.3f}",
                  f"gain        {r.gain_bpc:.4f} bits/char "
                  f"({100 * r.gain_bpc / r.static_bpc:.1f}%)",
                  f"segments    {r.seq_length} chars, one stream, lr {r.dynamic_lr:g}, "
                  f"decay {r.dynamic_decay:g}"]
    lines += [f"chars       {r.chars}", f"unknown     {r.unknown_chars} (skipped)"]
    click.echo("\n".join(lines))


# -- vocab -----------------------------------------------------------------------------


@cli.command()
@click.option("--text", required=True,
              help="A file, a directory, or a glob; \"{stdlib}\" is this Python's standard "
                   "library folder.")
@click.option("--include", default="*", show_default=True,
              help="File name pattern when --text is a directory.")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding.")
@click.option("--errors", type=click.Choice(["strict", "replace"]), default="strict",
              show_default=True, help="Undecodable bytes: refuse (strict) or replace.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write the vocabulary as JSON (chars in index order, counts) here.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="How many most and least frequent characters to list.")
def vocab(text: str, include: str, encoding: str, errors: str, output: str | None,
          top: int) -> None:
    """Build the character vocabulary of a corpus; report its size and counts."""
    from .data import corpus_files, read_chunks
    from .errors import DataError
    from .vocab import Vocab

    files = corpus_files(text, include)
    v = Vocab.build(read_chunks(files, encoding, errors))
    if v.size == 0:
        raise DataError(f"{text}: the corpus is empty")
    total = sum(v.counts)
    click.echo(f"{len(files)} file(s), {total:,} characters, vocabulary size {v.size} "
               f"(ids fit {v.dtype.name})")
    order = sorted(range(v.size), key=lambda i: -v.counts[i])
    if top:
        click.echo("most frequent:  " + ", ".join(
            f"{v.chars[i]!r} {v.counts[i]:,}" for i in order[:top]))
        click.echo("least frequent: " + ", ".join(
            f"{v.chars[i]!r} {v.counts[i]:,}" for i in order[::-1][:top]))
    if output:
        v.save(output)
        click.echo(f"wrote {output}")


# -- info ------------------------------------------------------------------------------


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one JSON object instead of text.")
def info(path: str, as_json: bool) -> None:
    """Show a checkpoint's config, step, parameter count and losses (PATH: file or run dir)."""
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .config import config_to_dict
    from .model import num_params

    ckpt = load_checkpoint(resolve_checkpoint(path))
    data = {
        "path": str(ckpt.path),
        "step": ckpt.step,
        "parameters": num_params(ckpt.params),
        "vocab_size": ckpt.vocab.size,
        **{k: v for k, v in ckpt.info.items()},
        "config": config_to_dict(ckpt.config),
    }
    if as_json:
        click.echo(json.dumps(data))
        return
    m = ckpt.config.model
    rows = [("checkpoint", str(ckpt.path)), ("step", str(ckpt.step)),
            ("model", f"{m.cell} x{m.num_layers}, hidden {m.hidden_size}, "
                      f"embedding {m.embedding_size or 'one-hot'}, dropout {m.dropout}"),
            ("parameters", f"{data['parameters']:,}"), ("vocab", f"{ckpt.vocab.size} chars")]
    for key in ("train_loss", "best_val_loss", "best_loss"):
        value = ckpt.info.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append((key, f"{value:.4f} nats/char ({value / math.log(2):.4f} bits/char)"))
    width = max(len(label) for label, _ in rows) + 2  # at least two spaces before a value
    for label, value in rows:
        click.echo(f"{label:<{width}}{value}")
    click.echo("config:")
    for section, values in data["config"].items():
        click.echo(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# -- plot ------------------------------------------------------------------------------


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="The PNG file to write (replaced atomically).")
@click.option("--label", "labels", multiple=True, metavar="TEXT",
              help="Legend label of each RUN_DIR, in order; repeat once per run.  [default: "
                   "each run directory's name, made unique with its parent's]")
def plot(run_dirs: tuple[str, ...], output: str, labels: tuple[str, ...]) -> None:
    """Training curves of one or more runs from their metrics.jsonl, overlaid, as a PNG.

    Needs matplotlib: pip install "charrnn[plot]".
    """
    from .inspect.plots import plot_runs

    if labels and len(labels) != len(run_dirs):
        raise click.BadParameter(f"{len(labels)} given for {len(run_dirs)} run(s); give one "
                                 "per RUN_DIR, or none", param_hint="'--label'")
    plot_runs(list(run_dirs), output, labels=list(labels) or None)
    click.echo(f"wrote {output}")


# -- inspect ---------------------------------------------------------------------------


@cli.group()
def inspect() -> None:
    """Look inside a trained model: gradient flow through time, gate saturation, cells."""


@inspect.command("gradients")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A .safetensors checkpoint, or a run directory (then its best checkpoint).")
@click.option("--text", required=True, type=click.Path(),
              help="UTF-8 text to take the windows from; characters outside the vocabulary "
                   "are dropped and counted.")
@click.option("--max-lag", default=100, show_default=True, type=click.IntRange(min=1),
              help="K: measure lags 0..K back from the last step of each window (may exceed "
                   "the training seq_length).")
@click.option("--windows", default=16, show_default=True, type=click.IntRange(min=1),
              help="N: windows spread evenly over the text; the measures are their means.")
@click.option("--prime", default=200, show_default=True, type=click.IntRange(min=0),
              help="P: characters run from the zero state before each window (no gradient).")
@click.option("--dtype", type=click.Choice(["model", "float32", "float64"]), default="model",
              show_default=True, help="Arithmetic: the checkpoint's own dtype, or another.")
@click.option("--json", "as_json", is_flag=True, default=False, show_default=True,
              help="Print one JSON object (the CONTRACT's) instead of the table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also write log-scale curves per layer, with the bound, to this PNG; needs "
                   "the [plot] extra.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar.  [default: when stderr is a terminal]")
def inspect_gradients_(checkpoint: str, text: str, max_lag: int, windows: int, prime: int,
                       dtype: str, as_json: bool, plot_path: str | None,
                       progress: bool | None) -> None:
    """How the gradient and the state Jacobian shrink or grow with the lag, per layer."""
    from .inspect.gradients import format_table, inspect_gradients

    flow, n_unknown = inspect_gradients(
        checkpoint, text, max_lag, windows, prime, None if dtype == "model" else dtype,
        plot_path, sys.stderr.isatty() if progress is None else progress)
    from .inspect.plots import plot_gradients

    _inspect_report(flow.to_json(), format_table(flow), n_unknown, as_json, plot_path,
                    plot_gradients)


def _inspect_report(data: dict, table: str, n_unknown: int, as_json: bool,
                    plot_path: str | None, draw) -> None:
    """Prints an inspection's JSON object (stdout, alone) or its table, the count of
    unknown characters skipped, and draws the plot when asked."""
    note = f"unknown     {n_unknown} character(s) outside the vocabulary (skipped)"
    if as_json:
        click.echo(json.dumps(data))
        if n_unknown:
            click.echo(note, err=True)
    else:
        click.echo(table)
        click.echo(note)
    if plot_path:
        draw(data, plot_path)
        click.echo(f"wrote {plot_path}", err=as_json)


@inspect.command("gates")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A .safetensors checkpoint, or a run directory (then its best checkpoint).")
@click.option("--text", required=True, type=click.Path(),
              help="UTF-8 text to run the model over; characters outside the vocabulary "
                   "are dropped and counted.")
@click.option("--json", "as_json", is_flag=True, default=False, show_default=True,
              help="Print one JSON object (per layer, gate and unit: left and right "
                   "saturated fractions) instead of the table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              show_default=True,
              help="Also write Karpathy's scatter (x left, y right fraction; a point per unit, "
                   "a panel per layer) to this PNG; needs the [plot] extra.")
def inspect_gates_(checkpoint: str, text: str, as_json: bool, plot_path: str | None) -> None:
    """How often each gate and tanh unit is saturated (< 0.1 / > 0.9, tanh: < -0.9 / > 0.9)."""
    from .inspect.gates import inspect_gates
    from .inspect.plots import plot_gates

    report, n_unknown = inspect_gates(checkpoint, text, plot_path)
    _inspect_report(report.to_json(), report.table(), n_unknown, as_json, plot_path, plot_gates)


@inspect.command("cells")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A .safetensors checkpoint, or a run directory (then its best checkpoint).")
@click.option("--text", required=True, type=click.Path(),
              help="UTF-8 text to show; characters outside the vocabulary are dropped and "
                   "counted.")
@click.option("--html", "html_path", required=True, type=click.Path(dir_okay=False),
              help="Write the self-contained page (inline CSS and JS, no network) here.")
@click.option("--max-chars", default=5000, show_default=True, type=click.IntRange(min=2),
              help="Show and analyse at most this many characters (after dropping unknown "
                   "ones) from the start of the text.")
@click.option("--layer", "layers", multiple=True, type=click.IntRange(min=0),
              show_default="all layers",
              help="A layer whose units the page shows and ranks (repeatable).")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1),
              help="How many of the best-correlated units to list per detector.")
def inspect_cells_(checkpoint: str, text: str, html_path: str, max_chars: int,
                   layers: tuple[int, ...], top: int) -> None:
    """A page of the text coloured by any unit, units ranked by what they track, surprisal."""
    from .inspect.cells import inspect_cells

    result = inspect_cells(checkpoint, text, html_path, max_chars=max_chars,
                           layers=layers or None, top=top)
    click.echo(result.summary())


# -- lab -------------------------------------------------------------------------------


@cli.group()
def lab() -> None:
    """Test the theory: memory span of rnn/lstm/gru, n-gram baselines."""


@lab.command("ngram")
@click.option("--text", required=True,
              help="The corpus, as training's data.path: a file, a directory, or a glob; "
                   "\"{stdlib}\" is this Python's standard library folder.")
@click.option("--order", default=8, show_default=True, type=int,
              help="Highest n-gram order, at least 1 (an order-n model looks n - 1 "
                   "characters back); every order from 1 up is scored.")
@click.option("--val-fraction", default=0.05, show_default=True, type=float,
              help="Validation tail in (0, 1), as the config's data.val_fraction.")
@click.option("--test-fraction", default=0.0, show_default=True, type=float,
              help="Test tail after the validation split, in [0, 1), as data.test_fraction.")
@click.option("--include", default="*", show_default=True,
              help="File name pattern when --text is a directory.")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one JSON object: orders, best, train_chars, val_chars, ...")
def lab_ngram(text: str, order: int, val_fraction: float, test_fraction: float, include: str,
              encoding: str, as_json: bool) -> None:
    """Kneser-Ney n-gram baselines: the val loss a recurrent model must beat on a corpus.

    Fits character n-grams of orders 1..--order (interpolated modified Kneser-Ney) on the
    training split and scores the validation split that `charrnn train` scores. The result
    is remembered, and the training summary of the same corpus prints it.
    """
    from .lab.ngram import ngram_baseline

    r = ngram_baseline(text, order=order, val_fraction=val_fraction,
                       test_fraction=test_fraction, include=include, encoding=encoding)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(f"{r.train_chars:,} train chars, {r.val_chars:,} val chars, vocab "
               f"{r.vocab_size}; {r.smoothing}")
    click.echo(f"{'order':>5}  {'nats/char':>9}  {'bits/char':>9}  {'perplexity':>10}")
    for o in r.orders:
        click.echo(f"{o.order:>5}  {o.val_loss:>9.4f}  {o.val_bpc:>9.4f}  "
                   f"{math.exp(o.val_loss):>10.3f}")
    b = r.best
    click.echo(f"best: order {b.order}, {b.val_loss:.4f} nats/char ({b.val_bpc:.4f} bits/char)")


def _int_list(text: str, option: str) -> list[int]:
    from .errors import ConfigError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated whole numbers, got {text!r}") \
            from None


@lab.command("memory")
@click.option("--cells", default="rnn,lstm,gru", show_default=True,
              help="Comma-separated cells to compare: rnn, lstm, gru.")
@click.option("--lags", default=None, show_default="1,2,4,8,16,32,64,128; --quick: 2,8,32",
              help="Comma-separated lags L: the echo repeats the key L steps later.")
@click.option("--seq-lengths", default=None, show_default="16,64; --quick: 16",
              help="Comma-separated truncated-BPTT windows (train.seq_length) to train with; "
                   "batch_size x seq_length is 2048 characters in every run.")
@click.option("--params", default=20_000, show_default=True, type=int,
              help="Parameters of every model: each cell's hidden size is chosen to match "
                   "within 5%.")
@click.option("--steps", default=None, type=int, show_default="3000; --quick: 1000",
              help="Most training steps per run; a run is checked at step 250 and every 500 "
                   "after, keeps its best model and stops once it has learned the lag.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the streams (training, validation and held-out, each its own) "
                   "and of the models' initialisation.")
@click.option("--alphabet", default=8, show_default=True, type=int,
              help="Symbols A of the stream (2 to 26); chance on an echo is ln(A) nats.")
@click.option("--quick", is_flag=True, default=False,
              help="A small grid (lags 2,8,32, window 16, at most 1000 steps) that runs in "
                   "about a minute.  [default: off]")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one JSON object {alphabet, chance, results: [...]} instead of the "
                   "table.  [default: off]")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG of echo loss against lag (needs charrnn[plot]).  "
                   "[default: no plot]")
def lab_memory(cells: str, lags: str | None, seq_lengths: str | None, params: int,
               steps: int | None, seed: int, alphabet: int, quick: bool, as_json: bool,
               plot_path: str | None) -> None:
    """How far back rnn, lstm and gru remember, against the truncation window.

    Trains each cell, with equal parameter counts and the ordinary trainer, on an echo
    stream in which a key character comes back L steps later, and scores the echoes alone
    on held-out text: learned when the echo loss is below 0.1 ln(A). See
    charrnn/lab/echo.py for the exact stream.
    """
    from .lab import memory

    if plot_path:  # no matplotlib, or nowhere to write: refuse before training, not after
        memory.check_plot_path(plot_path)
    report = memory.run_grid(
        [c.strip() for c in cells.split(",") if c.strip()],
        _int_list(lags, "--lags") if lags is not None
        else list(memory.QUICK_LAGS if quick else memory.DEFAULT_LAGS),
        _int_list(seq_lengths, "--seq-lengths") if seq_lengths is not None
        else list(memory.QUICK_SEQ_LENGTHS if quick else memory.DEFAULT_SEQ_LENGTHS),
        params=params,
        steps=steps if steps is not None else
        (memory.QUICK_STEPS if quick else memory.DEFAULT_STEPS),
        seed=seed, alphabet=alphabet, progress=sys.stderr.isatty(),
    )
    click.echo(json.dumps(report) if as_json else memory.format_table(report))
    if plot_path:
        memory.plot_memory(report, plot_path)


@lab.command("cold-start")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A .safetensors checkpoint, or a run directory (then its best checkpoint). "
                   "Only read.")
@click.option("--text", required=True, type=click.Path(),
              help="UTF-8 text to find the positions in, e.g. the validation tail.")
@click.option("--lines", default=64, show_default=True, type=click.IntRange(min=1),
              help="Most positions (paragraph starts), evenly spread over those in the text.")
@click.option("--predictions", default=20, show_default=True, type=click.IntRange(min=1),
              help="Characters predicted after each seed, text[e .. e+N-1] (the newline "
                   "first), cold and warm; only these are scored.")
@click.option("--context", default=200, show_default=True, type=click.IntRange(min=0),
              help="Characters before each seed that warm reads first (0: warm is cold).")
@click.option("--max-seed", default=40, show_default=True, type=click.IntRange(min=1),
              help="Longest seed (first line) used; starts with a longer first line are not "
                   "used, and counted apart (long_seeds).")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one JSON object {cold_loss, warm_loss, gap, positions, predictions, "
                   "context, per_offset, max_cold, recovery_offset, skipped, max_seed, "
                   "long_seeds} instead of the table.  [default: off]")
def lab_cold_start(checkpoint: str, text: str, lines: int, predictions: int, context: int,
                   max_seed: int, as_json: bool) -> None:
    """How badly a model continues a seed such as "ROMEO:" from the zero state, against
    the same predictions with context.

    \b
    Positions: the starts p of the lines that follow a blank line (in tiny-shakespeare the
    speaker names). The seed is that first line, text[p:e] without its line ending; the
    predictions are the N = --predictions characters after it, text[e .. e+N-1] (the
    newline first, then the speech). Used: starts at least --context characters into the
    text with N characters after the seed, whose seed is at most --max-seed characters
    (longer ones are counted apart) and whose window holds no character outside the
    vocabulary (else skipped, and counted); at most --lines of them, evenly spread (first
    and last included). With teacher forcing:
      cold: from the zero state, read the seed, then predict the N characters;
      warm: from the zero state, read the --context characters before p, then the
            same seed and predictions.
    Only the N predictions after the seed are scored, in both. Reported in nats/char: the
    mean cold and warm loss, the gap (cold - warm), the means per offset 1..N, the largest
    per-position cold loss, and the recovery offset: the first offset from which the cold
    mean stays within 0.1 nats of the warm one.
    """
    from .lab.coldstart import measure

    report = measure(checkpoint, text, lines=lines, predictions=predictions, context=context,
                     max_seed=max_seed)
    click.echo(json.dumps(report.to_json()) if as_json else report.table())


def main() -> None:
    cli(prog_name="charrnn")


if __name__ == "__main__":
    main()

