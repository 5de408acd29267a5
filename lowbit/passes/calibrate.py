"""Calibrate: stream the calibration batches through the graph with an FX Interpreter.

Each batch is checked first (structure, dtype, shape, NaN/Inf) and a bad one raises CalibrationError
naming the batch index and the input. Observers keep bounded state, so any number of batches fits in
memory. When re-applying an artifact (``ctx.qparams``) the observers take the stored qparams instead.

``stream_layerwise`` is the other way to stream: node by node, every batch at each node, so that a pass can
look at all of a layer's inputs and change the layer before anything after it runs (GPTQ's Hessians,
true-sequential: the inputs of a layer come from the layers before it as already quantized). It holds the
batches' values of the nodes still to be read (about one decoder block's activations), not the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from lowbit.compiler import meta
from lowbit.compiler.graph import get_attr, observer_of
from lowbit.compiler.pass_manager import Pass, PassContext, PassResult
from lowbit.errors import ArtifactError, CalibrationError
from lowbit.passes.insert_observers import observer_nodes
from lowbit.runtime.progress import bar_disabled


class _NamingInterpreter(fx.Interpreter):
    """An Interpreter whose failures name the node that failed."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as e:
            raise CalibrationError(f"{self.where}: node {n.name} ({n.target}) failed: {type(e).__name__}: {e}") from e

    where = ""


class _Watching(_NamingInterpreter):
    """Hands each watched node's tensor output to ``record(name, value, batch)`` as the graph runs."""

    def __init__(self, gm: fx.GraphModule, watched: Iterable[str],
                 record: Callable[[str, torch.Tensor, int], None]) -> None:
        super().__init__(gm)
        self.watched = set(watched)
        self.record = record
        self.batch = 0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.watched and isinstance(out, torch.Tensor) and out.numel():
            self.record(n.name, out.detach(), self.batch)
        return out


def collect_node_statistics(gm: fx.GraphModule, ctx: PassContext, watched: Iterable[str],
                            record: Callable[[str, torch.Tensor, int], None], desc: str) -> int:
    """The one way a pass collects a statistic of the calibration data: stream the calibration batches (checked,
    named in errors) through the graph and hand each watched node's tensor output to ``record(name, value,
    batch)``; returns how many batches ran. SmoothQuant's channel ranges, AWQ's mean |x| and bias correction's
    channel means use it; the observers' ranges are the same stream (``Calibrate``), GPTQ's Hessians the
    layer-wise one (``stream_layerwise``)."""
    return stream_calibration(_Watching(gm, watched, record), ctx, desc)


def calibration_batches(calibration: Iterable[Any]) -> Iterator[Any]:
    """The batches of a calibration iterable; an iterable that raises while producing batch i (a reader
    failing midway) becomes a CalibrationError naming batch i, as does something that is not iterable."""
    try:
        it = iter(calibration)
    except TypeError as e:
        raise CalibrationError(f"calibration must be an iterable of batches like example_inputs, got "
                               f"{type(calibration).__name__}") from e
    i = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:  # the user's reader: any failure is a failure of the calibration data
            raise CalibrationError(f"calibration batch {i}: the calibration iterable raised "
                                   f"{type(e).__name__}: {e}") from e
        yield batch
        i += 1


def stream_calibration(interp: fx.Interpreter, ctx: PassContext, desc: str) -> int:
    """Check each calibration batch and run it through ``interp``; returns how many batches ran.

    The interpreter's ``where`` and ``batch`` attributes name the batch in its error messages.
    """
    signature = ctx.notes["signature"]
    batches = 0
    with torch.no_grad():
        for i, batch in enumerate(tqdm(calibration_batches(ctx.calibration), desc=desc, unit="batch",
                                       disable=bar_disabled(ctx.progress), leave=False)):
            where = f"calibration batch {i}"
            flat = signature.flatten(batch, error=CalibrationError, where=where, check_finite=True)
            interp.where, interp.batch = where, i
            interp.run(*flat)
            batches += 1
    if batches == 0:
        raise CalibrationError("calibration is empty: give at least one batch")
    return batches


