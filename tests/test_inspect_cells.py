"""`charrnn inspect cells`: the detectors, the ranking, the surprisal, the page (escaping,
no network, structure) and the page in a real browser (headless Chromium), the CLI."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_inspect_gates import VOCAB, make_model, one_line_error, reference_activations
from test_inspect_gates import write_checkpoint as _write_checkpoint

from charrnn.cli import cli
from charrnn.inspect.cells import (
    DETECTORS,
    UnitRef,
    analyse,
    bracket_depth,
    correlations,
    detectors,
    line_features,
    rank_units,
    strings_and_comments,
    surprisal,
    unit_refs,
    warmup,
)
from charrnn.inspect.page import page_data, render_page
from charrnn.model import CharRNN, ModelShape
from charrnn.vocab import Vocab

TEXT = "".join(f"{w} (the cat) sat on 'a mat', and [then] it ran.\n"
               for w in ("Then", "So", "And", "But") * 12)


def marks(text: str, mask: np.ndarray) -> str:
    """The characters where mask is True, others as '.': easy to read in a failure."""
    return "".join(c if m else "." for c, m in zip(text, mask))


# -- detectors ----------------------------------------------------------------------------


def test_quotes_and_comments_in_code() -> None:
    text = "x = 'a#b'  # c \"d\"\ny = \"e\\\"f\" + f'{g}'\n"
    q, c = strings_and_comments(text)
    assert marks(text, q) == "....'a#b'..............\"e\\\"f\"....'{g}'."
    assert marks(text, c) == "...........# c \"d\"....................."


def test_triple_quotes_span_lines() -> None:
    text = 'a = """one\n"two" it\'s\n""" # x\nb'
    q, c = strings_and_comments(text)
    assert marks(text, q) == '....""' + '"one\n"two" it\'s\n"""' + "......"
    assert marks(text, c) == "." * 26 + "# x" + ".."


def test_apostrophes_are_not_quotes() -> None:
    text = "don't say 'stop o'er there' now\n'tis the end\nso 'it"
    q, _ = strings_and_comments(text)
    assert marks(text, q) == "..........'stop o'er there'....." + "." * 13 + "." * 6


def test_bracket_depth_counts_both_brackets_and_never_goes_below_zero() -> None:
    text = "a(b[c]d)e)f(g"
    np.testing.assert_array_equal(bracket_depth(text),
                                  [0, 1, 1, 2, 2, 2, 1, 1, 0, 0, 0, 1, 1])
    d = detectors("f('(', x) # (")["depth"]
    np.testing.assert_array_equal(d, [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])


def test_line_features() -> None:
    text = "ab cd\n  Ef(\n\n\tx"
    pos, indent, after_nl = line_features(text)
    np.testing.assert_array_equal(pos, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 0, 1])
    np.testing.assert_array_equal(indent, [0] * 6 + [2] * 6 + [0] + [1, 1])
    np.testing.assert_array_equal(after_nl, [0] * 6 + [1] + [0] * 5 + [1, 1, 0])
    d = detectors(text)
    assert list(d) == list(DETECTORS)
    assert marks(text, d["word_start"] > 0) == "a..c....E.....x"
    assert marks(text, d["upper"] > 0) == "........E......"


# -- ranking ------------------------------------------------------------------------------


def test_correlations_are_pearson_and_the_ranking_finds_a_planted_unit() -> None:
    rng = np.random.default_rng(0)
    text = TEXT * 2
    values = detectors(text)
    T = len(text)
    acts = rng.uniform(-1, 1, (T, 30)).astype(np.float32)  # (T, U) noise
    acts[:, 17] = 0.8 * values["quote"] - 0.4 + 0.05 * rng.standard_normal(T)  # a quote unit
    acts[:, 4] = -values["depth"] / 3  # a bracket unit, negative
    acts[:, 9] = 0.25  # a dead unit: constant
    corr = correlations(acts, values)  # (D, U)
    names = list(values)
    for d in (0, 2, 4):
        for u in (0, 4, 17):
            want = np.corrcoef(values[names[d]], acts[:, u].astype(np.float64))[0, 1]
            assert corr[d, u] == pytest.approx(want, abs=1e-6)
    assert np.all(corr[:, 9] == 0)
    ranked = rank_units(corr, names, top=3)
    assert ranked["quote"][0][0] == 17 and ranked["quote"][0][1] > 0.95
    assert ranked["depth"][0] == (4, pytest.approx(-1.0))
    assert ranked["comment"] == []  # no # in the text: the detector is constant


