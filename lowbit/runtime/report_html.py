"""``report.html``: the report of a compiled model as one self-contained page (inline CSS, SVG and script; no
network). Written into every saved artifact beside ``report.json``; like ``timings.json`` it shows the build's
timings, so the manifest does not hash it (no loader reads it).

The page: the target and engine, lowbit's version, the integer share; the per-layer plan table (sortable: click a
header); the per-layer weight SQNR chart (layer index vs dB) and, where measured, the sensitivity chart; the
passes with their node counts, time and statistics, each linked to its dump directory when there is one.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowbit.runtime.report import COLUMNS, fmt

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232b;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.meta{color:#555}table{border-collapse:collapse;font-size:12.5px}
th,td{border-bottom:1px solid #e3e6ea;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f3f5f7;cursor:pointer;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.float td{color:#777}.chart{border:1px solid #e3e6ea;margin:6px 0}.tag{padding:0 6px;border-radius:3px}
.int8{background:#d9f2e3}.nope{background:#f6e3e3}
"""

_JS = """
(function(){
  var errors=[];window.addEventListener('error',function(e){errors.push(String(e.message));});
  document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',function(){
    var body=th.closest('table').tBodies[0],rows=Array.prototype.slice.call(body.rows),asc=th.dataset.asc!=='1';
    rows.sort(function(a,b){var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent;
      var nx=parseFloat(x),ny=parseFloat(y);var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});th.dataset.asc=asc?'1':'0';});});
  var sizes=[];document.querySelectorAll('svg.chart').forEach(function(s){var r=s.getBoundingClientRect();
    sizes.push(Math.round(r.width)+'x'+Math.round(r.height));});
  document.body.dataset.charts=sizes.join(' ');document.body.dataset.errors=errors.join(' | ');
  document.body.dataset.ready='1';
})();
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if v in ("inf", "-inf", "nan"):
        return float(v)
    return None


def _cell(v: Any) -> str:
    n = _num(v)
    if n is not None:
        text = "inf" if math.isinf(n) else f"{n:.4g}"
        return f'<td class="num" data-v="{n if math.isfinite(n) else 1e9}">{text}</td>'
    if isinstance(v, bool):
        return f'<td><span class="tag {"int8" if v else "nope"}">{"yes" if v else "no"}</span></td>'
    return f"<td>{_e('-' if v is None else v)}</td>"


def _awq_cell(entry: Mapping[str, Any] | None) -> str | None:
    """AWQ's scale source of a layer: the exponent it searched (s = mean|x|^ratio) and what the scale folded into."""
    if not entry:
        return None
    ratio, into = entry.get("ratio"), str(entry.get("folded_into") or "")
    if ratio is None:
        return "no scale (" + ("not foldable" if into.startswith("not") else "none was better") + ")"
    return f"ratio {ratio:g} -> {into.split()[0] if into else '?'}"


def _mb(n: Any) -> str:
    return f"{float(n) / 1e6:.3g} MB"


def fidelity_text(sections: Mapping[str, Any]) -> str:
    """The fidelity figures the compile measured: on the engine (the compile example), and the plan's search."""
    parts = []
    f = sections.get("fidelity") or {}
    if f.get("metric") == "perplexity" and "quantized" in f:
        parts.append(f"perplexity <b>{f['quantized']:.4g}</b> vs float {f['float']:.4g} "
                     f"({f['quantized'] / f['float'] - 1:+.2%}) on {_e(f.get('on'))} ({f.get('tokens')} tokens)")
    elif "sqnr_db" in f:
        db = _num(f["sqnr_db"])
        parts.append(f"output SQNR <b>{'inf' if db is not None and math.isinf(db) else f'{db:.1f}'} dB</b>, "
                     f"cosine <b>{float(f['cosine']):.5f}</b> against the float model on {_e(f.get('on'))}")
    elif f.get("note"):
        parts.append(_e(f["note"]))
    plan = sections.get("plan")
    if plan:
        if "float_ppl" in plan:
            parts.append(f"plan: perplexity {plan['ppl']:.4g} vs float {plan['float_ppl']:.4g} on the fidelity batches")
        else:
            parts.append(_e(f"plan: {plan.get('metric')} {fmt(plan.get('fidelity'))} (target {fmt(plan.get('target'))}) "
                            "on the reference"))
            engine = _num(plan.get("engine_fidelity"))
            if engine is not None:
                met = "met" if plan.get("engine_target_met") else "NOT met"
                replans = len(plan.get("engine_replans") or [])
                parts.append(f"<b>{_e(fmt(engine))}</b> on the engine (target {met}"
                             + (f", after {replans} re-plan{'s' if replans > 1 else ''}" if replans else "") + ")")
    return "; ".join(parts) or "not measured"


def bar_chart(values: Sequence[tuple[str, float]], title: str, unit: str, width: int = 900,
              height: int = 220) -> str:
    """An inline SVG bar chart, one bar per (label, value) in order: the x axis is the layer index."""
    finite = [v for _, v in values if math.isfinite(v)]
    if not values or not finite:
        return f"<p>{_e(title)}: no finite values.</p>"
    top = max(finite) or 1.0
    pad, n = 36, len(values)
    step = (width - 2 * pad) / n
    bars = []
    for i, (label, v) in enumerate(values):
        shown = top if not math.isfinite(v) else max(v, 0.0)
        h = (height - 2 * pad) * shown / top
        x, y = pad + i * step, height - pad - h
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(step - 1, 1):.1f}" height="{h:.1f}" '
                    f'fill="#4b7bb5"><title>{_e(label)}: {v:.4g} {_e(unit)}</title></rect>')
    axis = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
            f'<text x="{pad}" y="{pad - 10}" font-size="12">{_e(title)} (max {top:.4g} {_e(unit)})</text>'
            f'<text x="{pad}" y="{height - 10}" font-size="11">layer 0</text>'
            f'<text x="{width - pad}" y="{height - 10}" font-size="11" text-anchor="end">layer {n - 1}</text>')
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{axis}{"".join(bars)}</svg>')


