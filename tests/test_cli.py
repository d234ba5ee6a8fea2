"""The command line, end to end: through click's CliRunner and as a real process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from charrnn.checkpoint import load_checkpoint
from charrnn.cli import cli
from charrnn.evaluate import evaluate_file
from charrnn.model import CharRNN, token_nll
from charrnn.sample import sample_text

TEXT = "".join(
    f"{w} the cat sat on a mat, and then it ran.\n" for w in
    ("Then", "So", "And", "But", "Yet", "Now") * 60
)
UNKNOWN = "☃%7"  # none of these occur in TEXT


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def assert_usage_error(result, *names: str, max_lines: int = 1) -> str:
    """Exit 2, a short message on stderr that names what is at fault, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    lines = err.splitlines()
    assert 1 <= len(lines) <= max_lines, err
    assert lines[-1].startswith("Error:"), err
    for name in names:
        assert name in lines[-1], (name, err)
    assert result.stdout == ""
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained through `charrnn train`: (tmp dir, run dir, config path)."""
    tmp = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE_DIR", str(tmp / "cache"))
        (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
        cfg = {
            "data": {"path": str(tmp / "corpus.txt"), "val_fraction": 0.1},
            "model": {"cell": "gru", "hidden_size": 24, "num_layers": 1, "embedding_size": 8},
            "train": {"batch_size": 8, "seq_length": 32, "max_steps": 60, "learning_rate": 0.02,
                      "eval_every": 30, "log_every": 10},
            "output": {"dir": str(tmp / "run"), "keep_last": 2},
        }
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        result = run("train", "--config", str(config), "--no-progress")
        assert result.exit_code == 0, result.output
        assert "trained 60 steps" in result.stdout
        assert "val loss" in result.stderr  # one line per evaluation without the bar
    return tmp, tmp / "run", config


# -- train ----------------------------------------------------------------------------------


def test_train_writes_the_run(trained) -> None:
    _, run_dir, _ = trained
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "vocab.json", "metrics.jsonl", "best.safetensors",
            "ckpt-00000060.safetensors"} <= names
    assert load_checkpoint(run_dir / "ckpt-00000060.safetensors").step == 60


def test_train_set_overrides_and_refuses_to_clobber(trained, tmp_path) -> None:
    tmp, _, config = trained
    out = tmp_path / "other"
    args = ["train", "--config", str(config), "--no-progress", "--set", f"output.dir={out}",
            "--set", "train.max_steps=4", "--set", "model.cell=rnn"]
    assert run(*args).exit_code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["model"]["cell"] == "rnn"
    again = run(*args)
    assert_usage_error(again, str(out), "--resume")
    more = run(*args[:-4], "--set", "train.max_steps=8", "--set", "model.cell=rnn", "--resume")
    assert more.exit_code == 0, more.output
    assert "trained 8 steps" in more.stdout
    changed = run(*args[:-4], "--set", "train.max_steps=12", "--resume")  # cell back to gru
    assert_usage_error(changed, "model")
    both = run(*args, "--resume", "--overwrite")
    assert both.exit_code == 2 and "--overwrite" in both.stderr


# -- sample ---------------------------------------------------------------------------------


def test_sample_prints_seed_then_exactly_length_chars(trained) -> None:
    _, run_dir, _ = trained
    r = run("sample", "--checkpoint", str(run_dir), "--seed", "The cat", "--length", "100",
            "--rng-seed", "5")
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("\n")
    text = r.stdout[:-1]
    assert text.startswith("The cat")
    assert len(text) == len("The cat") + 100
    assert set(text) <= set(TEXT)
    # the same as the library's sampler with the same seed, from the best checkpoint
    ckpt = load_checkpoint(run_dir / "best.safetensors")
    model = CharRNN(ckpt.shape, ckpt.params)
    assert [text] == sample_text(model, ckpt.vocab, "The cat", 100, rng_seed=5)


def test_sample_is_deterministic_with_rng_seed(trained) -> None:
    ckpt = str(trained[1] / "ckpt-00000060.safetensors")
    args = ["sample", "--checkpoint", ckpt, "--seed", "So", "--length", "80", "--top-k", "5"]
    a = run(*args, "--rng-seed", "1").stdout
    assert a == run(*args, "--rng-seed", "1").stdout
    assert a != run(*args, "--rng-seed", "2").stdout


def test_sample_temperature_zero_is_deterministic(trained) -> None:
    args = ["sample", "--checkpoint", str(trained[1]), "--seed", "Now ", "--length", "60",
            "--temperature", "0"]
    a = run(*args).stdout  # no --rng-seed: greedy needs none
    assert a == run(*args).stdout
    assert len(a) == len("Now ") + 60 + 1


def test_sample_num_samples(trained) -> None:
    _, run_dir, _ = trained
    r = run("sample", "--checkpoint", str(run_dir), "--seed", "But", "--length", "50",
            "--num-samples", "3", "--rng-seed", "9", "--top-p", "0.9")
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(run_dir / "best.safetensors")
    texts = sample_text(CharRNN(ckpt.shape, ckpt.params), ckpt.vocab, "But", 50,
                        num_samples=3, rng_seed=9, top_p=0.9)
    assert len(texts) == 3 and len(set(texts)) == 3
    assert all(t.startswith("But") and len(t) == 53 for t in texts)
    assert r.stdout == "\n\n".join(texts) + "\n"


def test_sample_empty_seed_and_length_zero(trained) -> None:
    r = run("sample", "--checkpoint", str(trained[1]), "--length", "0", "--seed", "And")
    assert r.exit_code == 0 and r.stdout == "And\n"
    r = run("sample", "--checkpoint", str(trained[1]), "--length", "20", "--rng-seed", "0")
    assert r.exit_code == 0 and len(r.stdout) == 21


def test_sample_skip_unknown(trained) -> None:
    r = run("sample", "--checkpoint", str(trained[1]), "--seed", "the ☃", "--length", "10",
            "--skip-unknown", "--rng-seed", "0")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("the ☃") and len(r.stdout) == len("the ☃") + 10 + 1


# -- eval -----------------------------------------------------------------------------------


def test_eval_json(trained, tmp_path) -> None:
    _, run_dir, _ = trained
    held_out = "Then the cat ☃ sat on a mat%, and then it ran 7 times.\nSo the cat sat.\n"
    path = tmp_path / "held_out.txt"
    path.write_text(held_out, encoding="utf-8")
    n_unknown = sum(held_out.count(c) for c in UNKNOWN)
    assert n_unknown == 3
    r = run("eval", "--checkpoint", str(run_dir), "--text", str(path), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # exactly one JSON object
    assert set(out) == {"loss", "bpc", "perplexity", "chars", "unknown_chars"}
    assert out["unknown_chars"] == n_unknown
    assert out["chars"] == len(held_out) - n_unknown - 1
    assert 0 < out["loss"] < math.log(len(set(TEXT)))
    assert out["bpc"] == pytest.approx(out["loss"] / math.log(2))
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert out == evaluate_file(run_dir, path).to_json()

    # one stream, in windows: the stateful pass equals one forward over the known chars
    r1 = run("eval", "--checkpoint", str(run_dir), "--text", str(path), "--json",
             "--batch-size", "1", "--seq-length", "7")
    one = json.loads(r1.stdout)
    ckpt = load_checkpoint(run_dir / "best.safetensors")
    model = CharRNN(ckpt.shape, ckpt.params)
    ids = ckpt.vocab.encode("".join(c for c in held_out if c not in UNKNOWN))[0].astype(np.int64)
    logits, _, _ = model.forward(ids[:-1, None], model.zero_state(1))
    expected = float(np.mean(token_nll(logits.astype(np.float64), ids[1:])))
    # float32 windows of 7 against one float32 forward: measured 1.3e-8 apart
    assert one["loss"] == pytest.approx(expected, rel=1e-6)
    assert one["chars"] == out["chars"]

    text_out = run("eval", "--checkpoint", str(run_dir), "--text", str(path))
    assert text_out.exit_code == 0
    assert "bpc" in text_out.stdout and str(out["chars"]) in text_out.stdout

    err = run("eval", "--checkpoint", str(run_dir), "--text", str(path), "--unknown", "error")
    assert_usage_error(err, "held_out.txt", "'☃'")


def test_eval_of_the_validation_split_matches_training(trained, tmp_path) -> None:
    """Scoring the val split's text reproduces the val_loss logged at the final step."""
    _, run_dir, _ = trained
    n_val = int(len(TEXT) * 0.1)
    path = tmp_path / "val.txt"
    path.write_text(TEXT[len(TEXT) - n_val:], encoding="utf-8")
    r = run("eval", "--checkpoint", str(run_dir / "ckpt-00000060.safetensors"), "--text",
            str(path), "--json")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row["val_loss"] for row in rows if row["step"] == 60 and "val_loss" in row]
    assert json.loads(r.stdout)["loss"] == pytest.approx(logged[0], rel=1e-9)  # same arithmetic