def test_analyse_ranks_a_unit_wired_to_upper_case_first() -> None:
    """A one-hot rnn whose unit 2 is +1 after an upper-case letter and -1 otherwise."""
    model = CharRNN.create(ModelShape("rnn", VOCAB.size, 4, 1, 0), 2, "float64")
    upper = np.array([c.isupper() for c in VOCAB.chars])  # (V,)
    model.params["rnn.weight_ih_l0"][2] = np.where(upper, 6.0, -6.0)
    model.params["rnn.weight_hh_l0"][2] = 0.0
    model.params["rnn.bias_ih_l0"][2] = model.params["rnn.bias_hh_l0"][2] = 0.0
    ids, _ = VOCAB.encode(TEXT)
    r = analyse(model.params, "rnn", ids, VOCAB.chars, TEXT, top=2)
    (u, rv), _ = r.ranked["upper"]
    assert str(r.units[u]) == "L0 h 2" and rv > 0.999


def test_the_first_line_is_the_warmup_when_short() -> None:
    assert warmup("rate, she\n" + "x" * 40) == 10
    assert warmup("x" * 40 + "\nab") == 0  # a long first line is the text itself
    assert warmup("no newline at all") == 0


def test_surprisal_and_top_predictions() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 9))  # (T, V)
    ids = rng.integers(0, 9, 6)
    s, top_ids, top_p = surprisal(logits, ids, k=5)
    assert np.isnan(s[0]) and np.all(top_ids[0] == -1)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for t in range(1, 6):
        assert s[t] == pytest.approx(-np.log(p[t - 1, ids[t]]))
        want = np.argsort(-p[t - 1])[:5]
        np.testing.assert_array_equal(top_ids[t], want)
        np.testing.assert_allclose(top_p[t], p[t - 1, want])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_analyse_reads_every_units_h_and_tanh_c(cell) -> None:
    model = make_model(cell, H=5)
    ids, _ = VOCAB.encode(TEXT)
    r = analyse(model.params, cell, ids, VOCAB.chars, TEXT)
    kinds = ["h", "cell"] if cell == "lstm" else ["h"]
    assert [(b.layer, b.kind) for b in r.blocks] == [(k, kind) for k in (0, 1) for kind in kinds]
    ref = reference_activations(model, ids)
    _, _, cache = model.forward(ids[:, None], model.zero_state(1))
    for b, block in enumerate(r.blocks):
        want = (cache["caches"][block.layer]["hs"][1:, 0] if block.kind == "h"
                else ref[block.layer]["cell"])
        np.testing.assert_allclose(r.acts[:, b * 5 : (b + 1) * 5], want, atol=1e-6)
    assert r.corr.shape == (len(DETECTORS), len(r.units))
    one = analyse(model.params, cell, ids, VOCAB.chars, TEXT, layers=[1])
    assert {b.layer for b in one.blocks} == {1}
    np.testing.assert_allclose(one.acts, r.acts[:, len(kinds) * 5 :])


# -- the page -----------------------------------------------------------------------------

NASTY = "<script>alert('x')</script> & \"q\" </pre> &amp; \u00e9\n\tdef f(a, [b]):  # c\n"


