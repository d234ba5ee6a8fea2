"""The run configuration: typed dataclasses, loaded from YAML and validated up front.

A config file has four sections (data, model, train, output). Every key is optional except
`data.path`. `load_config` reads the file (yaml.safe_load only), applies `KEY=VALUE`
overrides and hands the result to `config_from_dict`, which refuses any unknown key, wrong
type or out-of-range value with a one-line ConfigError naming the file, the full dotted key
and the bad value. Paths stay as written until `resolve_paths`, which the trainer calls.
"""

import codecs
import copy
import dataclasses
import difflib
import math
import operator
import os
import re
import reprlib
import sysconfig
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from charrnn.errors import ConfigError

# -----------------------------------------------------------------------------
# schema: the CONTRACT keys and defaults, plus the extensions marked "extension"


@dataclass
class DataConfig:
    path: str = ""  # required: a file, a directory, or a glob; "{stdlib}" = Python's stdlib
    include: str = "*"  # file pattern when path is a directory
    encoding: str = "utf-8"
    errors: Literal["strict", "replace"] = "strict"
    val_fraction: float = 0.05  # contiguous tail of the corpus
    test_fraction: float = 0.0
    cache: bool = True  # extension: cache the encoded corpus as .npy, memory-mapped


@dataclass
class ModelConfig:
    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embedding_size: int = 64  # 0 means one-hot input
    dropout: float = 0.0
    weight_drop: float = 0.0  # DropConnect on weight_hh, one mask per window
    input_dropout: float = 0.0  # extension: locked dropout on the embedded characters


@dataclass
class TrainConfig:
    batch_size: int = 32
    seq_length: int = 64  # truncated-BPTT window
    stateful: bool = True  # carry the hidden state from one window to the next
    max_steps: int = 5000
    optimizer: Literal["sgd", "momentum", "rmsprop", "adagrad", "adam", "adamw"] = "adam"
    learning_rate: float = 0.002
    lr_schedule: Literal["constant", "step", "exponential", "cosine"] = "constant"
    warmup_steps: int = 0  # linear warm-up, any schedule
    lr_decay: float = 0.5  # factor for step and exponential, per lr_decay_every steps
    lr_decay_every: int = 1000
    grad_clip: float = 5.0  # global norm; 0 disables
    eval_every: int = 250
    seed: int = 1234
    dtype: Literal["float32", "float64"] = "float32"
    on_nonfinite: Literal["stop", "skip"] = "stop"  # extension: stop (exit 1) or skip the step
    checkpoint_every: int = 0  # extension: 0 means same as eval_every
    log_every: int = 10  # extension: metrics.jsonl train rows every N steps
    eval_max_chars: int = 200_000  # extension: validation chars per evaluation; 0 = all
    momentum: float = 0.9  # extension: for the momentum optimizer
    weight_decay: float = 0.01  # extension: decoupled, adamw only
    beta1: float = 0.9  # extension: adam / adamw
    beta2: float = 0.999  # extension: adam / adamw
    eps: float = 1e-8  # extension: rmsprop / adagrad / adam / adamw
    lr_min: float = 0.0  # extension: floor of the cosine schedule
    max_minutes: float = 0.0  # wall-clock budget; the schedule spans the steps that fit
    ema: float = 0.0  # decay of the weights' moving average (0: off); evaluation uses it
    reset_prob: float = 0.0  # extension: chance a stream's carried state is zeroed per window
    random_offset: bool = False  # extension: each epoch after the first starts at a random point
    reduce: Literal["allreduce", "ordered"] = "allreduce"  # MPI: how gradients are summed


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    keep_last: int = 3


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
# section -> key -> type, straight from the dataclasses
SCHEMA: dict[str, dict[str, Any]] = {s: typing.get_type_hints(c) for s, c in SECTIONS.items()}
KEYS = [f"{s}.{k}" for s, fields in SCHEMA.items() for k in fields]

