"""Interactive sampling: `charrnn sample --checkpoint PATH --interactive`.

A prompt loop. A typed line is a seed: it is printed, and the continuation streams after
it. A line that starts with ':' is a command (`HELP` lists them) that changes or shows the
settings: temperature, length, top-k, top-p, rng seed, and whether the recurrent state is
kept from one line to the next.

- Keep off (the default): every line is a fresh seed from the zero state, so a line gives
  exactly what `charrnn sample --seed LINE` prints with the same settings (and, with
  `:seed S`, the same text as `--rng-seed S`).
- Keep on: a line continues the text shown so far (the last continuation included, even
  one generated with keep off), appended with nothing in between; an empty line simply
  continues. `:reset` goes back to the zero state. With `:seed S` every line draws from
  a new generator seeded with S, so a session replays exactly.

Ctrl-C during a generation stops it at the next character and returns to the prompt (the
state stays consistent: it has seen exactly the characters shown); Ctrl-C at the prompt
cancels the line; Ctrl-D or `:quit` leaves. Line editing and history come from `readline`
when the standard library has it; the history lives in memory and no file is written.

The parsing is pure functions (`parse_line`, `parse_command`) and `Session` owns the
settings and the state, so all of it is testable without a terminal.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .errors import CharRNNError
from .model import CharRNN
from .sample import draw
from .vocab import Vocab, describe_unknown

PROMPT = "> "

HELP = """\
Type a seed and press Enter: the continuation streams after it. Commands:
  :temperature T   softmax temperature, T >= 0 (0: greedy argmax)
  :length N        characters to generate per line, N >= 0
  :top-k K         only the K most likely characters (0 or none: no limit)
  :top-p P         only the most likely characters holding P of the mass, 0 < P <= 1
                   (1 or none: no limit)
  :seed S          random seed of every line, S >= 0 (none: random)
  :keep on|off     on: a line continues the text so far (an empty line continues);
                   off: every line starts from the zero state
  :reset           back to the zero state
  :show            the settings
  :help            this text
  :quit            leave (also Ctrl-D)
A command without a value shows that setting. A line starting with '::' is a seed that
starts with ':'. Ctrl-C stops a generation, or cancels the line being typed."""

# canonical command names, and the other spellings accepted for them
ALIASES = {
    "temperature": "temperature", "temp": "temperature", "t": "temperature",
    "length": "length", "len": "length", "n": "length",
    "top-k": "top-k", "top_k": "top-k", "topk": "top-k", "k": "top-k",
    "top-p": "top-p", "top_p": "top-p", "topp": "top-p", "p": "top-p",
    "seed": "seed", "rng-seed": "seed", "rng_seed": "seed",
    "keep": "keep",
    "reset": "reset",
    "show": "show",
    "help": "help", "h": "help", "?": "help",
    "quit": "quit", "q": "quit", "exit": "quit",
}
SETTINGS = ("temperature", "length", "top-k", "top-p", "seed", "keep")  # take a value
ACTIONS = ("reset", "show", "help", "quit")  # take none


class InteractiveUsageError(CharRNNError):
    """An option of `charrnn sample` that does not go with --interactive (exit 2)."""


class BadCommand(ValueError):
    """A command or value the prompt refuses; its message is one line."""


@dataclass(frozen=True)
class Command:
    """A parsed ':' line: `name` is canonical (ALIASES). A setting given a value has
    `assign` True and the parsed `value` (None is a value: `:seed none`); without one
    (`:length`), and for an action, `assign` is False."""

    name: str
    value: Any = None
    assign: bool = False


@dataclass
class Settings:
    """What the next generation uses: `charrnn sample`'s options, and `keep`."""

    temperature: float = 1.0
    length: int = 500
    top_k: int = 0
    top_p: float = 1.0
    rng_seed: int | None = None
    keep: bool = False

    def apply(self, command: Command) -> None:
        """Sets the setting a command assigns."""
        attr = {"top-k": "top_k", "top-p": "top_p", "seed": "rng_seed"}.get(command.name,
                                                                            command.name)
        setattr(self, attr, command.value)

    def describe(self, name: str) -> str:
        """One line: a setting's name and value, e.g. 'top-k        5'."""
        value = {
            "temperature": f"{self.temperature:.10g}" + (" (greedy)" if self.temperature == 0
                                                     else ""),
            "length": str(self.length),
            "top-k": f"{self.top_k}" + (" (no limit)" if self.top_k == 0 else ""),
            "top-p": f"{self.top_p:.10g}" + (" (no limit)" if self.top_p == 1 else ""),
            "seed": "none (random)" if self.rng_seed is None else str(self.rng_seed),
            "keep": ("on (a line continues the text so far)" if self.keep
                     else "off (every line starts from the zero state)"),
        }[name]
        return f"{name:<12} {value}"

    def show(self) -> str:
        """Every setting, one per line."""
        return "\n".join(self.describe(name) for name in SETTINGS)


