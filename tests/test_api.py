"""The Python API (charrnn.load / Model / charrnn.train): the same results as the commands,
CharRNNError subclasses for bad input, and the README's examples run as doctests."""

from __future__ import annotations

import doctest
import json
import math
import pydoc
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
from charrnn.cli import cli
from charrnn.model import CharRNN
from charrnn.sample import next_char_probs

ROOT = Path(__file__).resolve().parent.parent
TEXT = "".join(
    f"{w} the cat sat on a mat, and then it ran.\n" for w in
    ("Then", "So", "And", "But", "Yet", "Now") * 60
)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained through charrnn.train, with the rows its callback received."""
    tmp = tmp_path_factory.mktemp("api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE_DIR", str(tmp / "cache"))
        (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
        config = {
            "data": {"path": str(tmp / "corpus.txt"), "val_fraction": 0.1},
            "model": {"cell": "lstm", "hidden_size": 8, "num_layers": 1, "embedding_size": 4},
            "train": {"batch_size": 8, "seq_length": 16, "max_steps": 10, "eval_every": 10,
                      "log_every": 5},
            "output": {"dir": str(tmp / "unused")},
        }
        rows: list[dict] = []
        result = charrnn.train(config, overrides={
            "output.dir": str(tmp / "run"), "train.max_steps": "30", "model.hidden_size": 20,
            "model.cell": "gru", "train.learning_rate": 0.02}, callback=rows.append)
    return tmp, result, rows


# -- train ----------------------------------------------------------------------------------


def test_train_applies_overrides_and_calls_back_every_row(trained) -> None:
    tmp, result, rows = trained
    assert isinstance(result, charrnn.TrainResult)
    assert result.steps == 30 and result.run_dir == tmp / "run"
    model = charrnn.load(result.run_dir)
    assert model.config["model"]["cell"] == "gru" and model.config["model"]["hidden_size"] == 20
    logged = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == logged and len(rows) >= 6  # every row, in order, as written
    assert any("val_loss" in r for r in rows)


# -- sample ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,options,kwargs", [
    ("The cat", ["--length", "100", "--rng-seed", "5"], {"length": 100, "rng_seed": 5}),
    ("Now ", ["--length", "60", "--temperature", "0"], {"length": 60, "temperature": 0}),
    ("So", ["--length", "80", "--top-k", "5", "--rng-seed", "1"],
     {"length": 80, "top_k": 5, "rng_seed": 1}),
    ("But", ["--length", "70", "--top-p", "0.8", "--temperature", "1.3", "--rng-seed", "2"],
     {"length": 70, "top_p": 0.8, "temperature": 1.3, "rng_seed": 2}),
    ("", ["--length", "40", "--rng-seed", "0"], {"length": 40, "rng_seed": 0}),
    ("And", ["--length", "0"], {"length": 0}),
    ("the ☃ %cat", ["--length", "30", "--skip-unknown", "--rng-seed", "3"],
     {"length": 30, "skip_unknown": True, "rng_seed": 3}),
])
def test_sample_is_what_the_cli_prints(trained, seed, options, kwargs) -> None:
    run_dir = str(trained[1].run_dir)
    r = run("sample", "--checkpoint", run_dir, "--seed", seed, *options)
    assert r.exit_code == 0, r.output
    model = charrnn.load(run_dir)
    text = model.sample(seed, **kwargs)
    assert r.stdout == text + "\n"
    assert text.startswith(seed) and len(text) == len(seed) + kwargs["length"]
    pieces = list(model.stream(seed, **kwargs))
    assert "".join(pieces) == text
    assert len(pieces) == (1 if seed else 0) + kwargs["length"]  # the seed, then each char
    assert "".join(model.stream(seed, **kwargs, include_seed=False)) == text[len(seed):]


def test_num_samples_are_what_the_cli_prints(trained) -> None:
    run_dir = str(trained[1].run_dir)
    r = run("sample", "--checkpoint", run_dir, "--seed", "Yet", "--length", "50",
            "--num-samples", "3", "--rng-seed", "9", "--top-p", "0.9")
    model = charrnn.load(run_dir)
    texts = model.samples(3, "Yet", 50, top_p=0.9, rng_seed=9)
    assert len(set(texts)) == 3 and r.stdout == "\n\n".join(texts) + "\n"
    order = [i for i, _ in model.stream_samples(3, "Yet", 50, top_p=0.9, rng_seed=9)]
    assert order == [0] * 51 + [1, 2]  # sample 0 streamed, then the others whole
    r = run("sample", "--checkpoint", run_dir, "--length", "0", "--num-samples", "2")
    assert r.stdout == "\n\n\n"


def test_num_samples_print_as_the_batch_runs(trained, monkeypatch) -> None:
    """The first of --num-samples N is written as each step is drawn, the others (which
    finish with it) right after the batch's last step."""
    import charrnn.api as api

    events: list[str] = []
    real_generate = api.generate

    def generate(*args, **kwargs):
        for ids in real_generate(*args, **kwargs):
            events.append("<step>")
            yield ids

    class Out:
        def write(self, text: str) -> None:
            events.append(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(api, "generate", generate)
    monkeypatch.setattr(sys, "stdout", Out())
    cli.main(["sample", "--checkpoint", str(trained[1].run_dir), "--seed", "So", "--length",
              "5", "--num-samples", "3", "--rng-seed", "4"], standalone_mode=False)
    monkeypatch.undo()
    assert events[0] == "So" and events[1:11:2] == ["<step>"] * 5
    assert all(len(e) == 1 for e in events[2:11:2])  # sample 1, a character after each step
    assert events[11:] == ["\n\n", events[12], "\n\n", events[14], "\n"]
    assert len(events[12]) == len(events[14]) == 7


def test_unknown_seed_characters_are_refused(trained) -> None:
    model = charrnn.load(trained[1].run_dir)
    with pytest.raises(charrnn.VocabError, match="'☃'"):
        model.sample("a ☃ b", length=5)
    with pytest.raises(charrnn.VocabError):
        next(model.stream("☃"))  # before any piece comes out


# -- score, next_char_probs, properties -------------------------------------------------------


def test_score_is_what_eval_reports(trained, tmp_path) -> None:
    run_dir = str(trained[1].run_dir)
    model = charrnn.load(run_dir)
    held_out = "Then the cat ☃ sat on a mat%, and then it ran 7 times.\r\nSo the cat sat.\n" * 30
    path = tmp_path / "held.txt"
    path.write_bytes(held_out.encode("utf-8"))
    r = run("eval", "--checkpoint", run_dir, "--text", str(path), "--json")
    assert r.exit_code == 0, r.output
    result = model.score(held_out)
    assert isinstance(result, charrnn.EvalResult)
    assert result.to_json() == json.loads(r.stdout)  # exactly: the same floats
    assert result.unknown_chars == 4 * 30 and result.chars > 0  # ☃ % 7 \r
    assert model.score_file(path) == result
    with pytest.raises(charrnn.VocabError, match="'☃'"):
        model.score(held_out, unknown="error")
    with pytest.raises(charrnn.DataError):
        model.score("")


def test_next_char_probs(trained) -> None:
    model = charrnn.load(trained[1].run_dir)
    ckpt_model = CharRNN(model._ckpt.shape, model._ckpt.params)
    for context in ("", "T", "Then the c"):
        probs = model.next_char_probs(context)
        assert list(probs) == model.vocab
        assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)
        ids, _ = model._ckpt.vocab.encode(context)
        if context:
            logits, _, _ = ckpt_model.forward(ids.astype(np.int64)[:, None],
                                              ckpt_model.zero_state(1))
            logits = logits[-1:]
        else:
            logits = ckpt_model.params["head.bias"][None, :]
        np.testing.assert_array_equal(list(probs.values()), next_char_probs(logits, 1.0)[0])
    assert max(model.next_char_probs("Then the c").items(), key=lambda kv: kv[1])[0] == "a"
    greedy = model.next_char_probs("Then the c", temperature=0)
    assert sorted(greedy.values())[-2:] == [0.0, 1.0]
    top2 = model.next_char_probs("Then", top_k=2)
    assert sum(v > 0 for v in top2.values()) == 2