# numeric ranges: every bound must hold
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_UNIT = ((">=", 0), ("<", 1))
BOUNDS: dict[str, tuple[tuple[str, float], ...]] = {
    "data.val_fraction": _UNIT,
    "data.test_fraction": _UNIT,
    "model.hidden_size": ((">=", 1),),
    "model.num_layers": ((">=", 1),),
    "model.embedding_size": ((">=", 0),),
    "model.dropout": _UNIT,
    "model.weight_drop": _UNIT,
    "model.input_dropout": _UNIT,
    "train.batch_size": ((">=", 1),),
    "train.seq_length": ((">=", 1),),
    "train.max_steps": ((">=", 1),),
    "train.learning_rate": ((">", 0),),
    "train.warmup_steps": ((">=", 0),),
    "train.lr_decay": ((">", 0), ("<=", 1)),
    "train.lr_decay_every": ((">=", 1),),
    "train.grad_clip": ((">=", 0),),
    "train.eval_every": ((">=", 1),),
    "train.seed": ((">=", 0),),
    "train.checkpoint_every": ((">=", 0),),
    "train.log_every": ((">=", 1),),
    "train.eval_max_chars": ((">=", 0),),
    "train.momentum": _UNIT,
    "train.weight_decay": ((">=", 0),),
    "train.beta1": _UNIT,
    "train.beta2": _UNIT,
    "train.eps": ((">", 0),),
    "train.lr_min": ((">=", 0),),
    "train.max_minutes": ((">=", 0),),
    "train.ema": _UNIT,
    "train.reset_prob": _UNIT,
    "output.keep_last": ((">=", 1),),
}
NONEMPTY = {"data.path", "data.include", "data.encoding", "output.dir"}

# YAML 1.1 reads `1e-3` as a string; a float key takes it as the number YAML 1.2 would
_FLOAT_STR = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60


def _show(value: Any) -> str:
    return _repr.repr(value)  # bounded, one line, even for huge or self-referencing values


# -----------------------------------------------------------------------------
# validation


