"""Gate saturation: how often each gate (and each tanh-valued unit) sits at its rails.

Karpathy, Johnson and Fei-Fei (2015) count, per unit, the fraction of time a sigmoid gate is
left-saturated (< 0.1) or right-saturated (> 0.9). A forget gate that is right-saturated
most of the time keeps its cell, and the error carried back through it, alive for many
steps; an input gate that is left-saturated most of the time ignores its input.

The model runs statefully over one stream from the zero state, every step counts, dropout
off (the plain equations of `charrnn.inspect.equations` have none). Counts accumulate chunk
by chunk, so a long text never holds all its activations at once.

Thresholds (CONTRACT, "inspect gates"):
    sigmoid gates (lstm i, f, o; gru r, z):          left < 0.1,   right > 0.9
    tanh values (rnn h; lstm g, cell = tanh(c); gru n): left < -0.9,  right > 0.9
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .equations import SATURATING, PlainModel

SIGMOID_LEFT, SIGMOID_RIGHT = 0.1, 0.9
TANH_LEFT, TANH_RIGHT = -0.9, 0.9
# a unit is "mostly saturated" when left + right > MOSTLY of the steps
MOSTLY = 0.5
CHUNK = 2048  # steps per chunk of the pass


def thresholds(sigmoid: bool) -> tuple[float, float]:
    """(left, right) thresholds of a sigmoid gate or of a tanh value."""
    return (SIGMOID_LEFT, SIGMOID_RIGHT) if sigmoid else (TANH_LEFT, TANH_RIGHT)


@dataclass(frozen=True)
class GateStats:
    """One gate of one layer: the per-unit saturated fractions."""

    sigmoid: bool
    left: np.ndarray  # (H,) fraction of steps below the left threshold
    right: np.ndarray  # (H,) fraction of steps above the right threshold

    @property
    def mostly_saturated(self) -> float:
        """The share of units saturated (left or right) more than MOSTLY of the steps."""
        return float(np.mean(self.left + self.right > MOSTLY))


@dataclass(frozen=True)
class GateReport:
    """The saturated fractions of every layer, gate and unit over `chars` steps."""

    cell: str
    chars: int
    layers: tuple[dict[str, GateStats], ...]  # per layer: gate name -> stats

    def to_json(self) -> dict:
        """The CONTRACT object of `inspect gates --json`."""
        return {
            "cell": self.cell,
            "chars": self.chars,
            "layers": [
                {"layer": k,
                 "gates": {name: {"left": s.left.tolist(), "right": s.right.tolist()}
                           for name, s in gates.items()}}
                for k, gates in enumerate(self.layers)
            ],
        }

    def mean_saturation(self) -> list[float]:
        """Per layer: the mean over gates and units of left + right."""
        return [float(np.mean([np.mean(s.left + s.right) for s in gates.values()]))
                for gates in self.layers]

    def table(self) -> str:
        """A terminal table: per layer and gate, mean left, mean right, mostly saturated."""
        lines = [f"gate saturation of a {self.cell} over {self.chars:,} characters",
                 f"{'layer':>5}  {'gate':<5} {'kind':<8} {'left':>6} {'right':>6} "
                 f"{'mostly saturated':>17}"]
        for k, gates in enumerate(self.layers):
            for name, s in gates.items():
                kind = "sigmoid" if s.sigmoid else "tanh"
                lines.append(f"{k:>5}  {name:<5} {kind:<8} {s.left.mean():>6.3f} "
                             f"{s.right.mean():>6.3f} {s.mostly_saturated:>16.1%}")
        lines += [
            "left/right: the fraction of steps below 0.1 / above 0.9 (sigmoid gates) or below"
            " -0.9 / above 0.9 (tanh values; cell = tanh(c)), the mean over units.",
            f"mostly saturated: the share of units whose left + right exceeds {MOSTLY:g},"
            " i.e. saturated more than half of the time.",
        ]
        return "\n".join(lines)


def gate_saturation(params: dict[str, np.ndarray], cell: str, ids: np.ndarray,
                    chunk: int = CHUNK, progress: bool | None = None) -> GateReport:
    """The saturated fractions of every gate over a stateful pass over `ids` (N,).

    `progress`: a tqdm bar on stderr; None shows it when stderr is a terminal."""
    model = PlainModel.from_params(params, cell)
    names = SATURATING[cell]
    L, H = len(model.layers), model.hidden_size
    left = np.zeros((L, len(names), H), np.int64)  # (L, gates, H) counts
    right = np.zeros((L, len(names), H), np.int64)  # (L, gates, H)
    los = np.array([thresholds(s)[0] for _, s in names])[:, None, None]  # (gates, 1, 1)
    his = np.array([thresholds(s)[1] for _, s in names])[:, None, None]  # (gates, 1, 1)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(ids), unit="char", unit_scale=True, disable=not show, leave=False,
              file=sys.stderr, desc="gates") as bar:
        for _, caches in model.run(np.asarray(ids), chunk=chunk):
            for k, steps in enumerate(caches):
                acts = np.stack([np.concatenate([c[name] for c in steps])
                                 for name, _ in names])  # (gates, T, H)
                left[k] += (acts < los).sum(axis=1)
                right[k] += (acts > his).sum(axis=1)
            bar.update(len(caches[0]) if caches else 0)
    n = max(len(ids), 1)
    layers = tuple(
        {name: GateStats(sigmoid, left[k, j] / n, right[k, j] / n)
         for j, (name, sigmoid) in enumerate(names)}
        for k in range(L)
    )
    return GateReport(cell, int(len(ids)), layers)


def mean_saturation(params: dict[str, np.ndarray], cell: str, ids: np.ndarray) -> list[float]:
    """Per layer: the mean over gates and units of the saturated fraction (left + right),
    over a stateful pass over `ids` from the zero state. Cheap for a few thousand chars
    (a training-time metric); no progress bar."""
    return gate_saturation(params, cell, ids, progress=False).mean_saturation()


def inspect_gates(checkpoint: str, text: str,
                  plot_path: str | None = None) -> tuple[GateReport, int]:
    """`charrnn inspect gates`: the report for a checkpoint (file or run dir) over a text
    file, and the number of characters outside the vocabulary that were dropped.

    `plot_path`, where the caller will draw the scatter, is checked first (writable, not in
    the run directory), before any work."""
    from .inputs import open_inputs

    ckpt, ids, n_unknown = open_inputs(checkpoint, text, plot_path, plot=bool(plot_path))
    return gate_saturation(ckpt.params, ckpt.config.model.cell, ids), n_unknown