def _number(raw: str, name: str, expected: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise BadCommand(f":{name}: expected {expected}, got {raw!r}") from None
    if not math.isfinite(value):
        raise BadCommand(f":{name}: expected {expected}, got {raw!r}")
    return value


def _whole(raw: str, name: str, expected: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise BadCommand(f":{name}: expected {expected}, got {raw!r}") from None


def parse_value(name: str, raw: str) -> Any:
    """The value of setting `name` (canonical) from its text; BadCommand if out of range."""
    low = raw.lower()
    if name == "temperature":
        value = _number(raw, name, "a number >= 0")
        if value < 0:
            raise BadCommand(f":temperature: expected a number >= 0, got {raw!r}")
        return value
    if name == "length":
        value = _whole(raw, name, "a whole number >= 0")
        if value < 0:
            raise BadCommand(f":length: expected a whole number >= 0, got {raw!r}")
        return value
    if name == "top-k":
        if low in ("none", "off"):
            return 0
        value = _whole(raw, name, "a whole number >= 0 or none")
        if value < 0:
            raise BadCommand(f":top-k: expected a whole number >= 0 or none, got {raw!r}")
        return value
    if name == "top-p":
        if low in ("none", "off"):
            return 1.0
        value = _number(raw, name, "a number in (0, 1] or none")
        if not 0 < value <= 1:
            raise BadCommand(f":top-p: expected a number in (0, 1] or none, got {raw!r}")
        return value
    if name == "seed":
        if low in ("none", "random", "off"):
            return None
        value = _whole(raw, name, "a whole number >= 0 or none")
        if value < 0:
            raise BadCommand(f":seed: expected a whole number >= 0 or none, got {raw!r}")
        return value
    if name == "keep":
        if low in ("on", "yes", "true", "1"):
            return True
        if low in ("off", "no", "false", "0"):
            return False
        raise BadCommand(f":keep: expected on or off, got {raw!r}")
    raise BadCommand(f":{name} takes no value")


def parse_command(text: str) -> Command:
    """A command line without its ':' ('temperature 0.5', 'show') -> Command."""
    parts = text.split()
    if not parts:
        raise BadCommand("empty command (type :help)")
    name = ALIASES.get(parts[0].lower())
    if name is None:
        raise BadCommand(f"unknown command :{parts[0]} (type :help)")
    args = parts[1:]
    if name in ACTIONS:
        if args:
            raise BadCommand(f":{name} takes no value")
        return Command(name)
    if not args:
        return Command(name)  # show this setting
    if len(args) > 1:
        raise BadCommand(f":{name} takes one value, got {' '.join(args)!r}")
    return Command(name, parse_value(name, args[0]), assign=True)


def parse_line(line: str) -> Command | str:
    """A typed line -> a Command (a line starting with ':') or the seed text, as typed.

    '::text' is the seed ':text'."""
    if line.startswith("::"):
        return line[1:]
    if line.startswith(":"):
        return parse_command(line[1:])
    return line


@dataclass
class _Context:
    """The recurrent state after the text shown so far: `state` and `logits` (the next
    character's) have seen all of it but the ids in `unfed`."""

    state: list
    logits: np.ndarray  # (1, V)
    unfed: np.ndarray  # int64 ids shown but not run through the model yet


_NO_IDS = np.empty(0, dtype=np.int64)


class Session:
    """The prompt loop's settings and state. `handle` takes one typed line; `run` is the
    loop that reads them (from `readline`'s `input` on a terminal)."""

    def __init__(self, model: CharRNN, vocab: Vocab, settings: Settings | None = None, *,
                 skip_unknown: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None):
        self.model = model
        self.vocab = vocab
        self.settings = settings if settings is not None else Settings()
        self.skip_unknown = skip_unknown
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self._chars = list(vocab.chars)
        self._stepper = model.stepper()
        self._context: _Context | None = None  # None: the zero state
        self._stop = False

    # -- one line ----------------------------------------------------------------------------

    def message(self, text: str) -> None:
        """A note to the user (settings, refusals), on stderr."""
        self.err.write(text + "\n")
        self.err.flush()

    def handle(self, line: str) -> bool:
        """Runs one typed line: a command or a seed. False once the user asked to quit."""
        try:
            parsed = parse_line(line)
        except BadCommand as e:
            self.message(str(e))
            return True
        if isinstance(parsed, str):
            self.generate(parsed)
            return True
        name = parsed.name
        if name == "quit":
            return False
        if name == "help":
            self.message(HELP)
        elif name == "show":
            self.message(self.settings.show())
        elif name == "reset":
            self.reset()
            self.message("state reset: the next line starts from the zero state")
        else:  # a setting: set it if given a value, then show it
            if parsed.assign:
                self.settings.apply(parsed)
            self.message(self.settings.describe(name))
        return True

    def reset(self) -> None:
        """Back to the zero state."""
        self._context = None

    def stop(self) -> None:
        """Ends the generation in progress after its current character (Ctrl-C)."""
        self._stop = True

    # -- generation --------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray | None:
        """The ids of a typed seed; None (and a message) if it holds unknown characters
        and --skip-unknown is off."""
        ids, n_unknown = self.vocab.encode(text, unknown="skip")
        if n_unknown:
            what = describe_unknown(self.vocab.unknown_chars(text))
            if not self.skip_unknown:
                self.message(f"the seed holds {what}; type another (or start with "
                             "--skip-unknown to drop them)")
                return None
            self.message(f"dropped {what}")
        return ids.astype(np.int64)

    def generate(self, text: str) -> int:
        """Prints `text`, then streams `settings.length` characters after it; returns how
        many were generated (fewer after `stop`). With keep off, it is `charrnn sample
        --seed TEXT`'s output."""
        ids = self.encode(text)
        if ids is None:
            return 0
        s = self.settings
        self._stop = False
        out = self.out
        out.write(text)
        out.flush()
        rng = np.random.default_rng(s.rng_seed)
        ctx = self._context if s.keep else None
        if ctx is None:  # the zero state, as charrnn.sample.generate
            state, logits, pending = self.model.zero_state(1), None, ids
        else:
            state, logits, pending = ctx.state, ctx.logits, np.concatenate([ctx.unfed, ids])
        if len(pending):
            all_logits, state, _ = self.model.forward(pending[:, None], state)
            logits = all_logits[-1:]  # (1, V) after the last character
        elif logits is None:  # nothing to prime on: softmax(head.bias)
            logits = np.broadcast_to(self.model.params["head.bias"],
                                     (1, self.model.shape.vocab_size))
        self._context = _Context(state, logits, _NO_IDS)
        n = 0
        while n < s.length and not self._stop:
            nxt = draw(logits, rng, s.temperature, s.top_k, s.top_p)  # (1,)
            out.write(self._chars[int(nxt[0])])
            out.flush()
            self._context = _Context(state, logits, nxt.astype(np.int64))
            n += 1
            if n < s.length:  # as generate: no step after the last character
                logits, state = self._stepper.step(nxt, state)
                self._context = _Context(state, logits, _NO_IDS)
        out.write("\n")
        out.flush()
        if self._stop:
            self.message(f"(stopped after {n} characters)")
        return n

    # -- the loop ----------------------------------------------------------------------------

    def _generate_stoppable(self, line: str) -> bool:
        """`handle`, with Ctrl-C turned into `stop` (in the main thread) while it runs."""
        if threading.current_thread() is not threading.main_thread():
            return self.handle(line)
        previous = signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            return self.handle(line)
        finally:
            signal.signal(signal.SIGINT, previous)

    def run(self, read_line: Callable[[str], str] | None = None) -> None:
        """Reads and handles lines until Ctrl-D (end of input) or :quit.

        On a terminal `input` gets line editing and an in-memory history from `readline`
        (when the standard library has it); elsewhere lines are read without a prompt."""
        tty = sys.stdin.isatty()
        if read_line is None:
            if tty:
                try:
                    import readline  # noqa: F401  (gives input() editing and history)
                except ImportError:
                    pass
            read_line = input
        prompt = PROMPT if tty else ""
        while True:
            try:
                try:
                    line = read_line(prompt)
                except KeyboardInterrupt:  # Ctrl-C at the prompt: cancel the line
                    self.out.write("\n")
                    self.out.flush()
                    continue
                except EOFError:  # Ctrl-D
                    if tty:
                        self.out.write("\n")
                        self.out.flush()
                    return
                if not self._generate_stoppable(line):
                    return
            except KeyboardInterrupt:  # between the handler and the prompt: no harm done
                self.out.write("\n")
                self.out.flush()


def run_interactive(checkpoint: str, *, seed: str = "", length: int = 500,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    rng_seed: int | None = None, num_samples: int = 1,
                    skip_unknown: bool = False) -> None:
    """`charrnn sample --interactive`: `charrnn sample`'s options are the starting settings;
    --seed and --num-samples > 1 are refused (exit 2)."""
    if seed:
        raise InteractiveUsageError("--seed does not go with --interactive: type seeds at "
                                    "the prompt")
    if num_samples > 1:
        raise InteractiveUsageError("--num-samples does not go with --interactive: it "
                                    "generates one stream")
    from .checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    model = CharRNN(ckpt.shape, ckpt.params)
    settings = Settings(temperature=temperature, length=length, top_k=top_k, top_p=top_p,
                        rng_seed=rng_seed)
    session = Session(model, ckpt.vocab, settings, skip_unknown=skip_unknown)
    shape = ckpt.shape
    session.message(f"charrnn: {path} ({shape.cell} x{shape.num_layers} hidden "
                    f"{shape.hidden_size}, vocab {shape.vocab_size}). Type a seed and press "
                    "Enter; :help lists the commands, Ctrl-D or :quit leaves.")
    session.run()