def _check_value(key: str, value: Any, source: str) -> Any:
    """Return `value` typed for `key` ("section.name"), or raise a one-line ConfigError."""
    section, name = key.split(".")
    tp = SCHEMA[section][name]
    raw = value  # messages show the value as the user wrote it

    def fail(what: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {what}, got {_show(raw)}")

    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if not isinstance(value, str) or value not in choices:
            fail("one of " + "|".join(choices))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif tp is float:
        if isinstance(value, str) and _FLOAT_STR.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        try:
            value = float(value)
        except OverflowError:
            fail("a finite number")
        if not math.isfinite(value):
            fail("a finite number")
    elif tp is str:
        if not isinstance(value, str):
            fail("a string")
        if key in NONEMPTY and not value.strip():
            fail("a non-empty string")
        if key == "data.encoding":
            try:
                is_text = getattr(codecs.lookup(value), "_is_text_encoding", True)
            except (LookupError, ValueError):
                is_text = False
            if not is_text:  # rot13, base64 and the like are codecs but not text encodings
                fail("a known text encoding")
    bounds = BOUNDS.get(key, ())
    if not all(_OPS[op](value, bound) for op, bound in bounds):
        fail(" and ".join(f"{op} {bound}" for op, bound in bounds))
    return value


_LEAVES = {k.split(".")[1]: k for k in KEYS}  # leaf names are unique across sections


def _unknown(key: Any, source: str) -> ConfigError:
    """A ConfigError for an unknown key, with the nearest valid key when there is one."""
    msg = f"unknown key {_show(key)} in {source}"
    key = str(key)
    leaf = key.rsplit(".", 1)[-1]
    if _LEAVES.get(leaf, key) != key:  # a known key outside its section
        return ConfigError(f"{msg}; did you mean {_LEAVES[leaf]!r}?")
    candidates = [k for k in [*SCHEMA, *KEYS] if k != key]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return ConfigError(f"{msg}; did you mean {close[0]!r}?" if close else msg)


def _section(d: Mapping, section: str, source: str) -> Mapping:
    raw = d.get(section)
    if raw is None:
        return {}  # `model:` with nothing under it means all defaults
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {section} must be a mapping of keys, got {_show(raw)}")
    return raw


def config_from_dict(d: Mapping, source: str = "<config>") -> Config:
    """Build a validated Config from plain nested dicts (as YAML gives them)."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {_show(d)}")
    for key in d:
        if key not in SCHEMA:
            raise _unknown(key, source)
    sections = {}
    for section, cls in SECTIONS.items():
        raw = _section(d, section, source)
        values = {}
        for name, value in raw.items():
            dotted = f"{section}.{name}"
            if name not in SCHEMA[section]:
                raise _unknown(dotted, source)
            values[name] = _check_value(dotted, value, source)
        sections[section] = cls(**values)
    cfg = Config(**sections)
    if "path" not in _section(d, "data", source):
        raise ConfigError(f"{source}: data.path is required (the training text)")
    data, train = cfg.data, cfg.train
    if data.val_fraction + data.test_fraction >= 1:
        raise ConfigError(
            f"{source}: data.val_fraction + data.test_fraction must be < 1, "
            f"got {data.val_fraction} + {data.test_fraction}"
        )
    if cfg.model.input_dropout > 0 and cfg.model.embedding_size == 0:
        raise ConfigError(
            f"{source}: model.input_dropout needs an embedding (model.embedding_size > 0), "
            f"got {cfg.model.input_dropout} with one-hot input"
        )
    if train.lr_min > train.learning_rate:
        raise ConfigError(
            f"{source}: train.lr_min must be <= train.learning_rate ({train.learning_rate}), "
            f"got {train.lr_min}"
        )
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dicts, ready for yaml.safe_dump; config_from_dict reads them back."""
    return dataclasses.asdict(cfg)


# -----------------------------------------------------------------------------
# files and overrides


def _safe_load(text: str) -> Any:
    """yaml.safe_load, every malformed document raised as yaml.YAMLError. PyYAML lets the
    ValueError or OverflowError of a value it cannot build escape as they are: a date such
    as 2001-02-30, `!!int 1x`, a "\\U..." escape past U+10FFFF (its chr())."""
    try:
        return yaml.safe_load(text)
    except (ValueError, OverflowError) as e:
        raise yaml.YAMLError(str(e)) from None


def _read_yaml(path: str | os.PathLike) -> Any:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{name}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: config file is not valid UTF-8 ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read config file ({e.strerror or e})") from None
    try:
        return _safe_load(text)
    except RecursionError:
        raise ConfigError(f"{name}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None


def _apply_override(d: dict, item: str) -> None:
    """Apply one `section.key=VALUE` to the raw dict; VALUE is YAML, typed by the schema."""
    where = f"override {item!r}"
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq:
        raise ConfigError(f"{where}: expected KEY=VALUE, e.g. model.hidden_size=128")
    _set_key(d, key, text, where)


def _set_key(d: dict, key: str, value: Any, where: str) -> None:
    """Set one dotted key of the raw dict; a str VALUE is read as `--set` reads it (YAML,
    typed by the schema; verbatim for str keys), any other value is taken as it is."""
    if not isinstance(key, str) or key not in KEYS:
        raise _unknown(key, where)
    section, name = key.split(".")
    if isinstance(value, str) and SCHEMA[section][name] is not str:
        text = value  # paths and patterns stay verbatim: `*.py` is not a YAML alias here
        try:
            value = _safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{where}: {key} value {text!r} is not valid YAML") from None
    if not isinstance(d.get(section), dict):
        d[section] = dict(d.get(section) or {})
    d[section][name] = _check_value(key, value, where)


def load_config(
    path: str | os.PathLike | Mapping,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> Config:
    """Read a YAML config (or take a dict of sections), apply the overrides, validate.

    `overrides` are `KEY=VALUE` strings as `--set` takes them, or a mapping of dotted keys
    to values (a str value is read as `--set` reads it). Paths are left as written."""
    if isinstance(path, Mapping):
        source = "<config dict>"
        d = copy.deepcopy(dict(path))
    else:
        source = os.fspath(path)
        d = _read_yaml(path)
    if d is None:
        d = {}  # an empty file: all defaults (data.path is still required)
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {_show(d)}")
    for section in SCHEMA:
        _section(d, section, source)  # a malformed section is the file's fault, not --set's
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            _set_key(d, key, value, f"override {key!r}")
    else:
        for item in overrides:
            _apply_override(d, item)
    return config_from_dict(d, source)


def _resolve(path: str) -> str:
    path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return os.path.abspath(os.path.expanduser(path))  # glob characters pass through


def resolve_paths(cfg: Config) -> Config:
    """A copy with data.path and output.dir absolute ("{stdlib}" and "~" expanded)."""
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=_resolve(cfg.data.path)),
        output=dataclasses.replace(cfg.output, dir=_resolve(cfg.output.dir)),
    )
