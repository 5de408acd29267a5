"""The benchmark harness: build rows, score them, time them in interleaved rounds, print and save.

A *row* is a name, a group (``fp32`` / ``peer`` / ``lowbit``) and a ``build`` callable. ``build(ctx)``
returns a :class:`Built`: a runner ``fn(batch) -> torch.Tensor`` (batch: the dict of input tensors every
row receives, the same objects for every row), the size on disk of what it built and notes. A build that
raises is recorded -- the row keeps its error string and shows ``n/a (reason)`` -- and never stops the run.

Compile time is wall time from the start of ``build`` up to the end of the first call (so lazy compilers
such as ``torch.compile`` are charged for their compilation), with shared stages (an ONNX export several
rows reuse, see :class:`StageCache`) counted once for each row that used them, whichever made them.

Timing: after ``warmup`` calls per row, ``rounds`` rounds; each round visits every row once (round-robin,
the starting row rotating from round to round) and times ``iters`` consecutive calls of it, cycling over
the timing batches in the same order for every row. The median of all those calls is the row's number.
The garbage collector is off while timing.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Batch = Mapping[str, Any]
Runner = Callable[[Batch], torch.Tensor]
GROUPS = ("fp32", "peer", "lowbit")


class RowUnavailable(Exception):
    """Raised by a build when its runtime is missing: recorded like any error, but expected."""


@dataclass
class Built:
    fn: Runner
    size_mb: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    stages_s: float = 0.0  # time of shared stages this row used (added to its compile time)
    keep: Any = None  # objects the runner needs kept alive (sessions, temp dirs)


@dataclass
class RowSpec:
    name: str
    group: str
    build: Callable[[BuildContext], Built]
    settings: str = ""  # the exact settings, printed under the table and kept in the JSON

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"row {self.name!r}: group must be one of {GROUPS}, got {self.group!r}")


@dataclass
class BuildContext:
    """What a build needs: calibration data, an example batch, a work directory, shared stages."""

    calibration: list[Batch]
    example: Batch
    workdir: Path
    threads: int
    stages: StageCache
    info: dict[str, Any] = field(default_factory=dict)


class StageCache:
    """Memoises shared work (e.g. one ONNX export used by several rows) and remembers its wall time.

    ``spent`` accumulates the wall time of outermost stage computations, so a build that happens to make
    a stage first is not charged for it twice (once in its own wall time, once via ``Built.stages_s``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._values: dict[str, Any] = {}
        self._times: dict[str, float] = {}
        self._errors: dict[str, BaseException] = {}
        self._clock = clock
        self._depth = 0
        self.spent = 0.0

    def get(self, key: str, make: Callable[[], Any]) -> tuple[Any, float]:
        """The value of stage ``key`` (made once) and the seconds it took to make it."""
        if key in self._errors:
            raise self._errors[key]
        if key not in self._values:
            t0 = self._clock()
            self._depth += 1
            try:
                self._values[key] = make()
            except BaseException as e:
                self._errors[key] = e
                raise
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.spent += self._clock() - t0
            self._times[key] = self._clock() - t0
        return self._values[key], self._times[key]

    def clear(self) -> None:
        self._values.clear()
        self._times.clear()
        self._errors.clear()


@dataclass
class RowResult:
    name: str
    group: str
    ms_median: float | None = None
    ms_all: list[float] = field(default_factory=list)
    speedup: float | None = None
    cos_mean: float | None = None
    cos_min: float | None = None
    top1: float | None = None
    sqnr_db: float | None = None  # output SQNR vs FP32 eager, where the workload scores it
    size_mb: float | None = None
    compile_s: float | None = None
    error: str | None = None
    note: str = ""
    settings: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def short_error(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (the table shows it; the JSON keeps a longer form)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_rows(specs: Sequence[RowSpec], ctx: BuildContext, *, log: Callable[[str], None] = print,
               clock: Callable[[], float] = time.perf_counter) -> tuple[list[RowResult], dict[str, Built]]:
    """Build every row (first call included). Failures become results with ``error`` set."""
    results: list[RowResult] = []
    built: dict[str, Built] = {}
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate row names: {names}")
    for spec in specs:
        res = RowResult(spec.name, spec.group, settings=spec.settings)
        results.append(res)
        log(f"  build {spec.name} ...")
        t0 = clock()
        spent0 = ctx.stages.spent
        try:
            b = spec.build(ctx)
            with torch.no_grad():
                out = b.fn(ctx.example)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"runner returned {type(out).__name__}, expected a torch.Tensor")
        except Exception as e:  # a row that cannot be built is reported, never fatal
            res.error = short_error(e)
            res.extra["traceback"] = traceback.format_exc(limit=8)[-4000:]
            log(f"    n/a: {res.error}")
            continue
        # own wall time, minus shared stages made during it, plus every shared stage it used
        res.compile_s = clock() - t0 - (ctx.stages.spent - spent0) + b.stages_s
        res.size_mb = b.size_mb
        res.note = b.note
        res.extra.update(b.extra)
        built[spec.name] = b
        log(f"    ok in {res.compile_s:.1f} s" + (f" ({b.note})" if b.note else ""))
    return results, built


def score_rows(results: list[RowResult], built: Mapping[str, Built],
               score: Callable[[Runner], Mapping[str, float]], *, log: Callable[[str], None] = print) -> None:
    """Fill the quality columns (``cos_mean``/``cos_min`` or ``top1``, and ``sqnr_db``) with ``score(fn)``."""
    for res in results:
        if res.name not in built:
            continue
        try:
            with torch.no_grad():
                for k, v in score(built[res.name].fn).items():
                    setattr(res, k, float(v))
        except Exception as e:
            res.error = "scoring failed: " + short_error(e)
            res.extra["traceback"] = traceback.format_exc(limit=8)[-4000:]
            log(f"  {res.name}: {res.error}")


def time_rows(results: list[RowResult], built: Mapping[str, Built], batches: Sequence[Batch], *,
              rounds: int, iters: int, warmup: int, clock: Callable[[], float] = time.perf_counter,
              log: Callable[[str], None] = print) -> list[list[str]]:
    """Interleaved timing; returns the visiting order of every round (for the record and the tests)."""
    live = [r for r in results if r.name in built and r.error is None]
    if not live or not batches:
        return []
    for res in live:
        fn = built[res.name].fn
        try:
            with torch.no_grad():
                for i in range(warmup):
                    fn(batches[i % len(batches)])
        except Exception as e:
            res.error = "warmup failed: " + short_error(e)
    live = [r for r in live if r.error is None]
    orders: list[list[str]] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad():
            for rnd in range(rounds):
                k = rnd % len(live) if live else 0
                order = live[k:] + live[:k]
                orders.append([r.name for r in order])
                for res in order:
                    if res.error is not None:
                        continue
                    fn = built[res.name].fn
                    try:
                        for i in range(iters):
                            b = batches[(rnd * iters + i) % len(batches)]
                            t0 = clock()
                            fn(b)
                            res.ms_all.append((clock() - t0) * 1000.0)
                    except Exception as e:
                        res.error = f"failed while timing (round {rnd}): " + short_error(e)
                log(f"  round {rnd + 1}/{rounds} done")
    finally:
        if gc_was_enabled:
            gc.enable()
    for res in live:
        if res.error is None and res.ms_all:
            res.ms_median = statistics.median(res.ms_all)
    return orders


def fill_speedups(results: Iterable[RowResult]) -> RowResult | None:
    """speedup = best FP32 median / row median; returns the best FP32 row."""
    results = list(results)
    fp32 = [r for r in results if r.group == "fp32" and r.ms_median is not None and r.error is None]
    if not fp32:
        return None
    best = min(fp32, key=lambda r: r.ms_median)  # type: ignore[arg-type, return-value]
    for r in results:
        if r.ms_median is not None and r.error is None:
            r.speedup = best.ms_median / r.ms_median  # type: ignore[operator]
    return best


def run_benchmark(specs: Sequence[RowSpec], ctx: BuildContext, *, score: Callable[[Runner], Mapping[str, float]],
                  timing_batches: Sequence[Batch], rounds: int, iters: int, warmup: int,
                  clock: Callable[[], float] = time.perf_counter,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, score and time ``specs``; returns ``{"rows": [...], "best_fp32": name, "orders": [...]}``."""
    results, built = build_rows(specs, ctx, log=log, clock=clock)
    log("  scoring ...")
    score_rows(results, built, score, log=log)
    log(f"  timing: {rounds} rounds x {iters} calls per row, {warmup} warmup calls")
    orders = time_rows(results, built, timing_batches, rounds=rounds, iters=iters, warmup=warmup, clock=clock,
                       log=log)
    best = fill_speedups(results)
    built.clear()
    gc.collect()
    return {"rows": [r.to_json() for r in results], "best_fp32": best.name if best else None, "orders": orders}


# ----------------------------------------------------------------------------------------- formatting


def _fmt(v: Any, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def markdown_table(rows: Sequence[Mapping[str, Any]], *, quality: str) -> str:
    """One markdown table; ``quality`` is ``"cos"`` (cosine mean/min) or ``"top1"``."""
    if quality not in ("cos", "top1"):
        raise ValueError(quality)
    qcols = ["cos mean", "cos min"] if quality == "cos" else ["top-1 %"]
    with_sqnr = any(r.get("sqnr_db") is not None for r in rows)
    qcols += ["SQNR dB"] if with_sqnr else []
    head = ["row", "group", "median ms", "speedup", *qcols, "size MB", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        name = r["name"] + (f" ({r['note']})" if r.get("note") else "")
        if r.get("error") and r.get("ms_median") is None:
            reason = str(r["error"]).replace("|", "/").replace("\n", " ")
            if len(reason) > 160:
                reason = reason[:157] + "..."
            cells = [name, r["group"], f"n/a ({reason})"] + [""] * (len(head) - 3)
        else:
            q = ([_fmt(r.get("cos_mean"), ".4f"), _fmt(r.get("cos_min"), ".4f")] if quality == "cos"
                 else [_fmt(None if r.get("top1") is None else 100.0 * r["top1"], ".2f")])
            q += [_fmt(r.get("sqnr_db"), ".1f")] if with_sqnr else []
            cells = [name, r["group"], _fmt(r.get("ms_median"), ".2f"),
                     _fmt(r.get("speedup"), ".2f", "-") + ("x" if r.get("speedup") is not None else ""), *q,
                     _fmt(r.get("size_mb"), ".1f"), _fmt(r.get("compile_s"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_list(rows: Sequence[Mapping[str, Any]]) -> str:
    out = [f"- **{r['name']}**: {r['settings']}" for r in rows if r.get("settings")]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- environment


def environment(threads: int) -> dict[str, Any]:
    """Versions, threads and the CPU: saved with every result file."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    versions = {}
    for mod in ("torch", "torchao", "onnx", "onnxruntime", "openvino", "nncf", "transformers", "numpy",
                "sklearn", "lowbit"):
        versions[mod] = _version(mod)
    env["versions"] = versions
    try:
        env["load_avg_start"] = os.getloadavg()
    except OSError:
        pass
    return env


def _version(mod: str) -> str | None:
    import importlib.metadata as md

    dist = {"sklearn": "scikit-learn"}.get(mod, mod)
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------------------- small helpers


def file_mb(*paths: str | os.PathLike[str]) -> float:
    """Total size in MB (1e6 bytes) of files and directories (recursively)."""
    total = 0
    for p in map(Path, paths):
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total / 1e6


def state_dict_mb(module: torch.nn.Module) -> float:
    """Size on disk of ``torch.save(module.state_dict())``."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sd.pt"
        torch.save(module.state_dict(), path)
        return file_mb(path)


def graph_tensors_mb(gm: torch.fx.GraphModule) -> float:
    """Size on disk of ``torch.save`` of the tensors the graph reads (get_attr), unused attributes excluded."""
    tensors = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj: Any = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                tensors[str(node.target)] = obj.detach()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "graph_tensors.pt"
        torch.save(tensors, path)
        return file_mb(path)


def quick_median_ms(fn: Callable[[], Any], calls: int = 5, warmup: int = 2) -> float:
    """A short median, used inside builds to choose between variants (e.g. optimized vs plain graph)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ts)


def write_results(out_dir: str | os.PathLike[str], stem: str, payload: Mapping[str, Any], markdown: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    (out / f"{stem}.md").write_text(markdown.rstrip() + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return repr(o)
