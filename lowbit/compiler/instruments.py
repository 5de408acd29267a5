"""Instruments run around every pass: dump (text, .dot/.svg, stats, index.html), verify, timing."""

from __future__ import annotations

import difflib
import html
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx

from lowbit.compiler import graph_svg as graph_svg_mod
from lowbit.compiler import meta
from lowbit.compiler.pass_manager import Pass, PassContext, PassRecord, PassResult
from lowbit.errors import PassError

# --------------------------------------------------------------------------------------------------
# Readable graph text and Graphviz
# --------------------------------------------------------------------------------------------------


def _short_target(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        return str(getattr(t, "__name__", t)) if not hasattr(t, "_schema") else str(t).replace("aten.", "")
    return str(t)


def _fmt_arg(a: object) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a)


def _fmt_val(node: fx.Node) -> str:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        dims = ",".join(str(d) for d in v.shape)
        return f"{str(v.dtype).replace('torch.', '')}[{dims}]"
    return ""


def node_line(node: fx.Node) -> str:
    args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
    head = f"%{node.name} = {node.op}[{_short_target(node)}]({args})"
    extras = []
    if v := _fmt_val(node):
        extras.append(v)
    if layer := node.meta.get(meta.LAYER):
        extras.append(f"layer={layer}")
    if spec := node.meta.get(meta.SPEC):
        extras.append(f"scheme={spec.scheme}")
    if act := node.meta.get(meta.FUSED_ACT):
        extras.append(f"fused={act}")
    if role := node.meta.get(meta.QROLE):
        extras.append(f"role={role}")
    if (by := node.meta.get(meta.CREATED_BY)) and by != "capture":
        extras.append(f"by={by}")
    return head + ("  # " + " ".join(extras) if extras else "")


def graph_text(gm: fx.GraphModule) -> str:
    return "\n".join(node_line(n) for n in gm.graph.nodes) + "\n"


_OP_COLORS = {
    "placeholder": "lightblue",
    "output": "lightblue",
    "get_attr": "lightgrey",
    "call_module": "khaki",
}


def _node_look(n: fx.Node, created: set[str]) -> tuple[list[str], str]:
    """The label lines and fill colour of a node in the dumps' pictures (.dot and .svg)."""
    lines = [n.name, _short_target(n)]
    if v := _fmt_val(n):
        lines.append(v)
    if spec := n.meta.get(meta.SPEC):
        lines.append(f"[{spec.scheme}]")
    color = "palegreen" if n.name in created else _OP_COLORS.get(n.op, "white")
    if n.meta.get(meta.QROLE):
        color = "orange" if n.name not in created else "palegreen"
    return lines, color


def graph_dot(gm: fx.GraphModule, created: set[str] | None = None, title: str = "") -> str:
    created = created or set()
    lines = ["digraph G {", '  rankdir=TB; node [shape=box, style=filled, fontname="monospace", fontsize=10];']
    if title:
        lines.append(f'  label="{title}"; labelloc=t;')
    for n in gm.graph.nodes:
        label, color = _node_look(n, created)
        text = "\\n".join(s.replace('"', '\\"') for s in label)
        lines.append(f'  "{n.name}" [label="{text}", fillcolor="{color}"];')
        for inp in n.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph_svg(gm: fx.GraphModule, created: set[str] | None = None, title: str = "") -> str:
    """The graph as an SVG picture, laid out in pure Python (``lowbit.compiler.graph_svg``): no Graphviz needed."""
    created = created or set()
    boxes = []
    for n in gm.graph.nodes:
        label, color = _node_look(n, created)
        boxes.append(graph_svg_mod.Box(n.name, label, color, [i.name for i in n.all_input_nodes]))
    return graph_svg_mod.render(boxes, title)


# --------------------------------------------------------------------------------------------------
# Dump
# --------------------------------------------------------------------------------------------------