def test_properties(trained) -> None:
    model = charrnn.load(trained[1].run_dir / "best.safetensors")
    assert model.vocab == sorted(set(TEXT))
    assert model.num_params == sum(p.size for p in model._ckpt.params.values())
    assert model.config["output"]["dir"] == str(trained[1].run_dir)
    model.config["model"]["cell"] = "rnn"  # a copy
    assert model.config["model"]["cell"] == "gru"
    assert "gru x1 hidden 20" in repr(model)


# -- errors ---------------------------------------------------------------------------------


def test_errors_are_charrnn_errors(trained, tmp_path) -> None:
    tmp, result, _ = trained
    good = (result.run_dir / "best.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty_run").mkdir()
    for bad in ("absent.safetensors", "truncated.safetensors", "junk.safetensors",
                "empty_run"):
        with pytest.raises(charrnn.CheckpointError, match=re.escape(bad)):
            charrnn.load(tmp_path / bad)
    with pytest.raises(charrnn.ArgumentError):
        charrnn.load(None)  # type: ignore[arg-type]
    model = charrnn.load(result.run_dir)
    for kwargs in ({"temperature": -1}, {"temperature": float("nan")}, {"top_p": 0},
                   {"top_p": 1.5}, {"top_k": -2}, {"length": -1}, {"length": 2.5},
                   {"rng_seed": -3}, {"seed": 5}):
        with pytest.raises(charrnn.ArgumentError):
            model.sample(**kwargs)
    with pytest.raises(charrnn.ArgumentError):
        model.samples(0)
    with pytest.raises(charrnn.ArgumentError):
        model.score("Then the cat", unknown="drop")
    with pytest.raises(charrnn.DataError, match="gone.txt"):
        model.score_file(tmp_path / "gone.txt")
    config = tmp / "run" / "config.yaml"
    with pytest.raises(charrnn.ConfigError, match="model.hidden_size"):
        charrnn.train(config, overrides={"model.hiden_size": 8})
    with pytest.raises(charrnn.ConfigError, match="model.hidden_size"):
        charrnn.train(config, overrides={"model.hidden_size": "big"})
    with pytest.raises(charrnn.ConfigError, match="missing.yaml"):
        charrnn.train(tmp_path / "missing.yaml")
    with pytest.raises(charrnn.RunDirError, match="--resume"):
        charrnn.train(config)  # the run directory already holds checkpoints
    with pytest.raises(charrnn.ArgumentError):
        charrnn.train(config, overrides="model.hidden_size=8")  # type: ignore[arg-type]
    for name in ("CharRNNError", "ArgumentError", "CheckpointError", "ConfigError",
                 "DataError", "MissingExtraError", "NonFiniteError", "RunDirError",
                 "TrainingInterrupted", "VocabError"):
        assert issubclass(getattr(charrnn, name), charrnn.CharRNNError)


# -- the package ----------------------------------------------------------------------------


def test_help_and_exports() -> None:
    page = pydoc.render_doc(charrnn, renderer=pydoc.plaintext)
    assert "load(path)" in page and "train(config" in page and "Model.sample" in page
    assert set(charrnn.__all__) <= set(dir(charrnn))
    for name in ("load", "Model", "EvalResult", "TrainResult"):
        assert getattr(charrnn, name).__doc__
    assert callable(charrnn.train) and charrnn.train.Trainer  # the function and the module


def test_import_is_cheap() -> None:
    code = "import sys, charrnn; print(sorted({'numpy', 'yaml', 'click'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# -- the README's examples --------------------------------------------------------------------


def readme_examples() -> str:
    """The ```pycon blocks of the README's "Using charrnn from Python" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using charrnn from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```pycon\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    return "\n".join(blocks)


def test_readme_python_examples(tmp_path, monkeypatch) -> None:
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "configs" / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    test = doctest.DocTestParser().get_doctest(readme_examples(), {}, "README.md",
                                               str(ROOT / "README.md"), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures = []
    runner.run(test, out=failures.append)
    assert runner.failures == 0, "".join(failures)
    assert runner.tries >= 15
