"""Cheap training signals for the evaluation rows of metrics.jsonl (what `charrnn plot` draws).

At each evaluation the trainer adds to its row:

- `clip_fraction`: the fraction of the updates made since the previous evaluation whose
  global gradient norm (before clipping) exceeded `train.grad_clip`; 0 when clipping is off.
  Skipped updates (`train.on_nonfinite: skip`) count neither way. The two counters travel
  in the checkpoint's training state, so a resumed run logs the same fraction as a straight
  one (a checkpoint written before this existed resumes with the counters at zero).
- `sigma_max_hh`: per layer, the largest singular value of the whole `rnn.weight_hh_l{k}`
  ((G*H, H), every gate block together): how strongly the recurrence can amplify.
- `val_gate_saturation` (runs with a validation split): per layer, the mean over gates and
  units of the left- plus right-saturated fractions (the CONTRACT's `inspect gates`
  definitions) over the first `SATURATION_CHARS` characters of the validation split.

During training the only per-step work is `record_step`: one comparison and two counter
increments. Everything else runs at evaluation time, reads the weights and never changes
them nor touches the training RNG, so resume stays bit-exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import blas

# the validation prefix that gate saturation is measured over (a stateful pass, batch 1)
SATURATION_CHARS = 2000


def sigma_max_hh(params: dict[str, np.ndarray]) -> list[float]:
    """The largest singular value of each layer's full `rnn.weight_hh_l{k}`, layer 0 first."""
    out = []
    k = 0
    while f"rnn.weight_hh_l{k}" in params:
        W = params[f"rnn.weight_hh_l{k}"]
        out.append(float(np.linalg.norm(W.astype(np.float64, copy=False), 2)))
        k += 1
    return out


def val_gate_saturation(params: dict[str, np.ndarray], cell: str,
                        ids: np.ndarray) -> list[float] | None:
    """Per layer, the mean saturation over `ids` (see `charrnn.inspect.gates.mean_saturation`);
    None when the text is too short to say anything."""
    if len(ids) < 2:
        return None
    from .inspect.gates import mean_saturation

    return [float(v) for v in mean_saturation(params, cell, ids)]


class TrainingSignals:
    """Counts clipped updates between evaluations and builds the signals of an eval row."""

    def __init__(self, grad_clip: float, cell: str):
        self.grad_clip = grad_clip
        self.cell = cell
        self.steps = 0  # updates made since the last evaluation
        self.clipped = 0  # of which clipped

    def record_step(self, norm: float) -> None:
        """One update was made with this pre-clip global gradient norm (the hot path)."""
        self.steps += 1
        if norm > self.grad_clip > 0:  # the same test as optim.clip_by_global_norm_
            self.clipped += 1

    def eval_signals(self, params: dict[str, np.ndarray],
                     val_ids: np.ndarray | None) -> dict[str, Any]:
        """The signals for this evaluation's row; starts counting the next interval."""
        row: dict[str, Any] = {"clip_fraction": self.clipped / self.steps if self.steps else 0.0}
        # small matrices, batch-1 steps: one BLAS thread is as fast, and never stalls when
        # the cores are busy (OpenBLAS's threads spin-wait for each other)
        with blas.single_threaded():
            row["sigma_max_hh"] = sigma_max_hh(params)
            if val_ids is not None:
                saturation = val_gate_saturation(params, self.cell, val_ids[:SATURATION_CHARS])
                if saturation is not None:
                    row["val_gate_saturation"] = saturation
        self.steps = self.clipped = 0
        return row

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "clipped": self.clipped}

    def load_state_dict(self, state: Any) -> None:
        """Restores the counters; anything else (an older checkpoint: None) resets them."""
        ok = (isinstance(state, dict)
              and all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                      and state[k] >= 0 for k in ("steps", "clipped"))
              and state["clipped"] <= state["steps"])
        self.steps, self.clipped = (state["steps"], state["clipped"]) if ok else (0, 0)
