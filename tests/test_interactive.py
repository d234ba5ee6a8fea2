"""`charrnn sample --interactive`: command parsing, the session without a terminal, and the
real thing driven through a pseudo-terminal (typing, streaming, Ctrl-C, Ctrl-D)."""

from __future__ import annotations

import codecs
import io
import os
import re
import select
import signal
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from charrnn.cli import cli
from charrnn.interactive import (
    BadCommand,
    Command,
    Session,
    Settings,
    parse_command,
    parse_line,
)
from charrnn.model import CharRNN, ModelShape
from charrnn.sample import sample_text
from charrnn.vocab import Vocab

try:
    import pty
except ImportError:  # not on Windows: the terminal tests are skipped there
    pty = None

TEXT = "".join(f"{w} the cat sat on a mat.\n" for w in ("Then", "So", "Now") * 40)


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, command", [
    (":temperature 0.5", Command("temperature", 0.5, assign=True)),
    (":temp 0", Command("temperature", 0.0, assign=True)),
    (":length 200", Command("length", 200, assign=True)),
    (":top-k 5", Command("top-k", 5, assign=True)),
    (":top-k none", Command("top-k", 0, assign=True)),
    (":top-p 0.9", Command("top-p", 0.9, assign=True)),
    (":top-p none", Command("top-p", 1.0, assign=True)),
    (":seed 7", Command("seed", 7, assign=True)),
    (":seed none", Command("seed", None, assign=True)),
    (":rng-seed 3", Command("seed", 3, assign=True)),
    (":keep on", Command("keep", True, assign=True)),
    (":keep off", Command("keep", False, assign=True)),
    (":seed", Command("seed")),
    (":length", Command("length")),
    ("  :SHOW  ", None),  # leading blanks make it a seed
    (":show", Command("show")),
    (":reset", Command("reset")),
    (":help", Command("help")),
    (":quit", Command("quit")),
    (":q", Command("quit")),
])
def test_parse_commands(line, command) -> None:
    assert parse_line(line) == (command if command is not None else line)


@pytest.mark.parametrize("line", ["The cat", "", " ", "a:b"])
def test_other_lines_are_seeds_as_typed(line) -> None:
    assert parse_line(line) == line


def test_double_colon_is_a_seed_starting_with_colon() -> None:
    assert parse_line("::x") == ":x"


@pytest.mark.parametrize("text, words", [
    ("temperature -1", ["temperature", "-1"]),
    ("temperature abc", ["temperature", "abc"]),
    ("temperature nan", ["temperature"]),
    ("length 1.5", ["length", "1.5"]),
    ("length -3", ["length"]),
    ("top-k -1", ["top-k"]),
    ("top-p 0", ["top-p"]),
    ("top-p 1.5", ["top-p"]),
    ("seed -1", ["seed"]),
    ("seed x", ["seed"]),
    ("keep maybe", ["keep"]),
    ("reset now", ["reset"]),
    ("length 1 2", ["length"]),
    ("frobnicate", ["frobnicate", ":help"]),
    ("", [":help"]),
])
def test_bad_commands_are_one_line(text, words) -> None:
    with pytest.raises(BadCommand) as e:
        parse_command(text)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_settings_show_every_setting() -> None:
    s = Settings(temperature=0.5, top_k=5, rng_seed=None)
    shown = s.show()
    assert len(shown.splitlines()) == 6
    for line, value in zip(shown.splitlines(), ["0.5", "500", "5", "1", "none", "off"]):
        assert value in line
    s.apply(Command("seed", 7, assign=True))
    s.apply(Command("top-p", 0.9, assign=True))
    assert (s.rng_seed, s.top_p) == (7, 0.9)


# -- the session, without a terminal ------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_vocab():
    vocab = Vocab.build([TEXT])
    model = CharRNN.create(ModelShape("lstm", vocab.size, 16, 1, 8), seed=3)
    return model, vocab