class Structure(HTMLParser):
    """Checks that every element closes in order, and collects what the tests look at."""

    VOID = {"meta", "input", "br", "link", "img", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.ids: dict[str, int] = {}
        self.text_spans = 0
        self.text_chars: list[str] = []
        self.scripts: list[str] = []
        self.errors: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = self.ids.get(a["id"], 0) + 1
        if tag in self.VOID:
            return
        if tag == "span" and self.stack[-1:] == ["pre"]:
            self.text_spans += 1
            self.text_chars.append("")
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        elif self.stack[-2:] == ["pre", "span"]:
            self.text_chars[-1] += data


def nasty_report():
    """The report of a small lstm over NASTY, with NASTY's own vocabulary."""
    vocab = Vocab.build([NASTY])
    model = CharRNN.create(ModelShape("lstm", vocab.size, 4, 2, 3), 5, "float64")
    ids, _ = vocab.encode(NASTY)
    return analyse(model.params, "lstm", ids, vocab.chars, NASTY), vocab


def test_page_escapes_every_character_and_needs_no_network() -> None:
    r, vocab = nasty_report()
    page = render_page(r)
    assert "<script>alert" not in page and "</pre> &amp;" not in page
    for escaped in ("&lt;", "&gt;", "&amp;", "&quot;", "&#x27;"):
        assert f"<span>{escaped}</span>" in page, escaped
    assert not re.search(r"https?://", page, re.I), "the page refers to the network"
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=", page, re.I)
    p = Structure()
    p.feed(page)
    p.close()
    assert p.errors == [] and p.stack == []
    assert all(p.ids[i] == 1 for i in ("text", "data", "view", "layer", "kind", "unit"))
    assert p.text_spans == len(NASTY)
    assert "".join(p.text_chars) == NASTY.replace("\n", "\u21b5")
    assert len(p.scripts) == 2  # the data, the code
    data = json.loads(p.scripts[0])
    assert data == json.loads(json.dumps(page_data(r)))


def test_page_data_round_trips_the_activations() -> None:
    r, _ = nasty_report()
    data = page_data(r)
    q = np.frombuffer(base64.b64decode(data["acts"]), np.int8)
    T, U = r.acts.shape
    H = data["blocks"][0]["H"]
    q = q.reshape(len(data["blocks"]), H, T).astype(np.float64) / data["scale"]  # (B, H, T)
    np.testing.assert_allclose(q.transpose(2, 0, 1).reshape(T, U), r.acts, atol=0.5 / 127 + 1e-6)
    assert len(data["surprisal"]) == T and data["surprisal"][0] is None
    assert len(data["top_ids"]) == len(data["top_p"]) == T * data["k"]
    assert len(data["detectors"]) == len(DETECTORS)
    ranked_first = next(v[0][0] for v in r.ranked.values() if v)
    d = data["default"]
    assert unit_refs(r.blocks)[ranked_first] == UnitRef(d["layer"], d["kind"], d["unit"])


# -- the command line -----------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, ["inspect", "cells", *args], catch_exceptions=False)


@pytest.fixture
def checkpoint(tmp_path, config_dict) -> Path:
    return _write_checkpoint(tmp_path, make_model("lstm", H=6), config_dict)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT + "\u2603\u2603", encoding="utf-8")  # 2 unknown
    return path


def test_cli_writes_the_page_and_leaves_the_checkpoint_alone(checkpoint, text_file,
                                                             tmp_path) -> None:
    out = tmp_path / "out" / "cells.html"
    out.parent.mkdir()
    before = (checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns)
    result = invoke("--checkpoint", str(checkpoint), "--text", str(text_file),
                    "--html", str(out), "--max-chars", "300", "--top", "2")
    assert result.exit_code == 0, result.output
    assert (checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns) == before
    assert [p.name for p in out.parent.iterdir()] == ["cells.html"]  # no temporary left
    assert f"wrote {out}" in result.stdout
    assert "300 characters shown; 2 outside the vocabulary skipped" in result.stdout
    quote_line = next(line for line in result.stdout.splitlines()
                      if line.strip().startswith("quote"))
    assert len(re.findall(r"L\d (h|cell) \d+ +[+-]\d\.\d{3}", quote_line)) == 2
    assert "not in this text (constant): comment" in result.stdout
    page = out.read_text(encoding="utf-8")
    assert page.count("<span") >= 300


def test_cli_bad_inputs_are_one_line_errors(checkpoint, text_file, tmp_path) -> None:
    out = str(tmp_path / "p.html")
    one_line_error(invoke("--checkpoint", str(tmp_path / "gone"), "--text", str(text_file),
                          "--html", out), "gone")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    one_line_error(invoke("--checkpoint", str(corrupt), "--text", str(text_file),
                          "--html", out), "corrupt.safetensors")
    short = tmp_path / "short.txt"
    short.write_text("\u2603T\u2603", encoding="utf-8")
    one_line_error(invoke("--checkpoint", str(checkpoint), "--text", str(short),
                          "--html", out), "at least 2")
    one_line_error(invoke("--checkpoint", str(checkpoint), "--text", str(text_file),
                          "--html", str(tmp_path / "no" / "such" / "dir.html")), "cannot write")
    one_line_error(invoke("--checkpoint", str(checkpoint), "--text", str(text_file),
                          "--html", out, "--layer", "2"), "--layer 2", "0..1")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "best.safetensors")
    (run / "config.yaml").write_text("{}", encoding="utf-8")
    one_line_error(invoke("--checkpoint", str(run), "--text", str(text_file),
                          "--html", str(run / "cells.html")), "run directory")
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "config.yaml"]
    assert not Path(out).exists()


# -- in a real browser ----------------------------------------------------------------------


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
                  "--v=0", "--host-resolver-rules=MAP * ~NOTFOUND"]  # a fetch would fail, loudly


