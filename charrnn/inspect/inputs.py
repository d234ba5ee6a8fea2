"""What every inspection starts from: a checkpoint and a text, read, and its output path
checked before any work. Nothing here writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from ..data import load_text_ids


def open_inputs(checkpoint: str, text: str, output: str | None = None,
                plot: bool = False) -> tuple[Checkpoint, np.ndarray, int]:
    """The checkpoint (a file, or a run directory's best), the text's ids with the
    characters outside the vocabulary dropped, and how many were dropped.

    `output`, the file the caller will write, is refused first when it cannot be written
    or lies in the run directory; with `plot`, so is a missing matplotlib."""
    from .page import check_output_path

    ckpt_path = resolve_checkpoint(checkpoint)
    if output:
        check_output_path(Path(output), ckpt_path)
    if plot:
        from .plots import require_matplotlib

        require_matplotlib()
    ckpt = load_checkpoint(ckpt_path)
    ids, n_unknown = load_text_ids(text, ckpt.vocab, unknown="skip")
    return ckpt, ids, n_unknown
