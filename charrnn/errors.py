"""Domain errors. Raised deep inside; the CLI turns each into a one-line message.

`exit_code` is what the process exits with (CONTRACT: 2 for bad input, 1 when
training stops because the numbers became non-finite).
"""

from __future__ import annotations


class CharRNNError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    exit_code = 2


class ConfigError(CharRNNError):
    """A config file, key or value is wrong."""


class DataError(CharRNNError):
    """A corpus or text file is missing, unreadable, empty or badly encoded."""


class VocabError(CharRNNError):
    """Text holds characters that the vocabulary does not know."""


class CheckpointError(CharRNNError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


class RunDirError(CharRNNError):
    """The run directory cannot be used (unwritable, locked by another run, full disk)."""


class MissingExtraError(CharRNNError):
    """An optional dependency (a `pip install "charrnn[...]"` extra) is not installed."""


class NonFiniteError(CharRNNError):
    """Loss, gradients or weights became NaN/Inf during training."""

    exit_code = 1


class TrainingInterrupted(CharRNNError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143), raised once the checkpoint is on disk."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class ArgumentError(CharRNNError, ValueError):
    """An argument of a Python API call (charrnn.api) is of the wrong type or out of range."""
