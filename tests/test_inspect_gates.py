"""`charrnn inspect gates`: saturated fractions against an independent forward pass, the
CONTRACT JSON, chunking, the table, and the command line's errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn.checkpoint import save_checkpoint
from charrnn.cli import cli
from charrnn.config import config_from_dict
from charrnn.inspect.equations import SATURATING
from charrnn.inspect.gates import gate_saturation, mean_saturation
from charrnn.model import CharRNN, ModelShape
from charrnn.vocab import Vocab

TEXT = "".join(f"{w} (the cat) sat on 'a mat', and [then] it ran.\n"
               for w in ("Then", "So", "And", "But") * 12)
VOCAB = Vocab.build([TEXT])


def make_model(cell: str, H: int = 6, L: int = 2, E: int = 4, seed: int = 3,
               scale: float = 3.0) -> CharRNN:
    """A float64 model with weights scaled up so that some units saturate."""
    model = CharRNN.create(ModelShape(cell, VOCAB.size, H, L, E), seed, "float64")
    for k, w in model.params.items():
        if k.startswith("rnn."):
            w *= scale
    return model


def write_checkpoint(tmp_path: Path, model: CharRNN, config_dict, name="m.safetensors") -> Path:
    s = model.shape
    cfg = config_from_dict(config_dict(tmp_path / "corpus.txt", tmp_path / "run", model={
        "cell": s.cell, "hidden_size": s.hidden_size, "num_layers": s.num_layers,
        "embedding_size": s.embedding_size}))
    path = tmp_path / name
    save_checkpoint(path, model.params, config=cfg, vocab=VOCAB, step=1)
    return path


def reference_activations(model: CharRNN, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per layer, name -> (N, H): the production forward pass (charrnn.cells, tuned or
    compiled), one window over the whole stream, read from its cache."""
    _, _, cache = model.forward(ids[:, None], model.zero_state(1))
    H, cell = model.shape.hidden_size, model.shape.cell
    out = []
    for c in cache["caches"]:
        if cell == "rnn":
            out.append({"h": c["hs"][1:, 0].copy()})
            continue
        acts = c["acts"][:, 0]  # (N, G*H) the gate activations
        names = ("i", "f", "g", "o") if cell == "lstm" else ("r", "z", "n")
        d = {name: acts[:, j * H : (j + 1) * H].copy() for j, name in enumerate(names)}
        if cell == "lstm":
            d["cell"] = c["tanh_c"][:, 0].copy()
        out.append(d)
    return out


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fractions_match_a_direct_count_over_the_reference_forward(cell, both_paths) -> None:
    model = make_model(cell, E=4 if cell != "gru" else 0)  # gru: one-hot input
    ids, _ = VOCAB.encode(TEXT)
    report = gate_saturation(model.params, cell, ids, chunk=97)
    ref = reference_activations(model, ids)
    assert report.chars == len(ids) and len(report.layers) == 2
    some_saturated = 0.0
    for k, gates in enumerate(report.layers):
        assert list(gates) == [name for name, _ in SATURATING[cell]]
        for name, sigmoid in SATURATING[cell]:
            a = ref[k][name]  # (N, H)
            lo, hi = (0.1, 0.9) if sigmoid else (-0.9, 0.9)
            np.testing.assert_array_equal(gates[name].left, (a < lo).mean(axis=0))
            np.testing.assert_array_equal(gates[name].right, (a > hi).mean(axis=0))
            some_saturated += gates[name].left.sum() + gates[name].right.sum()
    assert some_saturated > 0  # the check compares something


def test_json_is_the_contract_object_and_chunking_changes_nothing() -> None:
    model = make_model("lstm", H=5)
    ids, _ = VOCAB.encode(TEXT)
    one = gate_saturation(model.params, "lstm", ids, chunk=100_000).to_json()
    many = gate_saturation(model.params, "lstm", ids, chunk=13).to_json()
    assert one == many
    obj = json.loads(json.dumps(one))
    assert list(obj) == ["cell", "chars", "layers"]
    assert obj["cell"] == "lstm" and obj["chars"] == len(ids)
    assert [layer["layer"] for layer in obj["layers"]] == [0, 1]
    for layer in obj["layers"]:
        assert list(layer) == ["layer", "gates"]
        assert list(layer["gates"]) == ["i", "f", "g", "o", "cell"]
        for g in layer["gates"].values():
            assert list(g) == ["left", "right"]
            assert len(g["left"]) == len(g["right"]) == 5
            assert all(isinstance(v, float) for v in g["left"] + g["right"])
            assert all(0 <= a and 0 <= b and a + b <= 1 for a, b in zip(g["left"], g["right"]))


