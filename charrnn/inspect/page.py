"""The page of `charrnn inspect cells`: one self-contained HTML file.

Inline CSS and JS, no network, no CDN: it opens straight from disk. It holds

- the top units per detector, with their correlation, each a link that selects the unit;
- a picker (view, layer, state kind, unit) and a legend;
- the text, one <span> per character (each HTML-escaped), coloured by the chosen unit's
  activation (blue -1 .. white 0 .. red +1), or in the surprisal view by -log p(char)
  (white 0 .. dark orange at log V nats, the uniform guess, and above); hovering a
  character shows its value, its surprisal and the model's top 5 predictions for it.

The data travel as JSON in a <script type="application/json"> element (with <, > and &
escaped, so no text can close it). The activations, (blocks, H, T) unit-major, are
quantized to int8 (value * 127, a step of 0.008) and base64-encoded: 1 byte per unit and
character: 6.8 MB of the 7.2 MB page for 5,000 characters of a 2x256 lstm (h and
tanh(c) of 1,024 units). gzip would save only ~15%: saturated or not, the values vary.

The selected unit lives in the URL hash, `#view=unit&layer=1&kind=cell&unit=37`: the
picker and the links only set the hash, and one handler of `hashchange` (also run at load)
applies it, so a link to a unit and a test of the page take the same path as a click.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from ..errors import CharRNNError
from ..fileio import atomic_write_bytes, check_writable
from .cells import DETECTORS, CellsReport

KIND_LABEL = {"h": "h", "cell": "tanh(c)"}
VISIBLE = {"\n": "\u21b5", "\t": "\u21e5", " ": "\u2423"}  # how the tooltip shows them


def check_output_path(path: Path, checkpoint: Path) -> None:
    """Refuse, before any work, an output that cannot be written or that would change the
    checkpoint or its run directory (inspection never writes there)."""
    check_writable(path)
    parent = path.parent if str(path.parent) else Path(".")
    run_dir = checkpoint.resolve().parent
    if path.resolve() == checkpoint.resolve() or (
        parent.resolve() == run_dir
        and any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl"))
    ):
        raise CharRNNError(f"{path}: inspection does not write into the run directory "
                           f"{run_dir}; choose another output path")


def _json_for_script(obj: object) -> str:
    """JSON that is safe inside <script>: no <, > or & (so no "</script>"), ASCII only."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _round(values: np.ndarray, digits: int) -> list:
    """A list of rounded floats, None where not finite (JSON has no NaN)."""
    r = np.round(np.asarray(values, np.float64), digits)
    return [None if not math.isfinite(v) else (int(v) if v == int(v) else v)
            for v in r.ravel().tolist()]


