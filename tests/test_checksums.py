"""Checksums in checkpoints: every file carries a digest of its tensors and metadata
(metadata "digest"), and every load checks it, so bytes damaged on disk are found instead
of loaded; files from before checksums still load.

The fuzz tests flip bytes of a real training checkpoint (weights, Adam moments, carried
state): anywhere in the tensor data the flip must be caught as damage; in the header it
must be refused or leave the loaded checkpoint exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

import charrnn.checkpoint
from charrnn.checkpoint import (
    DIGEST_KEY,
    Checkpoint,
    checkpoint_digest,
    load_checkpoint,
    model_shape,
    save_checkpoint,
)
from charrnn.cli import cli
from charrnn.config import config_from_dict, config_to_dict
from charrnn.errors import CheckpointError
from charrnn.model import init_params
from charrnn.train import train
from charrnn.vocab import Vocab

QUIET = {"progress": False, "echo": lambda s: None}
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
_WORDS = "the cat sat on a mat and then it ran to the café while a bird sang".split()


def config_dict(corpus: Path, run_dir: Path, **train_keys) -> dict:
    return {
        "data": {"path": str(corpus), "val_fraction": 0.1, "cache": False},
        "model": {"cell": "lstm", "hidden_size": 12, "num_layers": 2, "embedding_size": 8,
                  "dropout": 0.1},
        "train": {"batch_size": 4, "seq_length": 16, "max_steps": 8, "eval_every": 4,
                  "checkpoint_every": 2, "log_every": 2, "learning_rate": 0.01, "seed": 5,
                  "eval_max_chars": 1000, **train_keys},
        "output": {"dir": str(run_dir), "keep_last": 3},
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checksums")
    rng = random.Random(1)
    lines = (" ".join(rng.choice(_WORDS) for _ in range(10)) for _ in range(400))
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def run_dir(root) -> Path:
    """A finished run of 8 steps: ckpt-00000004/6/8 (Adam moments, carried state) and best."""
    train(config_from_dict(config_dict(root / "corpus.txt", root / "run")), **QUIET)
    return root / "run"


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """The same run straight to step 12: what a resumed one must equal."""
    train(config_from_dict(config_dict(root / "corpus.txt", root / "ref", max_steps=12)),
          **QUIET)
    return root / "ref" / "ckpt-00000012.safetensors"


@pytest.fixture(scope="module")
def good(run_dir) -> Path:
    return run_dir / "ckpt-00000008.safetensors"


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata())


def data_region(path: Path) -> tuple[int, int, dict]:
    """(start, end) of the tensor data in the file, and the safetensors header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, len(raw), json.loads(raw[8 : 8 + n])


def flipped(path: Path, out: Path, at: int, xor: int) -> Path:
    raw = bytearray(path.read_bytes())
    raw[at] ^= xor
    out.write_bytes(bytes(raw))
    return out


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    """Two loads that gave the same checkpoint: every tensor, bit for bit, and the metadata."""
    for x, y in ((a.params, b.params), (a.train_tensors, b.train_tensors)):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
    assert (a.step, a.info, a.train_state) == (b.step, b.info, b.train_state)
    assert config_to_dict(a.config) == config_to_dict(b.config)
    assert a.vocab.chars == b.vocab.chars


def assert_damaged(path: Path, training_state: bool) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, training_state=training_state)
    msg = str(err.value)
    assert msg.startswith(f"{path}: damaged: ") and "\n" not in msg, msg
    return msg


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *pieces: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


# -- the digest ------------------------------------------------------------------------------


