"""Config loading and validation: defaults, every refusal, overrides, paths, properties."""

import dataclasses
import os
import sysconfig
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.config import (
    KEYS,
    SCHEMA,
    Config,
    DataConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_paths,
)
from charrnn.errors import ConfigError


def write(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def refused(d, match: str, source: str = "cfg.yaml") -> str:
    """config_from_dict(d) must raise a one-line ConfigError naming the source and `match`."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(d, source)
    msg = str(info.value)
    assert "\n" not in msg
    assert source in msg
    assert match in msg, msg
    return msg


def with_key(key: str, value) -> dict:
    section, name = key.split(".")
    d = {"data": {"path": "corpus.txt"}}
    d.setdefault(section, {})[name] = value
    return d


# -----------------------------------------------------------------------------
# defaults and the schema


def test_defaults_match_contract():
    cfg = config_from_dict({"data": {"path": "corpus.txt"}})
    assert cfg.data == DataConfig(path="corpus.txt")
    d = config_to_dict(cfg)
    assert d["data"] == {
        "path": "corpus.txt",
        "include": "*",
        "encoding": "utf-8",
        "errors": "strict",
        "val_fraction": 0.05,
        "test_fraction": 0.0,
        "cache": True,
    }
    assert d["model"] == {
        "cell": "lstm",
        "hidden_size": 256,
        "num_layers": 2,
        "embedding_size": 64,
        "dropout": 0.0,
        "weight_drop": 0.0,  # version 2: "Training for quality"
        "input_dropout": 0.0,  # extension: locked dropout on the embedded characters
    }
    contract_train = {
        "batch_size": 32,
        "seq_length": 64,
        "stateful": True,
        "max_steps": 5000,
        "optimizer": "adam",
        "learning_rate": 0.002,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "lr_decay": 0.5,
        "lr_decay_every": 1000,
        "grad_clip": 5.0,
        "eval_every": 250,
        "seed": 1234,
        "dtype": "float32",
    }
    extensions = {
        "on_nonfinite": "stop",
        "checkpoint_every": 0,
        "log_every": 10,
        "eval_max_chars": 200_000,
        "momentum": 0.9,
        "weight_decay": 0.01,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "lr_min": 0.0,
        "reset_prob": 0.0,
        "random_offset": False,
    }
    version2 = {"max_minutes": 0.0, "ema": 0.0, "reduce": "allreduce"}  # CONTRACT version 2
    assert d["train"] == {**contract_train, **extensions, **version2}
    assert d["output"] == {"dir": "runs/default", "keep_last": 3}
    assert cfg == Config(
        DataConfig(path="corpus.txt"), ModelConfig(), TrainConfig(), OutputConfig()
    )


def test_every_key_is_settable():
    values = {
        "data": {
            "path": "x",
            "include": "*.py",
            "encoding": "latin-1",
            "errors": "replace",
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "cache": False,
        },
        "model": {
            "cell": "gru",
            "hidden_size": 8,
            "num_layers": 1,
            "embedding_size": 2,
            "dropout": 0.5,
            "weight_drop": 0.25,
            "input_dropout": 0.1,
        },
        "train": {
            "batch_size": 2,
            "seq_length": 3,
            "stateful": False,
            "max_steps": 7,
            "optimizer": "adamw",
            "learning_rate": 1,
            "lr_schedule": "cosine",
            "warmup_steps": 5,
            "lr_decay": 1,
            "lr_decay_every": 1,
            "grad_clip": 0,
            "eval_every": 1,
            "seed": 0,
            "dtype": "float64",
            "on_nonfinite": "skip",
            "checkpoint_every": 4,
            "log_every": 1,
            "eval_max_chars": 0,
            "momentum": 0,
            "weight_decay": 0,
            "beta1": 0,
            "beta2": 0.5,
            "eps": 1e-12,
            "lr_min": 0.5,
            "max_minutes": 1.5,
            "ema": 0.99,
            "reset_prob": 0.01,
            "random_offset": True,
            "reduce": "ordered",
        },
        "output": {"dir": "runs/x", "keep_last": 1},
    }
    assert sorted(f"{s}.{k}" for s in values for k in values[s]) == sorted(KEYS)
    cfg = config_from_dict(values)
    assert config_to_dict(cfg) == values
    assert isinstance(cfg.train.learning_rate, float)  # an int where a float is expected
    assert isinstance(cfg.train.grad_clip, float)


@pytest.mark.parametrize(
    "key, choice",
    [("model.cell", c) for c in ("rnn", "lstm", "gru")]
    + [("train.optimizer", o) for o in ("sgd", "momentum", "rmsprop", "adagrad", "adam", "adamw")]
    + [("train.lr_schedule", s) for s in ("constant", "step", "exponential", "cosine")]
    + [("train.dtype", "float64"), ("data.errors", "replace"), ("train.on_nonfinite", "skip")],
)
def test_choices_accepted(key, choice):
    section, name = key.split(".")
    assert getattr(getattr(config_from_dict(with_key(key, choice)), section), name) == choice


# -----------------------------------------------------------------------------
# refusals: each names the file, the full dotted key and the bad value, on one line


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("model.cell", "lstn", "model.cell must be one of rnn|lstm|gru, got 'lstn'"),
        ("model.cell", 1, "model.cell must be one of"),
        ("train.optimizer", "Adam", "train.optimizer must be one of"),
        ("train.lr_schedule", "linear", "train.lr_schedule must be one of"),
        ("train.dtype", "float16", "train.dtype must be one of float32|float64"),
        ("data.errors", "ignore", "data.errors must be one of strict|replace"),
        ("train.on_nonfinite", "nan", "train.on_nonfinite must be one of stop|skip"),
        ("model.hidden_size", True, "model.hidden_size must be an integer, got True"),
        ("model.hidden_size", 1.5, "model.hidden_size must be an integer, got 1.5"),
        ("model.hidden_size", "abc", "model.hidden_size must be an integer, got 'abc'"),
        ("model.hidden_size", "128", "model.hidden_size must be an integer, got '128'"),
        ("train.learning_rate", "abc", "train.learning_rate must be a number, got 'abc'"),
        ("train.learning_rate", True, "train.learning_rate must be a number, got True"),
        ("train.learning_rate", [1], "train.learning_rate must be a number, got [1]"),
        ("train.learning_rate", float("nan"), "train.learning_rate must be a finite number"),
        ("train.grad_clip", float("inf"), "train.grad_clip must be a finite number"),
        ("train.grad_clip", 10**400, "train.grad_clip must be a finite number"),
        ("train.stateful", "yes please", "train.stateful must be true or false"),
        ("train.stateful", 1, "train.stateful must be true or false, got 1"),
        ("data.path", 3, "data.path must be a string, got 3"),
        ("data.path", "", "data.path must be a non-empty string, got ''"),
        ("data.path", None, "data.path must be a string, got None"),
        ("output.dir", " ", "output.dir must be a non-empty string"),
        ("data.encoding", "utf-9", "data.encoding must be a known text encoding, got 'utf-9'"),
        ("data.encoding", "rot13", "data.encoding must be a known text encoding"),
        ("model.hidden_size", 0, "model.hidden_size must be >= 1, got 0"),
        ("model.num_layers", 0, "model.num_layers must be >= 1, got 0"),
        ("model.embedding_size", -1, "model.embedding_size must be >= 0, got -1"),
        ("model.dropout", 1, "model.dropout must be >= 0 and < 1, got 1"),
        ("model.dropout", -0.1, "model.dropout must be >= 0 and < 1, got -0.1"),
        ("train.batch_size", 0, "train.batch_size must be >= 1, got 0"),
        ("train.seq_length", 0, "train.seq_length must be >= 1, got 0"),
        ("train.max_steps", 0, "train.max_steps must be >= 1, got 0"),
        ("train.learning_rate", -1, "train.learning_rate must be > 0, got -1"),
        ("train.learning_rate", 0, "train.learning_rate must be > 0, got 0"),
        ("train.warmup_steps", -1, "train.warmup_steps must be >= 0, got -1"),
        ("train.lr_decay", 0, "train.lr_decay must be > 0 and <= 1, got 0"),
        ("train.lr_decay", 1.5, "train.lr_decay must be > 0 and <= 1, got 1.5"),
        ("train.lr_decay_every", 0, "train.lr_decay_every must be >= 1, got 0"),
        ("train.grad_clip", -1, "train.grad_clip must be >= 0, got -1"),
        ("train.eval_every", 0, "train.eval_every must be >= 1, got 0"),
        ("train.seed", -1, "train.seed must be >= 0, got -1"),
        ("train.seed", 1.0, "train.seed must be an integer, got 1.0"),
        ("train.checkpoint_every", -1, "train.checkpoint_every must be >= 0, got -1"),
        ("train.log_every", 0, "train.log_every must be >= 1, got 0"),
        ("train.eval_max_chars", -1, "train.eval_max_chars must be >= 0, got -1"),
        ("train.momentum", 1, "train.momentum must be >= 0 and < 1, got 1"),
        ("train.weight_decay", -0.1, "train.weight_decay must be >= 0, got -0.1"),
        ("train.beta1", 1.0, "train.beta1 must be >= 0 and < 1, got 1.0"),
        ("train.beta2", -0.5, "train.beta2 must be >= 0 and < 1, got -0.5"),
        ("train.eps", 0, "train.eps must be > 0, got 0"),
        ("train.lr_min", -1, "train.lr_min must be >= 0, got -1"),
        ("output.keep_last", 0, "output.keep_last must be >= 1, got 0"),
        ("data.val_fraction", 1, "data.val_fraction must be >= 0 and < 1, got 1"),
        ("data.test_fraction", -0.5, "data.test_fraction must be >= 0 and < 1, got -0.5"),
    ],
)
def test_bad_values_refused(key, value, expect):
    msg = refused(with_key(key, value), expect)
    if ", got " in expect:
        assert msg == f"cfg.yaml: {expect}"  # the value exactly as written: -1, not -1.0


def test_cross_field_checks():
    d = {"data": {"path": "x", "val_fraction": 0.5, "test_fraction": 0.5}}
    refused(d, "data.val_fraction + data.test_fraction must be < 1")
    refused(
        {"data": {"path": "x"}, "train": {"learning_rate": 0.01, "lr_min": 0.1}},
        "train.lr_min must be <= train.learning_rate",
    )


def test_numeric_strings_for_floats():
    # PyYAML (YAML 1.1) reads 1e-3 as a string; a float key takes it as YAML 1.2 would
    cfg = load_config_text("data: {path: x}\ntrain: {learning_rate: 1e-3, eps: 1E-10}\n")
    assert cfg.train.learning_rate == 0.001 and cfg.train.eps == 1e-10


def test_huge_values_shown_briefly():
    msg = refused(with_key("model.cell", "x" * 10_000), "model.cell must be one of")
    assert len(msg) < 200
    loop: list = []
    loop.append(loop)
    refused(with_key("train.seed", loop), "train.seed must be an integer")


def test_unknown_key_suggests_nearest():
    assert refused({"data": {"path": "x"}, "trian": {}}, "unknown key 'trian'") == (
        "unknown key 'trian' in cfg.yaml; did you mean 'train'?"
    )
    refused(
        {"data": {"path": "x"}, "train": {"lerning_rate": 1}},
        "unknown key 'train.lerning_rate' in cfg.yaml; did you mean 'train.learning_rate'?",
    )
    # a key in the wrong section, or outside any section
    d = {"data": {"path": "x"}, "train": {"hidden_size": 1}}
    refused(d, "did you mean 'model.hidden_size'")
    refused({"data": {"path": "x"}, "hidden_size": 1}, "did you mean 'model.hidden_size'")
    msg = refused({"data": {"path": "x"}, "model": {"zzzzzz": 1}}, "unknown key 'model.zzzzzz'")
    assert "did you mean" not in msg


def test_unknown_section_and_bad_shapes():
    msg = refused({"data": {"path": "x"}, "optim": {"lr": 1}}, "unknown key 'optim'")
    assert "cfg.yaml" in msg
    refused({"data": {"path": "x"}, 3: 1}, "unknown key 3")
    refused({"data": {"path": "x"}, "model": [1, 2]}, "model must be a mapping")
    refused(["data"], "the top level must be a mapping")


def test_data_path_required():
    assert refused({}, "data.path is required").startswith("cfg.yaml: ")
    refused({"model": {"cell": "gru"}}, "data.path is required")
    refused({"data": None}, "data.path is required")


def test_empty_sections_mean_defaults():
    cfg = config_from_dict({"data": {"path": "x"}, "model": None, "train": {}})
    assert cfg.model == ModelConfig() and cfg.train == TrainConfig()


# -----------------------------------------------------------------------------
# files


def load_config_text(text: str, overrides=()) -> Config:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cfg.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return load_config(path, overrides)


def load_refused(path, match: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    assert match in msg, msg
    return msg


def test_load_config(tmp_path):
    path = write(tmp_path, "data:\n  path: corpus.txt\nmodel:\n  cell: gru\n  hidden_size: 32\n")
    cfg = load_config(path)
    assert cfg.model.cell == "gru" and cfg.model.hidden_size == 32
    assert cfg.data.path == "corpus.txt"  # not resolved by load_config
    assert load_config(tmp_path / "cfg.yaml") == cfg  # PathLike


def test_missing_unreadable_and_directory(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    load_refused(missing, missing)
    load_refused(str(tmp_path), str(tmp_path))
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"data: {path: caf\xe9}\n")
    load_refused(str(bad), str(bad))


def test_unreadable_config(unprivileged):
    """A real EACCES: loaded by nobody when the suite runs as root (conftest's unprivileged)."""
    locked = write(unprivileged.dir, "data: {path: x}\n", "locked.yaml")
    unprivileged.deny(locked)
    r = unprivileged.python(
        "import sys\n"
        "from charrnn.config import load_config\n"
        "from charrnn.errors import ConfigError\n"
        "try:\n"
        "    load_config(sys.argv[1])\n"
        "except ConfigError as e:\n"
        "    print(e)\n", locked)
    assert r.returncode == 0, r.stderr
    msg = r.stdout.strip()
    assert "\n" not in msg and str(locked) in msg and "Permission denied" in msg, msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "data:\n  path: x\nmodel: [unclosed\n  cell: gru\n")
    msg = load_refused(path, f"{path}:")
    assert "invalid YAML" in msg
    path = write(tmp_path, "data:\n  path: x\n model: : y\n")
    assert load_refused(path, path).startswith(f"{path}:3")


def test_yaml_python_tags_refused(tmp_path, capfd):
    path = write(tmp_path, 'data:\n  path: !!python/object/apply:os.system ["echo hi"]\n')
    msg = load_refused(path, path)
    assert "python/object/apply" in msg
    assert "hi" not in capfd.readouterr().out


def test_top_level_and_empty_file(tmp_path):
    load_refused(write(tmp_path, ""), "data.path is required")
    load_refused(write(tmp_path, "# only a comment\n"), "data.path is required")
    load_refused(write(tmp_path, "- data\n- model\n"), "the top level must be a mapping")
    load_refused(write(tmp_path, "just a string\n"), "the top level must be a mapping")
    load_refused(write(tmp_path, "data: 3\n"), "data must be a mapping")
    # an empty file plus an override for data.path is a valid config
    cfg = load_config(write(tmp_path, ""), ["data.path=corpus.txt"])
    assert cfg == config_from_dict({"data": {"path": "corpus.txt"}})


def test_deep_nesting_refused(tmp_path):
    load_refused(write(tmp_path, "data: " + "[" * 100_000), "cfg.yaml")


# -----------------------------------------------------------------------------
# overrides


def test_overrides_typed_by_schema(tmp_path):
    path = write(tmp_path, "data:\n  path: corpus.txt\n")
    cfg = load_config(
        path,
        [
            "model.hidden_size=128",
            "train.stateful=false",
            "train.learning_rate=1e-3",
            "train.grad_clip=1",
            "data.path=foo.txt",
            "data.include=*.py",
            "model.cell=gru",
            "output.dir=runs/a b",
            "data.cache=no",
            "train.seed=7",
        ],
    )
    assert cfg.model.hidden_size == 128
    assert cfg.train.stateful is False and cfg.data.cache is False
    assert cfg.train.learning_rate == 0.001
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.data.path == "foo.txt" and cfg.data.include == "*.py"
    assert cfg.model.cell == "gru" and cfg.output.dir == "runs/a b" and cfg.train.seed == 7


def test_later_override_wins(tmp_path):
    cfg = load_config(
        write(tmp_path, "data: {path: x}\n"), ["model.num_layers=3", "model.num_layers=1"]
    )
    assert cfg.model.num_layers == 1


@pytest.mark.parametrize(
    "item, expect",
    [
        ("model.hidden_size", "expected KEY=VALUE"),
        ("model.hiden_size=3", "did you mean 'model.hidden_size'"),
        ("hidden_size=3", "unknown key 'hidden_size'"),
        ("model=3", "unknown key 'model'"),
        ("model.hidden_size=abc", "model.hidden_size must be an integer, got 'abc'"),
        ("model.hidden_size=0", "model.hidden_size must be >= 1, got 0"),
        ("train.stateful=maybe", "train.stateful must be true or false"),
        ("train.learning_rate=[1", "not valid YAML"),
        ("model.cell=lstn", "model.cell must be one of"),
    ],
)
def test_bad_override(tmp_path, item, expect):
    msg = load_refused(write(tmp_path, "data: {path: x}\n"), expect, [item])
    assert item in msg


# -----------------------------------------------------------------------------
# paths


def test_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"data": {"path": "{stdlib}"}, "output": {"dir": "runs/x"}})
    out = resolve_paths(cfg)
    assert out.data.path == os.path.abspath(sysconfig.get_paths()["stdlib"])
    assert out.output.dir == str(tmp_path / "runs" / "x")
    assert cfg.data.path == "{stdlib}" and cfg.output.dir == "runs/x"  # a copy
    assert out.model == cfg.model and out.train == cfg.train

    out = resolve_paths(config_from_dict({"data": {"path": "texts/*.t[xy]t"}}))
    assert out.data.path == str(tmp_path / "texts" / "*.t[xy]t")
    out = resolve_paths(config_from_dict({"data": {"path": "{stdlib}/json/*.py"}}))
    assert out.data.path == os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
    absolute = str(tmp_path / "corpus.txt")
    assert resolve_paths(config_from_dict({"data": {"path": absolute}})).data.path == absolute
    assert resolve_paths(out) == out  # idempotent