def quantize(acts: np.ndarray, blocks: int) -> str:
    """acts (T, U) in [-1, 1] -> base64 of int8 round(127 v), laid out (blocks, H, T)."""
    T, U = acts.shape
    q = np.clip(np.rint(acts * 127.0), -127, 127).astype(np.int8)  # (T, U)
    q = np.ascontiguousarray(q.T.reshape(blocks, U // blocks, T))  # (blocks, H, T)
    return base64.b64encode(q.tobytes()).decode("ascii")


def page_data(r: CellsReport) -> dict:
    """The JSON the page's script reads."""
    default = next((r.units[ranked[0][0]] for ranked in r.ranked.values() if ranked),
                   r.units[0])
    return {
        "T": len(r.ids),
        "vocab": r.vocab_chars,
        "ids": r.ids.tolist(),
        "blocks": [{"layer": b.layer, "kind": b.kind, "H": b.size} for b in r.blocks],
        "acts": quantize(r.acts, len(r.blocks)),
        "scale": 127,
        "surprisal": _round(r.surprisal, 3),
        "max_surprisal": math.log(max(len(r.vocab_chars), 2)),
        "top_ids": r.top_ids.ravel().tolist(),
        "top_p": _round(r.top_p, 3),
        "k": r.top_ids.shape[1],
        "detectors": [{"name": name, "corr": _round(r.corr[d], 3)}
                      for d, name in enumerate(r.detector_values)],
        "default": {"layer": default.layer, "kind": default.kind, "unit": default.unit},
    }


def _text_spans(text: str) -> str:
    """One <span> per character, each escaped; a newline shows as a glyph, then breaks."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append('<span class="nl">\u21b5</span>\n')
        else:
            out.append(f"<span>{html.escape(ch, quote=True)}</span>")
    return "".join(out)


def _top_table(r: CellsReport) -> str:
    rows, absent = [], []
    support = r.support
    for name, ranked in r.ranked.items():
        desc = html.escape(DETECTORS.get(name, ""))
        if not ranked:
            absent.append(f'<span title="{desc}">{html.escape(name)}</span>')
            continue
        links = " ".join(
            f'<a class="unit" href="#view=unit&amp;layer={r.units[u].layer}&amp;'
            f'kind={r.units[u].kind}&amp;unit={r.units[u].unit}">'
            f"L{r.units[u].layer} {KIND_LABEL[r.units[u].kind]} {r.units[u].unit} "
            f"<b>{rv:+.2f}</b></a>"
            for u, rv in ranked)
        rows.append(f'<tr><th title="{desc}">{html.escape(name)}</th>'
                    f'<td class="support" title="the share of characters where the detector '
                    f'is nonzero">{support[name]:.1%}</td><td>{links}</td></tr>')
    if absent:
        rows.append('<tr><th></th><td></td><td class="absent">constant in this text, so '
                    f"nothing to track: {', '.join(absent)}</td></tr>")
    return "\n".join(rows)


def _detector_list() -> str:
    return "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(desc)}</li>"
                   for name, desc in DETECTORS.items())


def render_page(r: CellsReport) -> str:
    """The whole page, a str."""
    layers = sorted({b.layer for b in r.blocks})
    kinds = sorted({b.kind for b in r.blocks}, key=["h", "cell"].index)
    esc = html.escape
    title = f"charrnn inspect cells: {Path(r.source).name or 'model'}"
    header = (f"{esc(r.cell)} &times;{r.num_layers}, hidden {r.hidden_size} &middot; "
              f"checkpoint <code>{esc(r.source)}</code> &middot; text <code>{esc(r.text_path)}"
              f"</code>, {len(r.ids):,} characters shown ({r.unknown} outside the vocabulary "
              f"skipped) &middot; mean surprisal {r.mean_surprisal:.3f} nats/char "
              f"({r.mean_surprisal / math.log(2):.3f} bits/char)")
    layer_opts = "".join(f'<option value="{k}">{k}</option>' for k in layers)
    kind_opts = "".join(f'<option value="{k}">{KIND_LABEL[k]}</option>' for k in kinds)
    return _TEMPLATE.format(
        title=esc(title), header=header, top_rows=_top_table(r), detectors=_detector_list(),
        layer_opts=layer_opts,
        kind_opts=kind_opts, hidden_max=r.hidden_size - 1, spans=_text_spans(r.text),
        data=_json_for_script(page_data(r)), css=_CSS, js=_JS,
    )


def write_page(path: Path, data: bytes) -> None:
    """Write the page atomically (a temporary file renamed into place)."""
    atomic_write_bytes(path, data)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.3em; margin: 0.2em 0; } h2 { font-size: 1.1em; margin: 0.8em 0 0.3em; }
code { font-size: 0.95em; }
table.top { border-collapse: collapse; }
table.top th { text-align: left; padding: 2px 10px 2px 0; font-weight: 600; }
table.top td { padding: 2px 6px; }
table.top td.support, td.absent { color: #777; font-size: 0.9em; text-align: right; }
table.top td.absent { text-align: left; }
details { color: #555; font-size: 0.9em; margin: 4px 0; }
a.unit { display: inline-block; margin: 1px 2px; padding: 0 5px; border: 1px solid #ccc;
  border-radius: 3px; text-decoration: none; color: #124; background: #f6f8fa; }
a.unit:hover, a.unit.current { background: #dde8ff; border-color: #88a; }
#controls { position: sticky; top: 0; background: #fff; padding: 6px 0;
  border-bottom: 1px solid #ddd; z-index: 1; }
#controls label { margin-right: 1em; }
#controls input { width: 5em; }
#status { margin-left: 1em; font-weight: 600; }
#unitcorr { color: #555; font-size: 0.9em; margin-top: 3px; }
#legend { display: inline-block; vertical-align: middle; margin-left: 1em; font-size: 0.85em; }
#legend .bar { display: inline-block; width: 160px; height: 12px; vertical-align: middle;
  border: 1px solid #aaa; margin: 0 4px; }
#legend .bar.unit { background: linear-gradient(to right, rgb(77,77,255), #fff, rgb(255,77,77)); }
#legend .bar.surprisal { background: linear-gradient(to right, #fff, rgb(255,120,20)); }
#text { font: 13px/1.5 ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap;
  word-wrap: break-word; border: 1px solid #ddd; padding: 8px; margin-top: 8px; }
#text span.nl { color: #aaa; }
#tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888;
  padding: 4px 8px; font: 12px/1.4 ui-monospace, monospace; box-shadow: 2px 2px 6px #0003;
  white-space: pre; z-index: 2; }
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var text = document.getElementById("text");
  var spans = text.children;
  var T = D.T;
  var acts = decode(D.acts);
  var ctl = {
    view: document.getElementById("view"), layer: document.getElementById("layer"),
    kind: document.getElementById("kind"), unit: document.getElementById("unit")
  };
  var state = null;

  function decode(b64) {
    var s = atob(b64), a = new Int8Array(s.length);
    for (var i = 0; i < s.length; i++) a[i] = (s.charCodeAt(i) << 24) >> 24;
    return a;
  }
  function blockOf(layer, kind) {
    for (var b = 0; b < D.blocks.length; b++) {
      if (D.blocks[b].layer === layer && D.blocks[b].kind === kind) return b;
    }
    return -1;
  }
  function flatUnit(s) {
    var b = blockOf(s.layer, s.kind), u = 0;
    for (var j = 0; j < b; j++) u += D.blocks[j].H;
    return u + s.unit;
  }
  function value(s, t) {
    var b = blockOf(s.layer, s.kind), H = D.blocks[b].H;
    return acts[(b * H + s.unit) * T + t] / D.scale;
  }
  function unitColor(v) {  // blue -1 .. white 0 .. red +1
    var a = Math.min(1, Math.abs(v)) * 0.7, c = Math.round(255 * (1 - a));
    return v >= 0 ? "rgb(255," + c + "," + c + ")" : "rgb(" + c + "," + c + ",255)";
  }
  function surprisalColor(x) {  // white 0 .. dark orange at log V nats
    if (x === null) return "rgb(225,225,225)";
    var a = Math.min(1, x / D.max_surprisal);
    return "rgb(255," + Math.round(255 - 135 * a) + "," + Math.round(255 - 235 * a) + ")";
  }
  function show(ch) {
    return ch === "\n" ? "\u21b5" : ch === "\t" ? "\u21e5" : ch === " " ? "\u2423" : ch;
  }

  // the one place a selection takes effect: the hash, from the URL, a link or the picker
  function select(q) {
    var view = q.view === "surprisal" ? "surprisal" : "unit";
    var layer = parseInt(q.layer, 10), kind = q.kind, unit = parseInt(q.unit, 10);
    if (blockOf(layer, kind) < 0) {
      layer = isNaN(layer) ? D["default"].layer : layer;
      kind = kind || D["default"].kind;
      if (blockOf(layer, kind) < 0) { layer = D["default"].layer; kind = D["default"].kind; }
      if (isNaN(unit)) unit = D["default"].unit;
    }
    var H = D.blocks[blockOf(layer, kind)].H;
    if (isNaN(unit)) unit = 0;
    unit = Math.max(0, Math.min(H - 1, unit));
    state = {view: view, layer: layer, kind: kind, unit: unit};
    ctl.view.value = view; ctl.layer.value = String(layer); ctl.kind.value = kind;
    ctl.unit.value = String(unit); ctl.unit.max = String(H - 1);
    paint();
  }
  function paint() {
    var s = state, t;
    if (s.view === "surprisal") {
      for (t = 0; t < T; t++) spans[t].style.backgroundColor = surprisalColor(D.surprisal[t]);
    } else {
      for (t = 0; t < T; t++) spans[t].style.backgroundColor = unitColor(value(s, t));
    }
    text.setAttribute("data-view", s.view);
    text.setAttribute("data-unit", s.layer + "/" + s.kind + "/" + s.unit);
    var label = s.view === "surprisal" ? "surprisal -log p(char | prefix)" :
      "layer " + s.layer + ", " + (s.kind === "cell" ? "tanh(c)" : "h") + ", unit " + s.unit;
    document.getElementById("status").textContent = label;
    var u = flatUnit(s), parts = [];
    for (var d = 0; d < D.detectors.length; d++) {
      var r = D.detectors[d].corr[u];
      parts.push(D.detectors[d].name + " " + (r >= 0 ? "+" : "") + r.toFixed(2));
    }
    document.getElementById("unitcorr").textContent =
      "this unit's r with: " + parts.join(" \u00b7 ");
    document.getElementById("legend").innerHTML = s.view === "surprisal" ?
      '0<span class="bar surprisal"></span>' + D.max_surprisal.toFixed(2) +
        "+ nats (log V, a uniform guess)" :
      '-1<span class="bar unit"></span>+1';
    var links = document.querySelectorAll("a.unit");
    var here = "layer=" + s.layer + "&kind=" + s.kind + "&unit=" + s.unit;
    for (var i = 0; i < links.length; i++) {
      links[i].classList.toggle("current", links[i].getAttribute("href").indexOf(here) >= 0);
    }
  }
  function parseHash() {
    var q = {}, parts = location.hash.replace(/^#/, "").split("&");
    for (var i = 0; i < parts.length; i++) {
      var kv = parts[i].split("=");
      if (kv[0]) q[decodeURIComponent(kv[0])] = decodeURIComponent(kv[1] || "");
    }
    return q;
  }
  function applyHash() { select(parseHash()); }
  function go(change) {  // the picker: set the hash; `hashchange` applies it
    var s = {}, k;
    for (k in state) s[k] = state[k];
    for (k in change) s[k] = change[k];
    var h = "#view=" + s.view + "&layer=" + s.layer + "&kind=" + s.kind + "&unit=" + s.unit;
    if (location.hash === h) applyHash(); else location.hash = h;
  }

  ctl.view.addEventListener("change", function () { go({view: ctl.view.value}); });
  ctl.layer.addEventListener("change", function () { go({view: "unit", layer: ctl.layer.value}); });
  ctl.kind.addEventListener("change", function () { go({view: "unit", kind: ctl.kind.value}); });
  ctl.unit.addEventListener("change", function () { go({view: "unit", unit: ctl.unit.value}); });
  document.getElementById("prev").addEventListener("click", function () {
    go({view: "unit", unit: Math.max(0, state.unit - 1)});
  });
  document.getElementById("next").addEventListener("click", function () {
    go({view: "unit", unit: state.unit + 1});
  });
  window.addEventListener("hashchange", applyHash);

  var tip = document.getElementById("tip");
  text.addEventListener("mouseover", function (e) {
    var t = Array.prototype.indexOf.call(spans, e.target);
    if (t < 0) return;
    var lines = ["char " + JSON.stringify(D.vocab[D.ids[t]]) + "  (#" + t + ")"];
    if (state.view === "unit") lines.push("unit value " + value(state, t).toFixed(3));
    var x = D.surprisal[t];
    if (x === null) {
      lines.push("surprisal: none (the first character has no prediction)");
    } else {
      lines.push("surprisal " + x.toFixed(3) + " nats (p = " + Math.exp(-x).toFixed(3) + ")");
      lines.push("top " + D.k + " predictions:");
      for (var j = 0; j < D.k; j++) {
        var id = D.top_ids[t * D.k + j];
        lines.push("  " + show(D.vocab[id]) + "  " + D.top_p[t * D.k + j].toFixed(3) +
                   (id === D.ids[t] ? "  <- actual" : ""));
      }
    }
    tip.textContent = lines.join("\n");
    tip.hidden = false;
  });
  text.addEventListener("mousemove", function (e) {
    tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px";
  });
  text.addEventListener("mouseleave", function () { tip.hidden = true; });

  applyHash();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1>Inside the model: units and surprisal</h1>
<p>{header}</p>
<h2>Units that track the text</h2>
<p>Every unit ranked by |Pearson r| between its activation after a character and a detector
computed from the text (the first line, the model's warm-up from the zero state, left out).
Click a unit to colour the text by it; hover a character for its value, its surprisal and
the model's top predictions.</p>
<table class="top">
{top_rows}
</table>
<details><summary>What the detectors measure (the % column: the share of characters where
the detector is nonzero)</summary><ul>{detectors}</ul></details>
<div id="controls">
<label>View <select id="view"><option value="unit">unit activation</option>
<option value="surprisal">surprisal</option></select></label>
<label>Layer <select id="layer">{layer_opts}</select></label>
<label>State <select id="kind">{kind_opts}</select></label>
<label>Unit <input id="unit" type="number" min="0" max="{hidden_max}" value="0"></label>
<button id="prev" type="button" title="previous unit">&#9664;</button>
<button id="next" type="button" title="next unit">&#9654;</button>
<span id="status"></span><span id="legend"></span>
<div id="unitcorr"></div>
</div>
<pre id="text">{spans}</pre>
<div id="tip" hidden></div>
<script type="application/json" id="data">{data}</script>
<script>{js}</script>
</body>
</html>
"""
