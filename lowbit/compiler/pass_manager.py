"""Pass, PassResult, PassContext and PassManager.

A pass is ``call(gm, ctx) -> PassResult``; it may rewrite the graph in place and reports what it did as
integer stats ({"conv_bn_folded": 3}; empty means nothing changed). The manager runs instruments around
every pass and records on every node a pass creates which pass made it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import fx

from lowbit.compiler import meta


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    stats: Mapping[str, int] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes read besides the graph: the config, the plan, calibration data, loaded qparams."""

    config: Any = None  # lowbit.config.QuantConfig
    plan: Any = None  # lowbit.runtime.spec.Plan | None
    calibration: Iterable[Any] | None = None
    input_names: Sequence[str] = ()
    example: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    qparams: Mapping[str, torch.Tensor] | None = None  # re-applying an artifact instead of calibrating
    progress: bool | str = True  # lowbit.runtime.progress: True (on a terminal), False, "always"
    notes: dict[str, Any] = field(default_factory=dict)  # what passes tell later stages and the report


class Pass:
    """Base class: subclasses set ``name`` and implement ``call``."""

    name: ClassVar[str] = "pass"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise TypeError(f"{type(self).__name__} does not override Pass.call()")

    def postconditions(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        """Invariants this pass guarantees, checked by the verify instrument; returns the violations."""
        return []

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.call(gm, ctx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Instrument(Protocol):
    def on_start(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...
    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None: ...
    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext, record: PassRecord) -> None: ...
    def on_end(self, gm: fx.GraphModule, ctx: PassContext, records: list[PassRecord]) -> None: ...


@dataclass
class PassRecord:
    index: int
    name: str
    nodes_before: int
    nodes_after: int
    seconds: float
    stats: Mapping[str, int]
    created: list[str]
    erased: list[str]


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


class PassManager:
    """Runs a flat list of passes in order, with instruments around each."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for inst in self.instruments:
            inst.on_start(gm, ctx)
        for i, p in enumerate(self.passes, start=1):
            before = list(gm.graph.nodes)  # references keep ids unique while we compare
            before_ids = {id(n) for n in before}
            before_names = {n.name for n in before}
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx)
            t0 = time.perf_counter()
            result = p(gm, ctx)
            seconds = time.perf_counter() - t0
            gm = result.gm
            created = []
            for n in gm.graph.nodes:
                if id(n) not in before_ids:
                    n.meta[meta.CREATED_BY] = p.name
                    created.append(n.name)
            after_names = {n.name for n in gm.graph.nodes}
            record = PassRecord(
                index=i,
                name=p.name,
                nodes_before=sum(1 for n in before if n.op not in ("placeholder", "output")),
                nodes_after=count_nodes(gm),
                seconds=seconds,
                stats=dict(result.stats),
                created=created,
                erased=sorted(before_names - after_names),
            )
            self.records.append(record)
            for inst in self.instruments:
                inst.after_pass(p, result, ctx, record)
            del before
        gm.recompile()
        for inst in self.instruments:
            inst.on_end(gm, ctx, self.records)
        return gm
