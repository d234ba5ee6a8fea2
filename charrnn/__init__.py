"""charrnn: character-level recurrent language models in numpy.

Use it from Python as from the shell (`charrnn train / sample / eval`):

    import charrnn

    result = charrnn.train("configs/default.yaml", overrides={"train.max_steps": 500},
                           callback=lambda row: print(row["step"], row["train_loss"]))
    model = charrnn.load(result.run_dir)          # a checkpoint file or a run directory
    model.sample("ROMEO:", length=200, temperature=0.8, rng_seed=1)   # seed + 200 chars
    for piece in model.stream("ROMEO:", length=200):                  # as it is generated
        print(piece, end="", flush=True)
    model.score(held_out_text)                    # EvalResult(loss, bpc, perplexity, ...)
    model.next_char_probs("ROME")                 # {"a": 0.01, ..., "O": 0.93, ...}
    model.vocab, model.config, model.num_params

load(path) -> Model
    A trained model from a checkpoint file or a run directory (its best checkpoint).
train(config, overrides=None, resume=False, callback=None) -> TrainResult
    The same run as `charrnn train`; config is a YAML path or a dict of sections.
Model.sample / stream / score / next_char_probs
    Exactly what `charrnn sample --rng-seed S` prints and `charrnn eval` reports.

Bad input raises a CharRNNError subclass (ConfigError, DataError, VocabError,
CheckpointError, RunDirError, ArgumentError, ...), never a traceback from deep inside;
TrainingInterrupted after Ctrl-C, NonFiniteError when training diverges.
Importing charrnn is cheap: numpy and the model load on first use of load/train/Model.
"""

from __future__ import annotations

from .errors import (
    ArgumentError,
    CharRNNError,
    CheckpointError,
    ConfigError,
    DataError,
    MissingExtraError,
    NonFiniteError,
    RunDirError,
    TrainingInterrupted,
    VocabError,
)

TYPE_CHECKING = False  # typing itself is not imported: it would double the import time
if TYPE_CHECKING:
    from typing import Any

    from .api import Model, load, train
    from .evaluate import EvalResult
    from .train import TrainResult

__version__ = "1.0.0"

# name -> the module that defines it, imported on first use (numpy, yaml, tqdm load then)
_LAZY = {
    "load": "api", "train": "train", "Model": "api",
    "EvalResult": "evaluate", "TrainResult": "train",
}

__all__ = [
    "load", "train", "Model", "EvalResult", "TrainResult",
    "CharRNNError", "ArgumentError", "CheckpointError", "ConfigError", "DataError",
    "MissingExtraError", "NonFiniteError", "RunDirError", "TrainingInterrupted", "VocabError",
]


def __getattr__(name: str) -> Any:
    """The Python API's functions and classes, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'charrnn' has no attribute {name!r}")
    import importlib

    found = importlib.import_module(f".{module}", __name__)
    # `charrnn.train` is the submodule (importing it sets the name here); the module is
    # callable, and calling it is the Python API's train
    value = found if name == "train" else getattr(found, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
