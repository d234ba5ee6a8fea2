"""Plots: gradient flow through time, Karpathy's gate-saturation scatter, training curves.

matplotlib is an optional extra (`pip install "charrnn[plot]"`): it is imported only when a
plot is drawn, never at `import charrnn`, and only through its object-oriented API (a
`Figure` rendered by the Agg canvas, no pyplot), so no global backend state is touched.
Without it, `require_matplotlib` raises MissingExtraError, one line naming the extra.

Every function writes one PNG atomically (rendered in memory, then written to a temporary
file in the same folder and renamed over the target): a reader sees the old image or the
new one, never half of one, and an unwritable path is a one-line RunDirError.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, MissingExtraError, RunDirError
from ..fileio import atomic_write_bytes, check_writable
from .gradients import HORIZON_RATIO, effective_horizon

EXTRA_HINT = 'plotting needs matplotlib: pip install "charrnn[plot]"'
DPI = 100
LN2 = math.log(2)
# one colour per gate name, the same in every plot
GATE_COLOURS = {"i": "tab:blue", "f": "tab:orange", "g": "tab:green", "o": "tab:red",
                "cell": "tab:purple", "r": "tab:blue", "z": "tab:orange", "n": "tab:green",
                "h": "tab:purple"}
LAYER_STYLES = ("-", "--", ":", "-.")


def require_matplotlib():
    """The matplotlib `Figure` class; MissingExtraError (exit 2) when it is not installed."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(EXTRA_HINT) from None
    return Figure


def _new_figure(width: float, height: float):
    Figure = require_matplotlib()
    return Figure(figsize=(width, height), dpi=DPI, constrained_layout=True)


def _save(fig, path: str | Path) -> None:
    """Renders `fig` as PNG (Agg) and writes it to `path` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    atomic_write_bytes(path, _palette_png(buf.getvalue()))


def _palette_png(png: bytes) -> bytes:
    """The image with a 256-colour palette: the same look (a plot has few colours), a
    third of the bytes. Pillow comes with matplotlib; without it the PNG stays as it is."""
    try:
        from PIL import Image
    except ImportError:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(out, format="PNG")
    return out.getvalue()


# -- inspect gradients ----------------------------------------------------------------------


def _log_limits(values: list[float]) -> tuple[float, float] | None:
    """y limits for a log axis: the positive finite values, a decade of margin each side."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if not pos:
        return None
    return min(pos) / 10, max(pos) * 10


def plot_gradients(report: dict[str, Any], path: str | Path) -> None:
    """The `inspect gradients` JSON object as two log-scale panels against the lag k.

    Left: each layer's grad_norm, normalised by its value at lag 0, with the effective
    horizon marked. Right: each layer's jacobian_norm and, for the tanh rnn, the bound
    sigma_max(W_hh)^k (dashed), which the measured norm can never exceed."""
    require_matplotlib()
    check_writable(Path(path))
    fig = _new_figure(12, 4.5)
    ax_g, ax_j = fig.subplots(1, 2)
    cell, layers = report["cell"], report["layers"]
    grad_values, jac_values = [], []
    for n, layer in enumerate(layers):
        colour = f"C{n % 10}"
        lags, g, j = layer["lag"], layer["grad_norm"], layer["jacobian_norm"]
        g0 = g[0] if g and g[0] > 0 else 1.0
        g_rel = [v / g0 for v in g]
        grad_values += g_rel
        jac_values += j
        horizon = effective_horizon(g) if g else None  # the lag k is its index
        reach = f"> {lags[-1]}" if horizon is None and lags else horizon
        ax_g.plot(lags, g_rel, color=colour, label=f"layer {layer['layer']}: horizon {reach}")
        if horizon is not None:
            ax_g.axvline(horizon, color=colour, linestyle=":", linewidth=1)
        ax_j.plot(lags, j, color=colour, label=f"layer {layer['layer']}: measured")
        sigma = layer.get("weights", {}).get("h", {}).get("sigma_max")
        if cell == "rnn" and sigma is not None:
            ax_j.plot(lags, [sigma**k for k in lags], color=colour, linestyle="--",
                      label=f"layer {layer['layer']}: bound σmax(W_hh)^k, σmax={sigma:.3g}")
    ax_g.axhline(HORIZON_RATIO, color="grey", linestyle=":", linewidth=1)
    ax_g.set_title("gradient norm ||dl/dh(t-k)||, relative to lag 0\n"
                   f"(dotted: the effective horizon, where it falls below {HORIZON_RATIO:g})",
                   fontsize=10)
    ax_g.set_ylabel("grad_norm[k] / grad_norm[0]")
    ax_j.set_title("state Jacobian norm σmax(ds(t)/ds(t-k))\n"
                   + ("(dashed: the bound σmax(W_hh)^k, as tanh' ≤ 1)" if cell == "rnn" else
                      f"({cell}: the gates carry the state, no σmax(W_hh)^k bound)"),
                   fontsize=10)
    ax_j.set_ylabel("jacobian_norm[k]")
    for ax, values in ((ax_g, grad_values), (ax_j, jac_values + [1.0])):
        ax.set_yscale("log", nonpositive="mask")
        limits = _log_limits(values)
        if limits is not None:
            ax.set_ylim(*limits)  # a bound far outside the measured range runs off the axis
        ax.set_xlabel("lag k (steps back)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{cell}: gradient flow through time ({report.get('windows', '?')} windows, "
                 f"prime {report.get('prime', '?')})")
    _save(fig, path)