# -----------------------------------------------------------------------------
# properties

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    st.text(max_size=20),
    st.sampled_from(["lstm", "adam", "cosine", "float64", "skip", "replace", "utf-8", "1e-3"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
)
any_key = st.one_of(st.sampled_from(KEYS), st.text(max_size=12).map(lambda s: f"train.{s}"))


@st.composite
def raw_configs(draw):
    d: dict = {}
    for key in draw(st.lists(any_key, max_size=8)):
        section, _, name = key.partition(".")
        d.setdefault(section, {})[name] = draw(values)
    if draw(st.booleans()):
        d.setdefault("data", {})["path"] = "corpus.txt"
    if draw(st.booleans()):
        d[draw(st.sampled_from(list(SCHEMA)))] = draw(values)
    return d


@settings(max_examples=400, deadline=None)
@given(raw_configs())
def test_config_from_dict_only_config_error(d):
    try:
        cfg = config_from_dict(d, "cfg.yaml")
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg and "cfg.yaml" in msg and len(msg) < 400
        return
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def valid_value(tp):
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    return {
        bool: st.booleans(),
        int: st.integers(1, 10**6),
        float: st.floats(0.0, 0.999),
        str: st.text(min_size=1).filter(str.strip),
    }[tp]


@st.composite
def valid_configs(draw):
    d = {
        s: {
            k: draw(valid_value(tp))
            for k, tp in fields.items()
            if k != "encoding" and draw(st.booleans())
        }
        for s, fields in SCHEMA.items()
    }
    d["data"]["path"] = draw(st.text(min_size=1).filter(str.strip))
    d["data"]["val_fraction"] = draw(st.floats(0, 0.49))
    d["data"]["test_fraction"] = draw(st.floats(0, 0.49))
    d["train"]["learning_rate"] = draw(st.floats(1e-6, 1.0))
    d["train"]["lr_min"] = 0.0
    if d["train"].get("eps") == 0 or d["train"].get("lr_decay") == 0:
        d["train"]["eps"] = d["train"]["lr_decay"] = 0.5
    return d


@settings(max_examples=200, deadline=None)
@given(valid_configs())
def test_round_trip(d):
    cfg = config_from_dict(d)
    plain = config_to_dict(cfg)
    assert config_from_dict(plain) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(plain))) == cfg
    assert dataclasses.asdict(cfg) == plain


CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every config in configs/ loads as written: no key the schema does not know, no value
    out of its range (a typo there would only show when a user runs it)."""
    cfg = load_config(path)
    assert cfg.data.path in ("data/tinyshakespeare.txt", "{stdlib}/*.py", "{stdlib}/json/*.py")


def test_40min_recipe_is_the_documented_one():
    """configs/shakespeare-40min.yaml holds the ingredients README's "Training for quality"
    lists and measures, and the split of the references (the last 10% held out)."""
    cfg = load_config(CONFIGS_DIR / "shakespeare-40min.yaml")
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers) == ("lstm", 512, 2)
    assert (cfg.model.dropout, cfg.model.weight_drop) == (0.25, 0.2)
    assert (cfg.train.optimizer, cfg.train.weight_decay) == ("adamw", 0.1)
    assert (cfg.train.max_minutes, cfg.train.ema, cfg.train.reset_prob) == (40, 0.999, 0.01)
    assert (cfg.data.val_fraction, cfg.train.eval_max_chars) == (0.1, 0)