def render(report: Mapping[str, Any], *, timings: Mapping[str, Any] | None = None, title: str = "lowbit report",
           meta: Mapping[str, Any] | None = None, dump_dir: str | None = None) -> str:
    layers: list[dict[str, Any]] = list(report.get("layers", []))
    sections: dict[str, Any] = dict(report.get("sections", {}))
    engine = sections.get("engine") or {}
    seconds = {p.get("pass"): p.get("seconds") for p in (timings or {}).get("passes", [])}
    head = [f"<h1>{_e(title)}</h1>", '<p class="meta">']
    facts: dict[str, Any] = {"target": report.get("target")}
    model = sections.get("model") or {}
    if model:
        facts["model"] = f"{model.get('class')} ({int(model.get('parameters', 0)) / 1e6:.3g} M parameters)"
    facts.update(dict(meta or {}))
    size_after = facts.pop("artifact_bytes", None)
    if model.get("float_bytes"):
        size = f"{_mb(model['float_bytes'])} float"
        if size_after:
            size += f" &rarr; {_mb(size_after)} artifact ({float(size_after) / float(model['float_bytes']):.0%})"
        facts["size"] = size
    if engine:
        facts["engine"] = engine.get("engine")
        facts["integer share of quantized MACs"] = f"{float(engine.get('int8_share', 0.0)):.1%}"
    counts: dict[str, int] = {}
    for r in layers:
        counts[str(r.get("scheme"))] = counts.get(str(r.get("scheme")), 0) + 1
    facts["layers"] = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "0"
    total = sum(float(v or 0.0) for v in seconds.values()) or sum(float(p.get("seconds") or 0.0)
                                                                  for p in report.get("passes", []))
    if total:
        facts["compile (passes)"] = f"{total:.2f} s"
    head.append(" &middot; ".join(f"{_e(k)}: <b>{v if k == 'size' else _e(v)}</b>" for k, v in facts.items()
                                  if v is not None))
    head.append("</p>")
    head.append(f'<p id="fidelity">fidelity: {fidelity_text(sections)}</p>')

    cols = [c for c in COLUMNS if any(c[0] in r for r in layers)]
    if any("checkpoint" in r for r in layers):
        cols.append(("checkpoint", "checkpoint"))
    awq = sections.get("awq") or {}
    if awq:  # AWQ's scale source beside SmoothQuant's: the ratio searched and where the scale folded
        layers = [{**r, "awq": _awq_cell(awq.get(r.get("layer")))} for r in layers]
        cols.insert(next((i + 1 for i, c in enumerate(cols) if c[0] == "smoothquant"), len(cols)), ("awq", "AWQ"))
    rows = []
    for i, r in enumerate(layers):
        cls = "layer float" if r.get("scheme") == "float" else "layer"
        rows.append(f'<tr class="{cls}"><td class="num" data-v="{i}">{i}</td>' +
                    "".join(_cell(r.get(k)) for k, _ in cols) + "</tr>")
    table = ('<table class="sortable" id="plan"><thead><tr><th>#</th>' +
             "".join(f"<th>{_e(h)}</th>" for _, h in cols) + "</tr></thead><tbody>" + "".join(rows) +
             "</tbody></table>")

    charts = [bar_chart([(r["layer"], _num(r.get("weight_sqnr_db")) or 0.0) for r in layers
                         if _num(r.get("weight_sqnr_db")) is not None],
                        "per-layer error: weight SQNR (higher is better)", "dB")]
    sens = sections.get("sensitivity") or {}
    if isinstance(sens, Mapping) and isinstance(sens.get("layers"), list) and sens["layers"]:
        gain = {str(r.get("layer")): _num(r.get("float_gain")) for r in sens["layers"] if isinstance(r, Mapping)}
        order = [r["layer"] for r in layers if r.get("layer") in gain] or list(gain)
        charts.append(bar_chart([(k, gain[k] or 0.0) for k in order],
                                f"sensitivity: {sens.get('metric')} gained by keeping only this layer float",
                                str(sens.get("unit", ""))))

    dump = sections.get("dump") or {}
    stems = dict(dump.get("passes") or {})
    base = dump_dir or (Path(dump["dir"]).as_uri() if dump.get("dir") else None)
    passes = []
    for p in report.get("passes", []):
        name = str(p.get("pass"))
        stem = stems.get(name)
        link = ""
        if stem and base:
            link = " (" + ", ".join(f'<a href="{_e(base)}/{_e(stem)}{ext}">{label}</a>' for ext, label in
                                    ((".svg", "graph"), (".txt", "text"), (".diff.html", "diff"))) + ")"
        sec = seconds.get(name, p.get("seconds"))
        stats = ", ".join(f"{k} {v}" for k, v in (p.get("stats") or {}).items())
        passes.append(f"<tr><td>{_e(name)}{link}</td>{_cell(sec)}<td class='num'>{_e(p.get('nodes_before'))} &rarr; "
                      f"{_e(p.get('nodes_after'))}</td><td>{_e(stats)}</td></tr>")
    pass_table = ('<table class="sortable" id="passes"><thead><tr><th>pass</th><th>seconds</th><th>nodes</th>'
                  "<th>statistics</th></tr></thead><tbody>" + "".join(passes) + "</tbody></table>")
    body = ("\n".join(head) + "<h2>Charts</h2>" + "".join(charts) + "<h2>Plan, per layer</h2>" + table +
            "<h2>Passes</h2>" + pass_table)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}<script>{_JS}</script></body></html>\n")