# -- vocab and info -------------------------------------------------------------------------


def test_vocab_output_json(trained, tmp_path) -> None:
    tmp = trained[0]
    out = tmp_path / "vocab.json"
    r = run("vocab", "--text", str(tmp / "corpus.txt"), "--output", str(out))
    assert r.exit_code == 0, r.output
    counts = Counter(TEXT)
    assert f"vocabulary size {len(counts)}" in r.stdout
    assert f"{len(TEXT):,} characters" in r.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["chars"] == sorted(counts)
    assert data["counts"] == [counts[c] for c in data["chars"]]
    # the same as the run's vocab.json, which the trainer wrote
    run_vocab = json.loads((trained[1] / "vocab.json").read_text(encoding="utf-8"))
    assert run_vocab["chars"] == data["chars"]
    missing = run("vocab", "--text", str(tmp_path / "nope.txt"))
    assert_usage_error(missing, "nope.txt")


def test_info_json(trained) -> None:
    _, run_dir, _ = trained
    r = run("info", str(run_dir), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    best = load_checkpoint(run_dir / "best.safetensors")
    assert info["step"] == best.step
    assert info["parameters"] == sum(p.size for p in best.params.values())
    assert info["vocab_size"] == len(set(TEXT))
    assert info["config"]["model"]["cell"] == "gru"
    assert info["config"]["model"]["hidden_size"] == 24
    assert math.isfinite(info["best_val_loss"]) and math.isfinite(info["train_loss"])
    text = run("info", str(run_dir / "ckpt-00000060.safetensors"))
    assert text.exit_code == 0 and "gru" in text.stdout
    # labels and values aligned whatever the label length: every value in one column
    head = text.stdout.split("config:")[0].splitlines()
    labels = {line.split()[0] for line in head}
    assert {"checkpoint", "step", "parameters", "train_loss", "best_val_loss"} <= labels
    starts = {len(line) - len(line.split(None, 1)[1]) for line in head}
    assert len(starts) == 1 and starts.pop() >= len("best_val_loss") + 2, head
    assert any(line.split() == ["step", "60"] for line in head)


# -- bad input: exit 2, one short line, no traceback ------------------------------------------


def test_train_config_errors(trained, tmp_path) -> None:
    _, _, config = trained
    assert_usage_error(run("train", "--config", str(tmp_path / "missing.yaml")), "missing.yaml")

    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  path: x.txt\nmodel:\n  hiden_size: 8\n", encoding="utf-8")
    msg = assert_usage_error(run("train", "--config", str(typo)), "model.hiden_size")
    assert "model.hidden_size" in msg  # the nearest valid key

    bad = run("train", "--config", str(config), "--set", "model.hidden_size=big")
    assert_usage_error(bad, "model.hidden_size", "big")
    assert_usage_error(run("train", "--config", str(config), "--set", "model.size=3"),
                       "model.size")
    assert_usage_error(run("train", "--config", str(config), "--set", "nokey"), "nokey")

    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(f"data:\n  path: {tmp_path / 'absent.txt'}\n", encoding="utf-8")
    assert_usage_error(run("train", "--config", str(no_data)), "absent.txt")


@pytest.mark.parametrize(
    "option,value",
    [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--length", "-1"),
     ("--top-k", "-2"), ("--num-samples", "0")],
)
def test_sample_bad_options(trained, option, value) -> None:
    r = run("sample", "--checkpoint", str(trained[1]), "--seed", "a", option, value)
    assert_usage_error(r, option, value, max_lines=4)


def test_corrupt_checkpoints(trained, tmp_path) -> None:
    good = (trained[1] / "best.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "random.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    for path in (truncated, garbage, tiny):
        for args in (["sample", "--checkpoint", str(path), "--seed", "a"],
                     ["eval", "--checkpoint", str(path), "--text", str(trained[0] / "corpus.txt")],
                     ["info", str(path)]):
            assert_usage_error(run(*args), path.name)
    assert_usage_error(run("info", str(tmp_path / "absent.safetensors")), "absent.safetensors")
    empty_dir = tmp_path / "empty_run"
    empty_dir.mkdir()
    assert_usage_error(run("sample", "--checkpoint", str(empty_dir)), "empty_run")


def test_eval_missing_text(trained, tmp_path) -> None:
    r = run("eval", "--checkpoint", str(trained[1]), "--text", str(tmp_path / "gone.txt"))
    assert_usage_error(r, "gone.txt")


def test_seed_with_unknown_character(trained) -> None:
    r = run("sample", "--checkpoint", str(trained[1]), "--seed", "a ☃ b", "--length", "5")
    assert_usage_error(r, "'☃'")


# -- help --------------------------------------------------------------------------------------


def test_help_mentions_every_option() -> None:
    top = run("--help")
    assert top.exit_code == 0
    assert set(cli.commands) == {"train", "sample", "eval", "vocab", "info", "inspect", "plot",
                                 "lab"}
    groups = {"inspect": {"gradients", "gates", "cells"}, "lab": {"memory", "ngram", "cold-start"}}
    for name, command in cli.commands.items():
        assert name in top.stdout
        subcommands = getattr(command, "commands", None)
        if subcommands is not None:  # a group: every subcommand, listed in its --help
            assert set(subcommands) == groups[name]
            r = run(name, "--help")
            assert all(sub in r.stdout for sub in subcommands), (name, r.stdout)
            todo = [((name, sub), c) for sub, c in subcommands.items()]
        else:
            todo = [((name,), command)]
        for path, leaf in todo:
            r = run(*path, "--help")
            assert r.exit_code == 0, path
            for param in leaf.params:
                if isinstance(param, click.Option):
                    assert param.help, (path, param.name)  # every option says what it does
                    for opt in [*param.opts, *param.secondary_opts]:
                        assert opt in r.stdout, (path, opt)
                else:
                    assert (param.metavar or param.name.upper()) in r.stdout, (path, param.name)


# -- as a real process ------------------------------------------------------------------------


def charrnn_cmd() -> list[str]:
    """`python -m charrnn.cli`, which runs main() (checked below); else the installed script."""
    return [sys.executable, "-m", "charrnn.cli"]


def proc(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    """Runs in env_cache's parent folder, so that relative paths resolve there."""
    env = dict(os.environ, CHARRNN_CACHE_DIR=str(env_cache), PYTHONIOENCODING="utf-8")
    return subprocess.run([*charrnn_cmd(), *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=120, cwd=env_cache.parent)


def test_python_dash_m_runs_the_cli() -> None:
    r = subprocess.run([*charrnn_cmd(), "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("charrnn"), r.stderr
    script = Path(sys.executable).with_name("charrnn")
    if script.exists():
        s = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                           timeout=60)
        assert s.returncode == 0 and s.stdout == r.stdout


def test_end_to_end_in_a_subprocess(tmp_path) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    cfg = {
        "data": {"path": "corpus.txt"},
        "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 2, "embedding_size": 0},
        "train": {"batch_size": 4, "seq_length": 16, "max_steps": 20, "eval_every": 10},
        "output": {"dir": "runs/sub", "keep_last": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    cache = tmp_path / "cache"  # the processes run in tmp_path: relative paths resolve there
    t = proc("train", "--config", "cfg.yaml", env_cache=cache)
    assert t.returncode == 0, t.stderr
    assert "Traceback" not in t.stderr
    run_dir = tmp_path / "runs" / "sub"
    assert (run_dir / "best.safetensors").is_file()
    assert [p.name for p in run_dir.glob("ckpt-*")] == ["ckpt-00000020.safetensors"]
    assert list(cache.glob("corpus-*.npy"))  # the cache went where we said
    assert "trained 20 steps" in t.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["path"] == str((tmp_path / "corpus.txt").resolve())
    assert saved["output"]["dir"] == str(run_dir.resolve())

    s = proc("sample", "--checkpoint", "runs/sub", "--seed", "Then ", "--length", "40",
             "--rng-seed", "3", env_cache=cache)
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("Then ") and len(s.stdout) == len("Then ") + 40 + 1
    assert s.stdout == proc("sample", "--checkpoint", "runs/sub", "--seed", "Then ",
                            "--length", "40", "--rng-seed", "3", env_cache=cache).stdout

    e = proc("eval", "--checkpoint", "runs/sub", "--text", "corpus.txt", "--json",
             env_cache=cache)
    assert e.returncode == 0, e.stderr
    out = json.loads(e.stdout)
    assert out["chars"] == len(TEXT) - 1 and out["unknown_chars"] == 0

    bad = proc("sample", "--checkpoint", "runs/sub", "--seed", "☃", env_cache=cache)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "☃" in bad.stderr and "Traceback" not in bad.stderr

    missing = proc("train", "--config", "nope.yaml", env_cache=cache)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "Error: nope.yaml: config file not found"]