# -- inspect gates --------------------------------------------------------------------------


def plot_gates(report: dict[str, Any], path: str | Path) -> None:
    """The `inspect gates` JSON object as Karpathy et al. (2015)'s scatter: a panel per
    layer, one point per unit and gate (x: the fraction of steps left-saturated, y: right-
    saturated), a colour per gate. Points near x + y = 1 (drawn) are almost always saturated;
    near the origin, rarely."""
    require_matplotlib()
    check_writable(Path(path))
    layers = report["layers"]
    cols = min(len(layers), 3) or 1
    rows = math.ceil(len(layers) / cols) or 1
    fig = _new_figure(4.2 * cols, 4.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        ax.plot([0, 1], [1, 0], color="grey", linestyle="--", linewidth=1)
        for n, (gate, frac) in enumerate(layer["gates"].items()):
            ax.scatter(frac["left"], frac["right"], s=8, alpha=0.6, linewidths=0,
                       color=GATE_COLOURS.get(gate, f"C{n % 10}"), label=gate)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"layer {layer['layer']}")
        ax.set_xlabel("fraction left-saturated")
        ax.set_ylabel("fraction right-saturated")
        ax.legend(fontsize=8, markerscale=2, loc="upper right")
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    fig.suptitle(f"{report['cell']}: gate saturation over {report.get('chars', '?')} chars "
                 "(sigmoid < 0.1 / > 0.9, tanh < -0.9 / > 0.9)")
    _save(fig, path)


# -- charrnn plot: training curves ----------------------------------------------------------


def _metrics_file(run: str | Path) -> Path:
    """A run directory's metrics.jsonl (or the file itself, when given one)."""
    run = Path(run)
    if run.is_file() and run.suffix == ".jsonl":
        return run
    if not run.is_dir():
        raise RunDirError(f"{run}: no such run directory")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise RunDirError(f"{metrics}: not found; is {run} a charrnn run directory?")
    return metrics


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl. A last line cut short (a run killed mid-write) is
    ignored; any other line that is not a JSON object, or no rows at all, is a DataError."""
    path = _metrics_file(run)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):
                break  # truncated by a kill mid-write
            raise DataError(f"{path}: line {n} is not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no metrics rows yet")
    return rows


def _unique_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name; where two share one, their parent folders are added, then
    a number."""
    paths = [Path(r).resolve() for r in runs]
    paths = [p.parent if p.suffix == ".jsonl" else p for p in paths]
    labels = [p.name or str(p) for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if labels.count(label) > 1 else label
              for p, label in zip(paths, labels)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} ({seen[label]})")
    return out


def _grad_clip(run: str | Path) -> float | None:
    """train.grad_clip from the run's config.yaml, None when unknown or off."""
    try:
        import yaml

        cfg = yaml.safe_load((Path(run) / "config.yaml").read_text(encoding="utf-8"))
        clip = float(cfg["train"]["grad_clip"])
    except Exception:  # a plot does without the threshold line
        return None
    return clip if clip > 0 else None


def _is_eval_row(row: dict[str, Any]) -> bool:
    return "val_loss" in row or "clip_fraction" in row


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[Any]]:
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _per_layer(rows: list[dict[str, Any]], key: str) -> list[tuple[list[float], list[float]]]:
    """A list-valued key (one number per layer) as one (steps, values) series per layer."""
    steps, lists = _series(rows, key)
    lists = [v if isinstance(v, list) else [] for v in lists]
    L = max((len(v) for v in lists), default=0)
    return [([s for s, v in zip(steps, lists) if len(v) > k],
             [v[k] for v in lists if len(v) > k]) for k in range(L)]


def _minor_label(ax, v: float) -> str:
    """On a log axis spanning less than two decades, labels 2 and 5 times a power of ten
    (and 3, under ~1.5 decades): with one major tick or two, the axis still reads."""
    lo, hi = ax.get_ylim()
    if not (v > 0 and lo > 0 and hi / lo < 100):
        return ""
    mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
    return f"{v:g}" if mantissa in (2, 5) or (mantissa == 3 and hi / lo < 30) else ""


def _bits_axis(ax) -> None:
    sec = ax.secondary_yaxis("right", functions=(lambda x: x / LN2, lambda x: x * LN2))
    sec.set_ylabel("bits/char")


class _Run:
    """One run's rows, split into training rows and evaluation rows."""

    def __init__(self, path: str | Path, label: str):
        self.path, self.label = Path(path), label
        rows = read_metrics(path)
        self.train = [r for r in rows if not _is_eval_row(r)]
        self.eval = [r for r in rows if _is_eval_row(r)]
        self.grad_clip = _grad_clip(self.path if self.path.is_dir() else self.path.parent)


