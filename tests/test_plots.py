"""Plots: `charrnn plot` over real (tiny) runs, the inspect plots from their JSON objects,
bad input, and the behaviour without matplotlib (the optional [plot] extra)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from charrnn.cli import cli
from charrnn.config import config_from_dict
from charrnn.errors import CharRNNError, DataError, MissingExtraError, RunDirError
from charrnn.train import train

pytest.importorskip("matplotlib")

from charrnn.inspect import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXTRA = "charrnn[plot]"
QUIET = {"progress": False, "echo": lambda s: None}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_png(path: Path, min_bytes: int = 10_000) -> tuple[int, int]:
    """A whole PNG file of some substance; returns its (width, height)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, data[:16]
    assert data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    assert len(data) > min_bytes, len(data)
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 300
    return width, height


def assert_one_line_error(result, *names: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:"), result.stderr
    for name in names:
        assert name in last, (name, last)
    return last


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: a 2-layer lstm with validation and clipping, a 1-layer gru without
    validation. Trained with the signals, so every panel has something to draw."""
    from conftest import small_text, tiny_config_dict

    tmp = tmp_path_factory.mktemp("plots")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE_DIR", str(tmp / "cache"))
        (tmp / "corpus.txt").write_text(small_text(), encoding="utf-8")
        a = tiny_config_dict(tmp / "corpus.txt", tmp / "lstm", model={"num_layers": 2},
                             train={"max_steps": 30, "grad_clip": 0.45})
        b = tiny_config_dict(tmp / "corpus.txt", tmp / "gru", model={"cell": "gru"},
                             data={"val_fraction": 0.0}, train={"max_steps": 30})
        for d in (a, b):
            train(config_from_dict(d), **QUIET)
    return tmp, tmp / "lstm", tmp / "gru"


# -- charrnn plot ------------------------------------------------------------------------------


def test_plot_two_runs(runs) -> None:
    tmp, a, b = runs
    out = tmp / "curves.png"
    result = run("plot", str(a), str(b), "--output", str(out), "--label", "LSTM",
                 "--label", "GRU")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}"
    assert_png(out, min_bytes=30_000)
    assert not [p for p in tmp.iterdir() if p.name.endswith(".tmp")]  # written atomically
    assert {"val_gate_saturation", "sigma_max_hh", "clip_fraction"} <= set(
        json.loads((a / "metrics.jsonl").read_text().splitlines()[-1]))


def test_plot_tolerates_a_truncated_last_line(runs, tmp_path) -> None:
    _, a, _ = runs
    lines = (a / "metrics.jsonl").read_text().splitlines()
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:17])
    rows = plots.read_metrics(run_dir)
    assert len(rows) == len(lines) - 1
    with pytest.raises(DataError, match="line 2 is not JSON"):
        (run_dir / "metrics.jsonl").write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
        plots.read_metrics(run_dir)


@pytest.mark.parametrize("case", ["no dir", "no metrics", "empty metrics"])
def test_plot_bad_run_dirs_are_one_line_errors(runs, tmp_path, case) -> None:
    _, a, _ = runs
    bad = tmp_path / "bad"
    if case != "no dir":
        bad.mkdir()
    if case == "empty metrics":
        (bad / "metrics.jsonl").write_text("\n")
    named = bad / "metrics.jsonl" if case != "no dir" else bad
    result = run("plot", str(a), str(bad), "--output", str(tmp_path / "x.png"))
    assert_one_line_error(result, str(named))
    assert not (tmp_path / "x.png").exists()


def test_plot_bad_output_and_labels(runs, tmp_path) -> None:
    _, a, b = runs
    assert_one_line_error(run("plot", str(a), "--output", str(tmp_path / "no" / "x.png")),
                          str(tmp_path / "no" / "x.png"))
    assert_one_line_error(run("plot", str(a), "--output", str(tmp_path)), str(tmp_path))
    assert_one_line_error(run("plot", str(a), str(b), "--output", str(tmp_path / "x.png"),
                              "--label", "one"), "--label")
    assert run("plot", "--output", str(tmp_path / "x.png")).exit_code == 2  # no RUN_DIR
    assert "[default:" in run("plot", "--help").output


def test_labels_are_made_unique(tmp_path) -> None:
    paths = [tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "y" / "other"]
    assert plots._unique_labels(paths) == ["x/run", "y/run", "other"]
    assert plots._unique_labels([tmp_path / "a", tmp_path / "a"]) == [
        f"{tmp_path.name}/a (1)", f"{tmp_path.name}/a (2)"]


# -- the inspect plots, from their CONTRACT objects ---------------------------------------------


def gradients_report(cell: str, K: int = 30, L: int = 2) -> dict:
    gates = {"rnn": "h", "lstm": "ifgo", "gru": "rzn"}[cell]
    return {
        "cell": cell, "max_lag": K, "windows": 4, "prime": 20,
        "layers": [{"layer": k, "lag": list(range(K + 1)),
                    "grad_norm": [0.8 * 0.6 ** (i * (k + 1)) for i in range(K + 1)],
                    "jacobian_norm": [0.9 ** i for i in range(K + 1)],
                    "weights": {g: {"spectral_radius": 0.9, "sigma_max": 1.1 + k}
                                for g in gates}} for k in range(L)],
    }


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_plot_gradients(tmp_path, cell) -> None:
    out = tmp_path / "grad.png"
    plots.plot_gradients(gradients_report(cell), out)
    assert_png(out)


def test_plot_gates(tmp_path) -> None:
    H = 40
    grid = [i / H for i in range(H)]
    report = {"cell": "lstm", "chars": 1000, "layers": [
        {"layer": k, "gates": {g: {"left": grid, "right": [(1 - x) * 0.5 for x in grid]}
                               for g in ("i", "f", "g", "o", "cell")}} for k in range(2)]}
    out = tmp_path / "gates.png"
    plots.plot_gates(report, out)
    assert_png(out)


def test_an_unwritable_plot_path_is_a_charrnn_error(tmp_path) -> None:
    with pytest.raises(RunDirError, match="missing"):
        plots.plot_gradients(gradients_report("gru", K=3, L=1), tmp_path / "missing" / "g.png")


# -- without matplotlib ---------------------------------------------------------------------------


def test_importing_charrnn_does_not_import_matplotlib() -> None:
    code = ("import sys, charrnn, charrnn.cli, charrnn.train, charrnn.inspect.plots; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_without_matplotlib_plotting_exits_2_naming_the_extra(runs, monkeypatch) -> None:
    tmp, a, _ = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install \"charrnn\[plot\]\""):
        plots.require_matplotlib()
    for call in (lambda: plots.plot_gradients(gradients_report("rnn"), tmp / "g.png"),
                 lambda: plots.plot_gates({"cell": "rnn", "chars": 1, "layers": []},
                                          tmp / "s.png")):
        with pytest.raises(CharRNNError, match=re.escape(EXTRA)):
            call()
    out = tmp / "none.png"
    result = run("plot", str(a), "--output", str(out))
    assert_one_line_error(result, EXTRA, "matplotlib")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("command", ["gradients", "gates"])
def test_without_matplotlib_inspect_plot_exits_2(runs, monkeypatch, command) -> None:
    """`inspect ... --plot`: the table and JSON need no extra, the plot does."""
    if command not in getattr(cli.commands.get("inspect"), "commands", {}):
        pytest.skip(f"charrnn inspect {command} is not there yet")
    tmp, a, _ = runs
    text = tmp / "text.txt"
    text.write_text("the cat sat on the mat. " * 20, encoding="utf-8")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = ["inspect", command, "--checkpoint", str(a), "--text", str(text)]
    if command == "gradients":
        args += ["--max-lag", "5", "--windows", "2", "--prime", "10"]
    assert run(*args, "--json").exit_code == 0
    out = tmp / f"{command}.png"
    assert_one_line_error(run(*args, "--plot", str(out)), EXTRA)
    assert not out.exists()
