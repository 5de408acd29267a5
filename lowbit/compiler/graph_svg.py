"""A graph drawn as SVG in pure Python: the per-pass dumps show pictures on any machine, Graphviz or not.

A layered (Sugiyama-style) layout, kept simple and linear-time enough for LLM graphs of thousands of nodes:

1. rank = the longest path from an input (FX order is topological); a constant (``get_attr``) sits one rank
   above its first consumer, so weights do not all pile up in the top row;
2. order within a rank by the barycenter of the predecessors' positions (two downward sweeps, one upward),
   which untangles the chains a compiler graph is made of;
3. boxes sized by their label (monospace), ranks stacked top to bottom, edges as cubic curves from the bottom
   of the producer to the top of the consumer.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

CHAR_W = 6.6  # px per character of the 11px monospace label
LINE_H = 13
PAD_X, PAD_Y = 6, 4
GAP_X, GAP_Y = 14, 34


@dataclass
class Box:
    name: str
    lines: list[str]
    fill: str = "white"
    inputs: list[str] = field(default_factory=list)
    rank: int = 0
    order: float = 0.0
    x: float = 0.0
    y: float = 0.0

    @property
    def w(self) -> float:
        return max(len(s) for s in self.lines) * CHAR_W + 2 * PAD_X

    @property
    def h(self) -> float:
        return len(self.lines) * LINE_H + 2 * PAD_Y


def layout(boxes: Sequence[Box]) -> tuple[float, float]:
    """Place ``boxes`` (in topological order; ``inputs`` name earlier boxes) in place; returns (width, height)."""
    by_name = {b.name: b for b in boxes}
    consumers: dict[str, list[Box]] = {b.name: [] for b in boxes}
    for b in boxes:
        b.inputs = [i for i in b.inputs if i in by_name]
        for i in b.inputs:
            consumers[i].append(b)
    for b in boxes:
        b.rank = 1 + max((by_name[i].rank for i in b.inputs), default=-1)
    for b in boxes:  # sources feeding a later node (constants): just above their first consumer
        if not b.inputs and consumers[b.name]:
            b.rank = max(0, min(c.rank for c in consumers[b.name]) - 1)
    ranks: dict[int, list[Box]] = {}
    for b in boxes:
        ranks.setdefault(b.rank, []).append(b)
    for row in ranks.values():
        for i, b in enumerate(row):
            b.order = float(i)

    def sweep(keys: Sequence[int], neighbours) -> None:
        for r in keys:
            row = ranks[r]
            for b in row:
                near = neighbours(b)
                if near:
                    b.order = sum(n.order for n in near) / len(near)
            row.sort(key=lambda b: b.order)
            for i, b in enumerate(row):
                b.order = float(i)

    order = sorted(ranks)
    sweep(order, lambda b: [by_name[i] for i in b.inputs])
    sweep(order[::-1], lambda b: consumers[b.name])
    sweep(order, lambda b: [by_name[i] for i in b.inputs])

    width, y = 0.0, 10.0
    for r in order:
        row = ranks[r]
        x = 10.0
        for b in row:
            b.x, b.y = x, y
            x += b.w + GAP_X
        width = max(width, x)
        y += max(b.h for b in row) + GAP_Y
    # centre each row under the widest one: chains stay roughly vertical
    for r in order:
        row = ranks[r]
        used = row[-1].x + row[-1].w - row[0].x
        shift = (width - 10.0 - used) / 2 - row[0].x + 10.0
        for b in row:
            b.x += max(shift, 0.0)
    return width + 10.0, y


def render(boxes: Sequence[Box], title: str = "") -> str:
    """The SVG document of ``boxes`` (laid out here)."""
    w, h = layout(boxes)
    top = 24.0 if title else 0.0
    by_name = {b.name: b for b in boxes}
    edges = []
    for b in boxes:
        for i in b.inputs:
            a = by_name[i]
            x1, y1 = a.x + a.w / 2, a.y + a.h + top
            x2, y2 = b.x + b.w / 2, b.y + top
            mid = (y1 + y2) / 2
            edges.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}"/>')
    nodes = []
    for b in boxes:
        text = "".join(f'<tspan x="{b.x + PAD_X:.1f}" dy="{LINE_H if k else 0}">{html.escape(s)}</tspan>'
                       for k, s in enumerate(b.lines))
        nodes.append(f'<g><title>{html.escape(b.name)}</title><rect x="{b.x:.1f}" y="{b.y + top:.1f}" '
                     f'width="{b.w:.1f}" height="{b.h:.1f}" rx="3" fill="{b.fill}" stroke="#555"/>'
                     f'<text y="{b.y + top + PAD_Y + LINE_H - 3:.1f}">{text}</text></g>')
    head = (f'<text x="10" y="16" font-size="13" font-family="sans-serif">{html.escape(title)}</text>'
            if title else "")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h + top:.0f}" '
            f'viewBox="0 0 {w:.0f} {h + top:.0f}" font-family="monospace" font-size="11">{head}'
            f'<g fill="none" stroke="#8a94a0" stroke-width="1">{"".join(edges)}</g>{"".join(nodes)}</svg>\n')