def load_in_chromium(binary: str, jobs: list[tuple[str, list[str]]],
                     tmp: Path) -> list[tuple[str, str, list[str]]]:
    """Dump the DOM of each (url, extra flags) after load, all in parallel: [(dom, log,
    the http(s) URLs the page asked for)]. The URLs come from Chromium's net log, less the
    browser's own background requests to Google's hosts (which the resolver rule fails)."""
    procs = []
    for n, (url, extra) in enumerate(jobs):
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / f'profile{n}'}",
               f"--log-net-log={tmp / f'net{n}.json'}", *extra, "--dump-dom", url]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, encoding="utf-8", errors="replace"))
    out = []
    for n, p in enumerate(procs):
        try:
            dom, log = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            dom, log = p.communicate()
        assert p.returncode == 0, log[-2000:]
        net = tmp / f"net{n}.json"
        urls = re.findall(r'"url":"(https?://[^"]+)"', net.read_text("utf-8", "replace")
                          if net.exists() else "")
        out.append((dom, log, [u for u in set(urls) if not re.match(
            r"https?://[^/]*\.(google\.com|googleapis\.com|gstatic\.com)[:/]", u)]))
    return out


def console_messages(log: str) -> list[str]:
    """What the page wrote to the console, errors included (Chromium logs each as CONSOLE)."""
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def span_colours(dom: str) -> list[str]:
    text = dom[dom.index('id="text"') :]
    text = text[: text.index("</pre>")]
    return re.findall(r'<span[^>]*style="background-color: ([^;"]+);?"', text)


def test_the_page_in_headless_chromium(checkpoint, text_file, tmp_path) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    out = tmp_path / "cells.html"
    result = invoke("--checkpoint", str(checkpoint), "--text", str(text_file),
                    "--html", str(out), "--max-chars", "400")
    assert result.exit_code == 0, result.output
    broken = tmp_path / "broken.html"
    broken.write_text(out.read_text(encoding="utf-8").replace(
        "var T = D.T;", "var T = D.T; undefinedFunction();", 1).replace(
        "</body>", '<img src="https://cdn.example.invalid/x.png"></body>'), encoding="utf-8")
    # the picker: change the unit box as a user would; its handler sets the hash, and the
    # hashchange handler repaints (asynchronous: the virtual time budget lets it run)
    picked = tmp_path / "picked.html"
    picked.write_text(out.read_text(encoding="utf-8").replace("</body>", (
        "<script>window.addEventListener('load', function () {"
        " var u = document.getElementById('unit'); u.value = '5';"
        " u.dispatchEvent(new Event('change')); });</script></body>")), encoding="utf-8")
    url = out.as_uri()
    wait = ["--virtual-time-budget=5000"]
    loads = load_in_chromium(
        binary, [(url + "#view=unit&layer=1&kind=cell&unit=2", []),
                 (url + "#view=unit&layer=0&kind=h&unit=3", []),
                 (url + "#view=surprisal&layer=0&kind=h&unit=3", []),
                 (url, []),
                 (picked.as_uri() + "#layer=1&kind=h&unit=0", wait),
                 (broken.as_uri(), [])], tmp_path)
    (a, b, s, d, p, _), (*logs, log_x) = [dom for dom, _, _ in loads], [lg for _, lg, _ in loads]
    # the checks are real: a broken page's error and its request are caught
    assert any("undefinedFunction" in m for m in console_messages(log_x)), log_x[-3000:]
    assert loads[-1][2] == ["https://cdn.example.invalid/x.png"]
    for log in logs:
        assert console_messages(log) == []
    for _, _, urls in loads[:-1]:
        assert urls == []  # the page asks the network for nothing
    for dom in (a, b, s, d, p):
        assert len(span_colours(dom)) == 400, dom[:500]
    assert 'data-unit="1/cell/2"' in a and 'data-unit="0/h/3"' in b
    assert span_colours(a) != span_colours(b)  # another unit, other colours
    assert 'data-view="surprisal"' in s and span_colours(s) != span_colours(b)
    assert span_colours(s)[0] == "rgb(225, 225, 225)"  # the first char has no prediction
    # no hash: the top unit of the first detector present in the text
    data = json.loads(re.search(r'id="data">(.*?)</script>', out.read_text("utf-8")).group(1))
    dflt = data["default"]
    assert f'data-unit="{dflt["layer"]}/{dflt["kind"]}/{dflt["unit"]}"' in d
    assert 'data-unit="1/h/5"' in p  # the picker went through the hash
    assert span_colours(p) != span_colours(b)