def test_a_planted_forget_gate_saturates_and_the_table_says_so() -> None:
    model = make_model("lstm", H=4, L=1, scale=1.0)
    H = 4
    model.params["rnn.bias_ih_l0"][H : 2 * H] = 40.0  # f = 1: right-saturated always
    model.params["rnn.bias_ih_l0"][:H] = -40.0  # i = 0: left-saturated always
    ids, _ = VOCAB.encode(TEXT[:200])
    report = gate_saturation(model.params, "lstm", ids)
    f, i = report.layers[0]["f"], report.layers[0]["i"]
    np.testing.assert_array_equal(f.right, 1.0)
    np.testing.assert_array_equal(i.left, 1.0)
    assert f.mostly_saturated == 1.0
    table = report.table()
    assert "mostly saturated" in table and "more than half" in table
    f_row = next(line for line in table.splitlines() if line.split()[:2] == ["0", "f"])
    assert f_row.split()[-1] == "100.0%"
    # the training-time metric: the mean over gates and units of left + right
    sat = mean_saturation(model.params, "lstm", ids)
    want = np.mean([np.mean(s.left + s.right) for s in report.layers[0].values()])
    assert sat == pytest.approx([want])


# -- the command line -------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, ["inspect", "gates", *args], catch_exceptions=False)


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def checkpoint(tmp_path, config_dict) -> Path:
    return write_checkpoint(tmp_path, make_model("gru", H=5), config_dict)


def test_cli_json_and_table_and_checkpoint_untouched(checkpoint, tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:300] + "\u2603\u2603%", encoding="utf-8")  # 3 unknown chars
    before = (checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns)
    result = invoke("--checkpoint", str(checkpoint), "--text", str(text), "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["cell"] == "gru" and obj["chars"] == 300
    assert list(obj["layers"][1]["gates"]) == ["r", "z", "n"]
    assert "3 character(s) outside the vocabulary" in result.stderr
    result = invoke("--checkpoint", str(checkpoint), "--text", str(text))
    assert result.exit_code == 0
    assert "mostly saturated" in result.stdout and "3 character(s)" in result.stdout
    assert (checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "text.txt"]


def test_cli_bad_inputs_are_one_line_errors(checkpoint, tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:100], encoding="utf-8")
    one_line_error(invoke("--checkpoint", str(tmp_path / "nope"), "--text", str(text)), "nope")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    one_line_error(invoke("--checkpoint", str(corrupt), "--text", str(text)), "corrupt")
    one_line_error(invoke("--checkpoint", str(checkpoint), "--text", str(tmp_path / "no.txt")),
                   "no.txt")
    short = tmp_path / "short.txt"
    short.write_text("T\u2603\u2603", encoding="utf-8")  # 1 known character
    one_line_error(invoke("--checkpoint", str(checkpoint), "--text", str(short)), "at least 2")
    one_line_error(invoke("--checkpoint", str(checkpoint), "--text", str(text),
                          "--plot", str(tmp_path / "no" / "dir" / "g.png")), "cannot write")


def test_cli_plot_calls_the_plotting_module(checkpoint, tmp_path) -> None:
    plots = pytest.importorskip("charrnn.inspect.plots")
    if not hasattr(plots, "plot_gates"):
        pytest.skip("charrnn.inspect.plots.plot_gates does not exist yet")
    pytest.importorskip("matplotlib")
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:200], encoding="utf-8")
    out = tmp_path / "gates.png"
    result = invoke("--checkpoint", str(checkpoint), "--text", str(text), "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in result.stdout