def session(model_and_vocab, **settings) -> tuple[Session, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    model, vocab = model_and_vocab
    return Session(model, vocab, Settings(**settings), out=out, err=err), out, err


def test_a_line_is_charrnn_sample_with_the_same_settings(model_and_vocab) -> None:
    model, vocab = model_and_vocab
    s, out, _ = session(model_and_vocab, length=40, rng_seed=7, top_k=5, temperature=0.8)
    assert s.handle("So ") and s.handle("So ")  # keep off: the same line, the same text
    want = sample_text(model, vocab, "So ", 40, rng_seed=7, top_k=5, temperature=0.8)[0]
    assert out.getvalue() == (want + "\n") * 2
    s2, out2, _ = session(model_and_vocab, length=30, temperature=0)
    s2.handle("")  # an empty seed: the zero state's prediction, as `charrnn sample`
    assert out2.getvalue() == sample_text(model, vocab, "", 30, temperature=0)[0] + "\n"


def test_keep_continues_and_reset_starts_over(model_and_vocab) -> None:
    model, vocab = model_and_vocab
    s, out, err = session(model_and_vocab, length=25, temperature=0, keep=True)
    s.handle("Now ")
    s.handle("")  # an empty line continues where it stopped
    first, second = out.getvalue().split("\n")[:2]
    assert first + second == sample_text(model, vocab, "Now ", 50, temperature=0)[0]
    out.truncate(0)
    out.seek(0)
    s.handle(":reset")
    assert "zero state" in err.getvalue()
    s.handle("Now ")
    assert out.getvalue() == first + "\n"


def test_commands_change_and_show_the_settings(model_and_vocab) -> None:
    s, out, err = session(model_and_vocab)
    for line in [":temperature 0.5", ":length 7", ":top-k 3", ":top-p 0.8", ":seed 2",
                 ":keep on"]:
        assert s.handle(line)
    assert s.settings == Settings(0.5, 7, 3, 0.8, 2, True)
    assert s.handle(":temperature -2")  # refused, the loop goes on
    assert s.settings.temperature == 0.5
    assert "expected a number >= 0" in err.getvalue().splitlines()[-1]
    assert s.handle(":show") and "keep" in err.getvalue()
    assert s.handle(":help") and ":top-p" in err.getvalue()
    assert out.getvalue() == ""  # no text was generated
    assert s.handle(":quit") is False


def test_unknown_seed_characters(model_and_vocab) -> None:
    s, out, err = session(model_and_vocab, length=5)
    assert s.handle("So ☃") and out.getvalue() == ""
    assert "'☃'" in err.getvalue() and "--skip-unknown" in err.getvalue()
    assert len(err.getvalue().splitlines()) == 1
    s.skip_unknown = True
    s.handle("So ☃")
    assert out.getvalue().startswith("So ☃") and len(out.getvalue()) == len("So ☃") + 5 + 1
    assert "dropped" in err.getvalue()


def test_stop_ends_a_generation_and_keeps_the_state_consistent(model_and_vocab) -> None:
    model, vocab = model_and_vocab
    s, out, err = session(model_and_vocab, length=10**6, temperature=0, keep=True)
    written = []
    real_write = out.write

    def write(text: str) -> int:  # Ctrl-C after the 30th character
        written.append(text)
        if len(written) == 1 + 30:
            s.stop()
        return real_write(text)

    out.write = write
    assert s.generate("So ") == 30
    assert "stopped after 30" in err.getvalue()
    s.settings.length = 20
    s.generate("")  # continues right after the 30 characters shown
    text = "".join(out.getvalue().split("\n"))
    assert text == sample_text(model, vocab, "So ", 50, temperature=0)[0]


# -- through a pseudo-terminal ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained through `charrnn train`."""
    tmp = tmp_path_factory.mktemp("interactive")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE_DIR", str(tmp / "cache"))
        (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
        cfg = {
            "data": {"path": str(tmp / "corpus.txt"), "val_fraction": 0.1},
            "model": {"cell": "gru", "hidden_size": 16, "num_layers": 1, "embedding_size": 8},
            "train": {"batch_size": 8, "seq_length": 16, "max_steps": 30, "learning_rate": 0.02,
                      "eval_every": 30, "log_every": 10},
            "output": {"dir": str(tmp / "run"), "keep_last": 1},
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        r = CliRunner().invoke(cli, ["train", "--config", str(tmp / "config.yaml"),
                                     "--no-progress"])
        assert r.exit_code == 0, r.output
    return tmp / "run"


ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[=>])")


class Terminal:
    """`python -m charrnn.cli ARGS` on a pseudo-terminal, which is its controlling terminal:
    Ctrl-C typed there is SIGINT, as in a real one. Every wait has a timeout."""

    def __init__(self, *args: str):
        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: run charrnn, whatever happens never return to pytest
            try:
                os.execve(sys.executable, [sys.executable, "-m", "charrnn.cli", *args], env)
            finally:
                os._exit(127)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything read, \r and escape sequences dropped
        self.pos = 0  # what expect() has consumed
        self.eof = False

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            self.eof = True
            return
        self.text += self.decoder.decode(data)
        self.text = ESCAPES.sub("", self.text.replace("\r", ""))

    def expect(self, pattern: str, timeout: float = 5.0) -> re.Match:
        """Reads until `pattern` (a regex) occurs after what was consumed; consumes it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern, re.DOTALL).search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise AssertionError(f"{pattern!r} not seen; got {self.text[self.pos:]!r}")
            self._read(min(left, 0.5))

    def prompt(self, timeout: float = 5.0) -> str:
        """The text up to the next prompt."""
        return self.expect(r"(.*?)\n> ", timeout).group(1)

    def line(self, typed: str) -> str:
        """Types a line; the output it gave, the echo of the line left out."""
        self.send(typed + "\r")
        self.expect(re.escape(typed) + r"\n")
        return self.prompt()

    def wait(self, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)  # drain, so that the child never blocks on a full terminal
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError(f"no exit within {timeout} s; got {self.text[self.pos:]!r}")


@pytest.fixture
def terminal(run_dir):
    if pty is None:
        pytest.skip("needs a pseudo-terminal (pty)")
    terms: list[Terminal] = []

    def start(*args: str) -> Terminal:
        t = Terminal("sample", "--checkpoint", str(run_dir), "--interactive", *args)
        terms.append(t)
        t.prompt(timeout=30)  # the banner, then the first prompt (slow on a loaded machine)
        return t

    yield start
    for t in terms:  # a failed test leaves no process behind
        try:
            os.kill(t.pid, signal.SIGKILL)
            os.waitpid(t.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def sample_stdout(run_dir, *args: str) -> str:
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", str(run_dir), *args])
    assert r.exit_code == 0, r.output
    return r.stdout


def test_in_a_terminal(terminal, run_dir) -> None:
    t = terminal("--length", "40")
    assert len(t.line("Now ")) == len("Now ") + 40  # streamed with the starting settings
    assert "temperature  0 (greedy)" in t.line(":temperature 0")
    t.line(":length 60")
    greedy = sample_stdout(run_dir, "--seed", "Now ", "--length", "60", "--temperature", "0")
    assert t.line("Now ") + "\n" == greedy
    t.line(":temperature 1")
    t.line(":seed 7")
    assert t.line("So ") + "\n" == sample_stdout(run_dir, "--seed", "So ", "--length", "60",
                                                 "--rng-seed", "7")
    shown = t.line(":show")
    for setting in ["temperature  1", "length       60", "top-k        0", "top-p        1",
                    "seed         7", "keep         off"]:
        assert setting in shown, shown
    assert "expected a number >= 0" in t.line(":temperature hot")  # refused, goes on
    assert "not in the vocabulary" in t.line("Now ☃")
    t.line(":keep on")
    t.line(":temperature 0")
    assert "zero state" in t.line(":reset")
    first = t.line("Now ")
    second = t.line("")  # an empty line continues
    assert first + second + "\n" == sample_stdout(run_dir, "--seed", "Now ", "--length", "120",
                                                  "--temperature", "0")
    t.send(":quit\r")
    assert t.wait() == 0


def test_ctrl_c_stops_a_generation_and_ctrl_d_exits(terminal) -> None:
    t = terminal("--length", "1000000")
    t.send("So \r")
    t.expect(r"So \nSo .{300}")  # streaming
    t.send("\x03")  # Ctrl-C
    t.expect(r"stopped after \d+ characters")
    t.prompt()
    assert "length       1000000" in t.line(":length")  # the loop goes on
    t.send("abc")
    t.expect("abc")
    # Ctrl-C at the prompt cancels the line. Typed as a person would, not within
    # microseconds of the echo: CPython's readline checks for signals only when its select()
    # is interrupted, so a SIGINT that lands while it still handles the last key (after the
    # echo, before the next select) waits for the next key. A pty test answering the echo at
    # once hits that window on a loaded machine; no person can.
    time.sleep(0.3)
    t.send("\x03")
    t.prompt()
    assert t.line(":seed").strip() == "seed         none (random)"  # "abc" was dropped
    t.send("\x04")  # Ctrl-D
    assert t.wait() == 0


def test_refused_options(run_dir) -> None:
    for extra, name in [(["--seed", "So"], "--seed"), (["--num-samples", "2"], "--num-samples")]:
        r = CliRunner().invoke(cli, ["sample", "--checkpoint", str(run_dir), "--interactive",
                                     *extra])
        assert r.exit_code == 2, r.output
        assert r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and name in r.stderr


def test_lines_from_a_pipe(run_dir) -> None:
    """Without a terminal: no prompt, a line in, its text out; end of input exits 0."""
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", str(run_dir), "--interactive",
                                 "--temperature", "0", "--length", "30"], input="So \n")
    assert r.exit_code == 0, r.output
    assert r.stdout == sample_stdout(run_dir, "--seed", "So ", "--length", "30",
                                     "--temperature", "0")
    assert ":help" in r.stderr  # the banner
