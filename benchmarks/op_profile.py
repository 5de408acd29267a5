"""Per-op profiles from the engines themselves: what each op ran as, and for how long.

- OpenVINO: ``PERF_COUNT: True`` and ``InferRequest.get_profiling_info()``; one row per (node type, execution
  type), e.g. ``GroupConvolution brgconv_avx512_dw_I8`` (int8) or ``... _bf16`` (float), summed over nodes.
- ONNX Runtime: ``SessionOptions.enable_profiling``; one row per op type of the optimized graph that ran
  (``QLinearConv`` is int8, ``Mul`` / ``HardSigmoid`` are float), from the profile's ``*_kernel_time`` events.

Milliseconds per call, averaged over ``calls`` calls after ``warmup``; the engines' own timers, so the rows
sum to less than the wall time of a call.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def openvino_ops(model_path: str | os.PathLike[str], feed: Mapping[str, np.ndarray], *, threads: int = 2,
                 calls: int = 20, warmup: int = 3, config: Mapping[str, Any] | None = None) -> dict[str, float]:
    """{"<node type> <exec type>": ms per call} for the model compiled for ``feed``'s static shapes."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model_path))
    model.reshape({p.get_any_name(): list(feed[p.get_any_name()].shape) for p in model.inputs})
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True, **(config or {})}
    req = core.compile_model(model, "CPU", cfg).create_infer_request()
    for _ in range(warmup):
        req.infer(dict(feed))
    total: dict[str, float] = defaultdict(float)
    for _ in range(calls):
        req.infer(dict(feed))
        for p in req.get_profiling_info():
            if p.status == p.Status.EXECUTED:
                total[f"{p.node_type} {p.exec_type}"] += p.real_time.total_seconds() * 1e3 / calls
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def onnxruntime_ops(model_path: str | os.PathLike[str], feed: Mapping[str, np.ndarray], *, threads: int = 2,
                    calls: int = 20, warmup: int = 3) -> dict[str, float]:
    """{"<op type>": ms per call} over the optimized graph's kernels (ORT_ENABLE_ALL, ``threads`` threads)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lowbit-ortprof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + calls):
            sess.run(None, dict(feed))
        events = json.loads(Path(sess.end_profiling()).read_text())
    total: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        seen[e["name"]] += 1
        if seen[e["name"]] > warmup:  # each node's first ``warmup`` events belong to the warmup calls
            total[e["args"]["op_name"]] += e["dur"] / 1e3 / calls
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def markdown(profiles: Mapping[str, Mapping[str, float]], *, top: int = 14) -> str:
    """One table per profile: op (and kernel) -> ms per call, the ``top`` largest, then the rest summed."""
    out: list[str] = []
    for title, ops in profiles.items():
        if not ops:
            continue
        items: Sequence[tuple[str, float]] = list(ops.items())
        rest = sum(v for _, v in items[top:])
        out += [f"**{title}** (engine total {sum(ops.values()):.2f} ms per call)", "", "| op | kernel | ms |",
                "|---|---|---:|"]
        for k, v in items[:top]:
            op, _, kernel = k.partition(" ")
            out.append(f"| {op} | {kernel or '-'} | {v:.2f} |")
        if rest:
            out.append(f"| (other) | | {rest:.2f} |")
        out.append("")
    return "\n".join(out)