class DumpInstrument:
    """Writes, per pass: NNN_name.txt, .dot, .svg (drawn in pure Python), .stats.json and a before/after diff
    .html; at the end an index.html that lists the passes with node-count changes."""

    def __init__(self, directory: str | os.PathLike[str], render_svg: bool = True) -> None:
        self.dir = Path(directory)
        self.render = render_svg
        self.prev_text = ""
        self.prev_file = ""
        self.rows: list[dict[str, object]] = []

    def _write_graph(self, stem: str, gm: fx.GraphModule, created: set[str]) -> None:
        text = graph_text(gm)
        (self.dir / f"{stem}.txt").write_text(text)
        dot = graph_dot(gm, created, title=stem)
        (self.dir / f"{stem}.dot").write_text(dot)
        if self.render:
            (self.dir / f"{stem}.svg").write_text(graph_svg(gm, created, title=stem))
        self.prev_text, self.prev_file = text, f"{stem}.txt"

    def on_start(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_graph("000_captured", gm, set())

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        return None

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, record: PassRecord) -> None:
        stem = f"{record.index:03d}_{p.name}"
        before_text, before_file = self.prev_text, self.prev_file
        self._write_graph(stem, result.gm, set(record.created))
        stats = {
            "pass": p.name,
            "nodes_before": record.nodes_before,
            "nodes_after": record.nodes_after,
            "seconds": round(record.seconds, 6),
            "stats": dict(record.stats),
            "created": record.created,
            "erased": record.erased,
        }
        (self.dir / f"{stem}.stats.json").write_text(json.dumps(stats, indent=2))
        diff = difflib.HtmlDiff(wrapcolumn=120).make_file(
            before_text.splitlines(), self.prev_text.splitlines(), before_file, f"{stem}.txt", context=True
        )
        (self.dir / f"{stem}.diff.html").write_text(diff)
        self.rows.append({**stats, "stem": stem})

    def on_end(self, gm: fx.GraphModule, ctx: PassContext, records: list[PassRecord]) -> None:
        rows = []
        for r in self.rows:
            delta = int(r["nodes_after"]) - int(r["nodes_before"])  # type: ignore[call-overload]
            stem = html.escape(str(r["stem"]))
            links = [f'<a href="{stem}.txt">graph</a>', f'<a href="{stem}.diff.html">diff</a>',
                     f'<a href="{stem}.dot">dot</a>', f'<a href="{stem}.stats.json">stats</a>']
            if self.render:
                links.append(f'<a href="{stem}.svg">svg</a>')
            stats = ", ".join(f"{k}={v}" for k, v in r["stats"].items()) or "no change"  # type: ignore[union-attr]
            rows.append(
                f"<tr><td>{stem}</td><td>{r['nodes_before']}</td><td>{r['nodes_after']}</td>"
                f"<td>{delta:+d}</td><td>{float(r['seconds']) * 1000:.1f}</td>"  # type: ignore[arg-type]
                f"<td>{html.escape(stats)}</td><td>{' '.join(links)}</td></tr>"
            )
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>lowbit pass dumps</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
            "</style></head><body><h1>lowbit: per-pass dumps</h1>"
            "<p><a href='000_captured.txt'>captured graph</a></p>"
            "<table><tr><th>pass</th><th>nodes before</th><th>after</th><th>change</th><th>ms</th>"
            "<th>stats</th><th>files</th></tr>" + "".join(rows) + "</table></body></html>\n"
        )
        (self.dir / "index.html").write_text(page)


# --------------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------------


def check_lint(gm: fx.GraphModule) -> list[str]:
    try:
        gm.graph.lint()
    except Exception as e:  # lint raises RuntimeError/AssertionError with the offending node
        return [f"graph.lint failed: {e}"]
    return []


def check_targets_resolve(gm: fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        try:
            if n.op == "get_attr":
                obj: object = gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
            elif n.op == "call_module":
                gm.get_submodule(str(n.target))
        except AttributeError:
            out.append(f"node {n.name}: {n.op} target {n.target!r} does not exist on the module")
    return out


def check_created_by(gm: fx.GraphModule) -> list[str]:
    return [f"node {n.name} does not record the pass that created it" for n in gm.graph.nodes
            if meta.CREATED_BY not in n.meta]


def check_specs(gm: fx.GraphModule) -> list[str]:
    from lowbit.runtime.spec import LayerSpec

    return [f"node {n.name}: meta[{meta.SPEC!r}] is {type(n.meta[meta.SPEC]).__name__}, not LayerSpec"
            for n in gm.graph.nodes if meta.SPEC in n.meta and not isinstance(n.meta[meta.SPEC], LayerSpec)]


INVARIANTS: list[Callable[[fx.GraphModule], list[str]]] = [
    check_lint, check_targets_resolve, check_created_by, check_specs,
]


class VerifyInstrument:
    """Checks graph invariants (and the pass's own postconditions) after every pass."""

    def __init__(self) -> None:
        self.placeholders: list[str] = []
        self.outputs = 0

    def on_start(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.outputs = len(_output_args(gm))

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        return None

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, record: PassRecord) -> None:
        gm = result.gm
        problems = [msg for check in INVARIANTS for msg in check(gm)]
        if [n.name for n in gm.graph.nodes if n.op == "placeholder"] != self.placeholders:
            problems.append("the graph inputs changed")
        if len(_output_args(gm)) != self.outputs:
            problems.append("the number of graph outputs changed")
        problems += p.postconditions(gm, ctx)
        if problems:
            raise PassError(f"pass {p.name!r} broke the graph:\n  " + "\n  ".join(problems))

    def on_end(self, gm: fx.GraphModule, ctx: PassContext, records: list[PassRecord]) -> None:
        return None


def _output_args(gm: fx.GraphModule) -> list[object]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    res = out.args[0]
    return list(res) if isinstance(res, (list, tuple)) else [res]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class TimingInstrument:
    """Collects seconds per pass into ctx.notes['pass_seconds'] (the report prints them)."""

    def on_start(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        ctx.notes["pass_seconds"] = {}

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        return None

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, record: PassRecord) -> None:
        ctx.notes["pass_seconds"][p.name] = record.seconds

    def on_end(self, gm: fx.GraphModule, ctx: PassContext, records: list[PassRecord]) -> None:
        return None
