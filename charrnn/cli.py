"""The command line: train, sample, eval, vocab, info.

Domain errors (charrnn.errors) are raised deep inside and become one-line click errors
here, with the exit codes of the CONTRACT: 2 bad input, 1 non-finite training,
130 / 143 after Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import json
import math
import shlex
import sys

import click

from . import __version__
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

    thread_count()  # a bad CHARRNN_THREADS is refused before any work


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
def train(config_path: str, overrides: tuple[str, ...], resume: bool, overwrite: bool,
          progress: bool | None) -> None:
    """Train a model from a YAML config; checkpoints and metrics go to output.dir."""
    from .config import load_config
    from .parallel import stream_groups
    from .train import StopSignals, Trainer

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    # Ctrl-C / SIGTERM: while loading, stop at once (exit 130 / 143); once training, finish
    # the step, write a checkpoint, then stop with the same exit codes
    with StopSignals() as signals:
        cfg = load_config(config_path, overrides)
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
        if progress is None:
            progress = sys.stderr.isatty()
        resume_cmd = " ".join(
            ["charrnn", "train", "--config", shlex.quote(config_path)]
            + [f"--set {shlex.quote(o)}" for o in overrides] + ["--resume"]
        )
        t = trainer.cfg.train
        banner = (
            f"charrnn: {trainer.cfg.model.cell} x{trainer.cfg.model.num_layers} "
            f"hidden {trainer.cfg.model.hidden_size}, {trainer.model.num_params:,} parameters; "
            f"corpus {trainer.corpus.num_chars:,} chars ({len(trainer.corpus.train):,} train, "
            f"{len(trainer.corpus.val):,} val), vocab {trainer.vocab.size}; "
            f"{t.max_steps} steps of {t.batch_size}x{t.seq_length} on "
            f"{len(stream_groups(t.batch_size))} thread(s)")
        # printed once the run directory checks pass: a refusal stays a one-line message
        result = trainer.run(progress=progress, resume_hint=resume_cmd,
                             echo=lambda s: click.echo(s, err=True), signals=signals,
                             on_start=lambda: click.echo(banner, err=True))
    lines = [f"trained {result.steps} steps, {result.num_params:,} parameters, "
             f"{result.chars_per_sec:,.0f} chars/s"]
    if result.best_val_loss is not None:
        lines.append(f"best val loss {result.best_val_loss:.4f} nats/char "
                     f"({result.best_val_loss / math.log(2):.4f} bits/char)")
    else:
        lines.append(f"best train loss {result.best_train_loss:.4f} nats/char (no validation)")
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
                   "separated by a blank line.")
@click.option("--skip-unknown", is_flag=True, default=False,
              help="Drop seed characters outside the vocabulary instead of refusing them "
                   "(exit 2).  [default: off]")
def sample(checkpoint: str, seed: str, length: int, temperature: float, top_k: int,
           top_p: float, rng_seed: int | None, num_samples: int, skip_unknown: bool) -> None:
    """Generate text from a trained model, streamed to stdout as it is produced."""
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .model import CharRNN
    from .sample import encode_seed, sample_text

    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    model = CharRNN(ckpt.shape, ckpt.params)
    encode_seed(ckpt.vocab, seed, skip_unknown)  # refuse unknown characters before printing
    out = sys.stdout
    stream = num_samples == 1

    def on_chars(chars: list[str]) -> None:
        out.write(chars[0])
        out.flush()

    if stream:
        out.write(seed)
        out.flush()
    texts = sample_text(model, ckpt.vocab, seed, length, temperature=temperature, top_k=top_k,
                        top_p=top_p, num_samples=num_samples, rng_seed=rng_seed,
                        skip_unknown=skip_unknown, on_chars=on_chars if stream else None)
    if stream:
        out.write("\n")
    else:
        out.write("\n\n".join(texts) + "\n")
    out.flush()


# -- eval ------------------------------------------------------------------------------


@cli.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A .safetensors checkpoint, or a run directory (then its best checkpoint).")
@click.option("--text", required=True, type=click.Path(),
              help="Held-out UTF-8 text file to score.")
@click.option("--unknown", type=click.Choice(["skip", "error"]), default="skip",
              show_default=True,
              help="Characters outside the vocabulary: skip drops them from the stream "
                   "(and counts them); error refuses the file with exit code 2.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one JSON object with loss, bpc, perplexity, chars, unknown_chars.")
@click.option("--batch-size", default=EVAL_BATCH, show_default=True, type=click.IntRange(min=1),
              help="Parallel streams the text is cut into.")
@click.option("--seq-length", default=EVAL_SEQ, show_default=True, type=click.IntRange(min=1),
              help="Window length of the stateful pass.")
def eval_(checkpoint: str, text: str, unknown: str, as_json: bool, batch_size: int,
          seq_length: int) -> None:
    """Score a held-out text: nats/char, bits/char and perplexity."""
    from .evaluate import evaluate_file

    r = evaluate_file(checkpoint, text, unknown=unknown, batch_size=batch_size,
                      seq_length=seq_length)
    if as_json:
        click.echo(json.dumps(r.to_json()))
        return
    click.echo(f"loss        {r.loss:.4f} nats/char\n"
               f"bpc         {r.bpc:.4f} bits/char\n"
               f"perplexity  {r.perplexity:.3f}\n"
               f"chars       {r.chars}\n"
               f"unknown     {r.unknown_chars} (skipped)")


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
    click.echo(f"checkpoint  {ckpt.path}\nstep        {ckpt.step}\n"
               f"model       {m.cell} x{m.num_layers}, hidden {m.hidden_size}, "
               f"embedding {m.embedding_size or 'one-hot'}, dropout {m.dropout}\n"
               f"parameters  {data['parameters']:,}\nvocab       {ckpt.vocab.size} chars")
    for key in ("train_loss", "best_val_loss", "best_loss"):
        value = ckpt.info.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            click.echo(f"{key:<12}{value:.4f} nats/char ({value / math.log(2):.4f} bits/char)")
    click.echo("config:")
    for section, values in data["config"].items():
        click.echo(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def main() -> None:
    cli(prog_name="charrnn")


if __name__ == "__main__":
    main()