def stream_layerwise(gm: fx.GraphModule, ctx: PassContext, layers: Iterable[fx.Node],
                     visit: Callable[[fx.Node, list[torch.Tensor]], None], desc: str) -> int:
    """Run the calibration batches through ``gm`` one node at a time, all batches together. Before each node
    of ``layers`` runs, ``visit(node, xs)`` gets its first input in every batch (``xs[b]``) and may replace the
    node's weight (a get_attr argument is read when used, so the node and everything after it see the change).
    Observers pass their input through untouched (their ranges are calibrated already). Returns the number
    of batches."""
    signature = ctx.notes["signature"]
    flats = [signature.flatten(b, error=CalibrationError, where=f"calibration batch {i}", check_finite=True)
             for i, b in enumerate(calibration_batches(ctx.calibration or ()))]
    if not flats:
        raise CalibrationError("calibration is empty: give at least one batch")
    wanted = set(layers)
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    env: dict[fx.Node, list[Any]] = {}
    for j, p in enumerate(n for n in nodes if n.op == "placeholder"):
        env[p] = [f[j] for f in flats]

    def value(a: fx.Node, b: int) -> Any:
        return get_attr(gm, str(a.target)) if a.op == "get_attr" else env[a][b]

    bar = tqdm(total=len(wanted), desc=desc, unit="layer", disable=bar_disabled(ctx.progress), leave=False)
    with torch.no_grad():
        for i, n in enumerate(nodes):
            if n.op in ("placeholder", "get_attr"):
                continue
            if n.op == "output":
                break
            if n in wanted:
                visit(n, [value(n.args[0], b) for b in range(len(flats))])  # type: ignore[arg-type]
                bar.update(1)
                wanted.discard(n)
                if not wanted:  # nothing after the last layer matters (a causal LM's logits are the largest)
                    break
            outs = []
            for b in range(len(flats)):
                args = fx.node.map_arg(n.args, lambda a, b=b: value(a, b))
                kwargs = fx.node.map_arg(n.kwargs, lambda a, b=b: value(a, b))
                try:
                    if observer_of(gm, n) is not None:
                        out = args[0]
                    elif n.op == "call_function":
                        out = n.target(*args, **kwargs)  # type: ignore[operator]
                    elif n.op == "call_module":
                        out = gm.get_submodule(str(n.target))(*args, **kwargs)
                    else:
                        out = getattr(args[0], str(n.target))(*args[1:], **kwargs)
                except Exception as e:
                    raise CalibrationError(f"calibration batch {b}: node {n.name} ({n.target}) failed: "
                                           f"{type(e).__name__}: {e}") from e
                outs.append(out)
            env[n] = outs
            for a in n.all_input_nodes:
                if last_use.get(a) == i:
                    env.pop(a, None)
    bar.close()
    return len(flats)


def qparam_key(observes: str) -> str:
    """'encoder.layer.0.attention.self.query:input' -> 'encoder.layer.0.attention.self.query.input'."""
    layer, role = observes.rsplit(":", 1)
    return f"{layer}.{role}"


class Calibrate(Pass):
    name = "calibrate"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        observers = observer_nodes(gm)
        if not observers:
            return PassResult(gm, {})
        if ctx.qparams is not None:
            return PassResult(gm, {"observers_loaded": self._load(observers, ctx)})
        if ctx.calibration is None:
            raise CalibrationError(
                "static W8A8 layers need calibration data: pass calibration=[batch, ...] (batches like "
                "example_inputs), or choose a scheme without static activations (w8a8_dynamic, w8a16, w4a16)"
            )
        batches = stream_calibration(_NamingInterpreter(gm), ctx, "lowbit calibrate")
        return PassResult(gm, {"batches": batches, "observers": len(observers)})

    @staticmethod
    def _load(observers: list[tuple[fx.Node, Any]], ctx: PassContext) -> int:
        assert ctx.qparams is not None
        for node, obs in observers:
            key = qparam_key(node.meta[meta.OBSERVES][0])
            try:
                scale = float(ctx.qparams[f"{key}.scale"])
                zp = int(ctx.qparams[f"{key}.zero_point"])
            except KeyError as e:
                raise ArtifactError(f"the artifact's qparams have no entry {e.args[0]!r}") from e
            obs.fixed = (scale, zp)
        return len(observers)