def reference_digest(path: Path) -> str:
    """The definition (README, checkpoint_digest), written out again from the file."""
    h = hashlib.sha256()
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            le = t.dtype.newbyteorder("<")
            h.update(json.dumps([name, le.str, list(t.shape)]).encode() + b"\n")
            h.update(t.astype(le).tobytes(order="C"))
    for key in sorted(meta):
        if key != "digest":
            h.update(json.dumps([key, meta[key]]).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def test_every_checkpoint_carries_its_digest(run_dir, good) -> None:
    files = sorted(run_dir.glob("*.safetensors"))
    assert [p.name for p in files] == ["best.safetensors", "ckpt-00000004.safetensors",
                                       "ckpt-00000006.safetensors", "ckpt-00000008.safetensors"]
    for p in files:
        digest = metadata_of(p)[DIGEST_KEY]
        assert len(digest) == len("sha256:") + 64
        assert digest == reference_digest(p) == checkpoint_digest(tensors_of(p), metadata_of(p))
    names = tensors_of(good)
    assert any(k.startswith("optim.m.") for k in names) and "optim.t" in names
    assert any(k.startswith("state.") for k in names)
    # a tensor's name, dtype, shape and bytes, and each metadata entry, are all covered
    t, meta = tensors_of(good), metadata_of(good)
    base = checkpoint_digest(t, meta)
    k = "head.bias"
    one_bit = t[k].copy()
    one_bit.view(np.uint32)[3] ^= 1
    for changed_t, changed_meta in [
        ({("head.biaz" if n == k else n): a for n, a in t.items()}, meta),
        ({**t, k: t[k].astype(np.float64)}, meta),
        ({**t, k: t[k].reshape(1, -1)}, meta),
        ({**t, k: one_bit}, meta),
        (t, {**meta, "step": "9"}),
        (t, {**meta, "extra": ""}),
    ]:
        assert checkpoint_digest(changed_t, changed_meta) != base
    # ... and nothing else: not the order of either, nor the byte order in memory
    assert checkpoint_digest(t, {**meta, DIGEST_KEY: "anything"}) == base
    assert checkpoint_digest(dict(reversed(t.items())), dict(reversed(meta.items()))) == base
    assert checkpoint_digest({**t, k: t[k].astype(">f4")}, meta) == base


def test_digest_of_float64_and_integer_tensors(root) -> None:
    cfg = config_from_dict({**config_dict(root / "corpus.txt", root / "f64"),
                            "train": {"dtype": "float64"}})
    vocab = Vocab(list("abc"))
    params = init_params(model_shape(cfg, vocab.size), np.random.default_rng(0), "float64")
    path = root / "f64.safetensors"
    save_checkpoint(path, params, config=cfg, vocab=vocab, step=3,
                    train_tensors={"optim.t": np.array([3], np.int64)}, train_state={"x": 1})
    assert metadata_of(path)[DIGEST_KEY] == reference_digest(path)
    ckpt = load_checkpoint(path, training_state=True)
    assert ckpt.params["head.weight"].dtype == np.float64
    assert_damaged(flipped(path, root / "f64-bad.safetensors", data_region(path)[1] - 1, 1),
                   True)


def test_a_placeholder_lookalike_in_the_config_still_gives_the_right_digest(root, good,
                                                                           monkeypatch) -> None:
    """The digest goes over a same-length placeholder; a config that holds that string
    too makes the save serialize again with the digest itself."""
    calls = []
    monkeypatch.setattr(charrnn.checkpoint, "save",
                        lambda *a, **kw: calls.append(1) or save(*a, **kw))
    ckpt = load_checkpoint(good, training_state=True)
    lookalike = root / ("sha256:" + "0" * 64)
    cfg = config_from_dict({**config_to_dict(ckpt.config),
                            "output": {"dir": str(lookalike), "keep_last": 3}})
    path = root / "lookalike.safetensors"
    save_checkpoint(path, ckpt.params, config=cfg, vocab=ckpt.vocab, step=ckpt.step,
                    info=ckpt.info, train_tensors=ckpt.train_tensors,
                    train_state=ckpt.train_state)
    assert len(calls) == 2  # serialized again
    assert metadata_of(path)[DIGEST_KEY] == reference_digest(path)
    assert load_checkpoint(path, training_state=True).config.output.dir == str(lookalike)


def test_a_failed_digest_leaves_no_temporary_file_and_the_old_file(root, good,
                                                                   monkeypatch) -> None:
    ckpt = load_checkpoint(good)
    path = root / "keep" / "ckpt-00000008.safetensors"
    path.parent.mkdir()
    path.write_bytes(good.read_bytes())

    def broken(*args, **kwargs):
        raise MemoryError("no memory for hashing")

    monkeypatch.setattr(charrnn.checkpoint, "checkpoint_digest", broken)
    with pytest.raises(MemoryError):
        save_checkpoint(path, ckpt.params, config=ckpt.config, vocab=ckpt.vocab, step=9)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == good.read_bytes()


# -- flipped bytes -----------------------------------------------------------------------------


def tensor_bounds(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (first byte, one past the last) in the file, for every non-empty tensor."""
    start, _, header = data_region(path)
    return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"
            and v["data_offsets"][1] > v["data_offsets"][0]}


def test_a_flip_at_either_end_of_every_tensor_is_caught(good, tmp_path) -> None:
    """The first and the last byte of each tensor (weights, moments, optim.t, state): none
    is left out of the digest, whichever tensors the load keeps."""
    bounds = tensor_bounds(good)
    assert len(bounds) == len(tensors_of(good))
    for lo, hi in bounds.values():
        for at in (lo, hi - 1):
            bad = flipped(good, tmp_path / "bad.safetensors", at, 0x80)
            for training_state in (False, True):
                assert_damaged(bad, training_state)


@SETTINGS
@given(data=st.data())
def test_any_flip_in_the_tensor_data_is_caught(good, tmp_path, data) -> None:
    """One to three bytes changed anywhere after the header: always 'damaged', for a load of
    the model alone as for a resume, even where the values stay finite."""
    start, end, _ = data_region(good)
    raw = bytearray(good.read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(start, end - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    if bytes(raw) == good.read_bytes():  # two flips undid each other
        return
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    assert_damaged(path, data.draw(st.booleans()))


@pytest.fixture(scope="module")
def intact(good) -> dict[bool, Checkpoint]:
    return {ts: load_checkpoint(good, training_state=ts) for ts in (False, True)}


@SETTINGS
@given(data=st.data())
def test_a_flip_in_the_header_is_refused_or_changes_nothing(good, intact, tmp_path,
                                                            data) -> None:
    """A byte of the length, the JSON header or the metadata changed: a one-line
    CheckpointError naming the file, or (JSON whitespace) a load of the very same
    checkpoint. Never a silently different one."""
    start, _, _ = data_region(good)
    at = data.draw(st.integers(0, start - 1))
    path = flipped(good, tmp_path / "fuzz.safetensors", at, data.draw(st.integers(1, 255)))
    training_state = data.draw(st.booleans())
    try:
        ckpt = load_checkpoint(path, training_state=training_state)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: "), str(e)
        return
    assert_same(ckpt, intact[training_state])


def test_a_renamed_or_mangled_digest_is_damage(good, tmp_path) -> None:
    t, meta = tensors_of(good), metadata_of(good)
    digest = meta.pop(DIGEST_KEY)
    cases = {
        "renamed": {**meta, "digesu": digest},
        "algorithm": {**meta, DIGEST_KEY: "sha257" + digest[6:]},
        "short": {**meta, DIGEST_KEY: digest[:-1]},
        "upper": {**meta, DIGEST_KEY: digest.upper()},
        "other-value": {**meta, DIGEST_KEY: "sha256:" + "0" * 64},
    }
    for name, m in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(save(t, metadata=m))
        assert_damaged(path, False)


def test_a_blake2b_digest_is_checked_too(good, tmp_path) -> None:
    t, meta = tensors_of(good), metadata_of(good)
    path = tmp_path / "b2.safetensors"
    path.write_bytes(save(t, metadata={**meta, DIGEST_KEY: checkpoint_digest(t, meta,
                                                                             "blake2b")}))
    assert_same(load_checkpoint(path, training_state=True), load_checkpoint(good, True))
    start, end, _ = data_region(path)
    assert_damaged(flipped(path, tmp_path / "b2-bad.safetensors", (start + end) // 2, 1), True)


@pytest.fixture(scope="module")
def damaged(good, root) -> dict[str, Path]:
    """ckpt-8 with one bit flipped in a weight and in an Adam moment; values stay finite."""
    bounds = tensor_bounds(good)
    out = {}
    for name in ("head.weight", "optim.v.rnn.weight_hh_l1"):
        lo, hi = bounds[name]
        at = lo + ((hi - lo) // 8) * 4 + 1  # a low mantissa byte of a float32 in the middle
        out[name] = flipped(good, root / f"flip-{name}.safetensors", at, 0x04)
        with safe_open(str(out[name]), framework="numpy") as f:
            assert np.isfinite(f.get_tensor(name)).all()
    return out


@pytest.mark.parametrize("tensor", ["head.weight", "optim.v.rnn.weight_hh_l1"])
def test_damaged_checkpoint_exits_2_in_one_line(damaged, root, tensor) -> None:
    path = damaged[tensor]
    for args in (["sample", "--checkpoint", path, "--seed", "the", "--length", "5"],
                 ["eval", "--checkpoint", path, "--text", root / "corpus.txt"],
                 ["info", path], ["info", path, "--json"]):
        result = invoke(*args)
        one_line_error(result, f"{path}: damaged:", "checksum")
        assert result.stdout == ""


def test_damaged_checkpoint_through_the_real_cli(damaged) -> None:
    path = damaged["head.weight"]
    r = subprocess.run([sys.executable, "-m", "charrnn.cli", "info", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"Error: {path}: damaged: its tensor data or metadata does "
                                "not match its checksum")


# -- resume ----------------------------------------------------------------------------------


def copy_run(run_dir: Path, root: Path, name: str) -> tuple[Path, Path]:
    """A copy of the 8-step run under a new name, and its config file."""
    dest = root / name
    dest.mkdir()
    for p in run_dir.iterdir():
        if p.is_file():
            (dest / p.name).write_bytes(p.read_bytes())
    d = config_dict(root / "corpus.txt", dest)
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return dest, cfg


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]), k


def header_flip(path: Path, needle: bytes) -> int:
    """The offset of a digit inside `needle`, found in the file's header."""
    start, _, _ = data_region(path)
    at = path.read_bytes().find(needle, 0, start)
    assert at > 0, needle
    return at + len(needle) - 1


@pytest.mark.parametrize("where", ["weights", "moments", "train_state"])
def test_resume_falls_back_past_a_damaged_checkpoint_and_stays_exact(run_dir, root, reference,
                                                                     where) -> None:
    """The newest checkpoint has a flipped byte: --resume warns, naming it, moves it aside,
    resumes from the one before, and ends where an uninterrupted run ends, bit for bit."""
    dest, cfg = copy_run(run_dir, root, f"resume-{where}")
    newest = dest / "ckpt-00000008.safetensors"
    bounds = tensor_bounds(newest)
    if where == "train_state":  # the data position, a digit of the JSON in the header
        ts = json.loads(metadata_of(newest)["train_state"])
        at = header_flip(newest, f'\\"position\\": {ts["data"]["position"]}'.encode())
        xor = 0x01
    else:
        lo, hi = bounds["head.bias" if where == "weights" else "optim.m.rnn.weight_ih_l0"]
        at, xor = (lo + hi) // 2, 0x10
    flipped(newest, newest, at, xor)
    result = invoke("train", "--config", cfg, "--resume", "--set", "train.max_steps=12")
    assert result.exit_code == 0, (result.output, result.exception)
    warning = next(ln for ln in result.stderr.splitlines() if "damaged" in ln)
    assert warning == (f"Warning: {newest}: damaged: its tensor data or metadata does not "
                       "match its checksum; moved aside to ckpt-00000008.safetensors.corrupt, "
                       "resuming from ckpt-00000006.safetensors")
    assert (dest / "ckpt-00000008.safetensors.corrupt").exists()
    assert sorted(p.name for p in dest.glob("ckpt-*.safetensors")) == [
        "ckpt-00000008.safetensors", "ckpt-00000010.safetensors", "ckpt-00000012.safetensors"]
    assert_same_tensors(dest / "ckpt-00000012.safetensors", reference)
    a = load_checkpoint(dest / "ckpt-00000012.safetensors", training_state=True)
    b = load_checkpoint(reference, training_state=True)
    assert a.train_state["rng"] == b.train_state["rng"]
    assert a.train_state["data"] == b.train_state["data"]


# -- files from before checksums ----------------------------------------------------------------


def without_digest(path: Path, out: Path) -> Path:
    """The file as charrnn wrote it before checksums: the same tensors and metadata, no
    "digest" key."""
    meta = metadata_of(path)
    del meta[DIGEST_KEY]
    out.write_bytes(save(tensors_of(path), metadata=meta))
    return out


def test_a_checkpoint_without_digest_still_loads(good, root) -> None:
    old = without_digest(good, root / "old.safetensors")
    assert DIGEST_KEY not in metadata_of(old)
    for training_state in (False, True):
        assert_same(load_checkpoint(old, training_state=training_state),
                    load_checkpoint(good, training_state=training_state))
    assert invoke("info", old).exit_code == 0
    r = invoke("sample", "--checkpoint", old, "--seed", "the", "--length", "20",
               "--rng-seed", "1")
    assert r.exit_code == 0
    assert r.stdout == invoke("sample", "--checkpoint", good, "--seed", "the", "--length",
                              "20", "--rng-seed", "1").stdout
    assert invoke("eval", "--checkpoint", old, "--text", root / "corpus.txt").exit_code == 0


def test_resume_from_checkpoints_without_digest_is_exact(run_dir, root, reference) -> None:
    dest, cfg = copy_run(run_dir, root, "resume-old")
    for p in dest.glob("*.safetensors"):
        without_digest(p, p)
    result = invoke("train", "--config", cfg, "--resume", "--set", "train.max_steps=12")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "damaged" not in result.stderr and not list(dest.glob("*.corrupt"))
    assert_same_tensors(dest / "ckpt-00000012.safetensors", reference)
    assert DIGEST_KEY in metadata_of(dest / "ckpt-00000012.safetensors")  # new ones get one