class _Panel:
    """One panel of `plot_runs`: which rows and key it draws, and how."""

    def __init__(self, title: str, ylabel: str, key: str, evals: bool = False,
                 log: bool = False, bits: bool = False, layers: bool = False):
        self.title, self.ylabel, self.key = title, ylabel, key
        self.evals, self.log, self.bits, self.layers = evals, log, bits, layers

    def rows(self, run: _Run) -> list[dict[str, Any]]:
        return run.eval if self.evals else run.train

    def has_data(self, run: _Run) -> bool:
        return any(r.get(self.key) is not None for r in self.rows(run))

    def draw(self, ax, run: _Run, colour: str, width: float = 1.2) -> None:
        rows = self.rows(run)
        if self.layers:
            for k, (steps, values) in enumerate(_per_layer(rows, self.key)):
                ax.plot(steps, values, color=colour, marker=".", markersize=3,
                        linestyle=LAYER_STYLES[k % len(LAYER_STYLES)])
            return
        steps, values = _series(rows, self.key)
        marker = dict(marker=".", markersize=4) if self.evals else {}
        ax.plot(steps, values, color=colour, linewidth=width, **marker)
        if self.key == "grad_norm" and run.grad_clip is not None:
            ax.axhline(run.grad_clip, color=colour, linestyle=":", linewidth=1)

    def finish(self, ax, runs: list[_Run]) -> None:
        if self.log:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log", nonpositive="mask")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # not 10^0
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: _minor_label(ax, v)))
        if self.bits:
            _bits_axis(ax)
        if self.key == "clip_fraction":
            ax.set_ylim(-0.03, 1.03)
        if self.key == "sigma_max_hh":
            ax.axhline(1.0, color="grey", linewidth=0.8)
        if self.layers:
            L = max(len(_per_layer(self.rows(run), self.key)) for run in runs)
            handles = [ax.plot([], [], color="black", linestyle=LAYER_STYLES[k % 4])[0]
                       for k in range(L)]
            ax.legend(handles, [f"layer {k}" for k in range(L)], fontsize=8)


_PANELS = (
    _Panel("training loss", "nats/char", "train_loss", bits=True),
    _Panel("validation loss", "nats/char", "val_loss", evals=True, bits=True),
    _Panel("learning rate", "lr", "lr"),
    _Panel("gradient norm before clipping (dotted: train.grad_clip)", "global L2 norm",
           "grad_norm", log=True),
    _Panel("training speed", "chars/s", "chars_per_sec"),
    _Panel("updates clipped since the previous evaluation", "fraction", "clip_fraction",
           evals=True),
    _Panel("σmax(W_hh) per layer", "largest singular value", "sigma_max_hh", evals=True,
           layers=True),
    _Panel("validation gate saturation per layer", "mean left+right fraction",
           "val_gate_saturation", evals=True, layers=True),
)


def _outside_legend_ok() -> bool:
    """`loc="outside ..."` for figure legends came with matplotlib 3.7."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return (major, minor) >= (3, 7)


def plot_runs(run_dirs: Sequence[str | Path], path: str | Path,
              labels: Sequence[str] | None = None) -> None:
    """Training curves of one or more runs, overlaid (a colour per run), as one PNG.

    From each run's metrics.jsonl, against the step: training and validation loss (nats/char,
    bits/char on the right), learning rate, gradient norm before clipping (the clip threshold
    dotted), chars/s; and, where the rows carry them, the fraction of clipped updates,
    sigma_max(W_hh) per layer and the validation gate saturation per layer (a line style
    per layer). `labels` name the runs in the legend; by default their folder names."""
    require_matplotlib()
    check_writable(Path(path))
    if not run_dirs:
        raise DataError("no run directory to plot")
    if labels is not None and len(labels) != len(run_dirs):
        raise DataError(f"{len(labels)} label(s) for {len(run_dirs)} run(s): give one per run")
    runs = [_Run(r, lab) for r, lab in
            zip(run_dirs, list(labels) if labels is not None else _unique_labels(run_dirs))]

    panels = [p for p in _PANELS if any(p.has_data(run) for run in runs)]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(13, 3.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    last_step = max(r["step"] for run in runs for r in run.train + run.eval)
    for ax, panel in zip(axes, panels):
        ax.set_xlim(0, last_step * 1.02 or 1)  # every panel on the same steps
        for n, run in enumerate(runs):
            # learning-rate schedules often coincide: the later runs' lines are thinner,
            # so the ones drawn first still show around them
            width = 1.2 + 1.0 * (len(runs) - 1 - n) if panel.key == "lr" else 1.2
            panel.draw(ax, run, f"C{n % 10}", width)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        panel.finish(ax, runs)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], color=f"C{n % 10}")[0] for n in range(len(runs))]
    fig.legend(handles, [run.label for run in runs], loc="outside upper center"
               if _outside_legend_ok() else "upper center", ncol=min(len(runs), 5))
    _save(fig, path)
