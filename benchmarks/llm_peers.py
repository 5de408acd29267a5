"""Peer quantizers for benchmarks/llm.py (SmolLM2-135M perplexity): OpenVINO FP32, NNCF ``compress_weights``
on OpenVINO, torchao weight-only and optimum-quanto weight-only.

Every row function takes the driver's context (``ctx``: ``model`` -- the float HF model, ``use_cache``
off --, ``calib`` -- 32 [1, 512] windows --, ``example_ids``, ``workdir``, ``threads``) and returns a dict:
``fn`` (called on a [batch, seq] LongTensor, returns torch logits), ``compile_s`` (conversion +
quantization), ``size_mb`` (the quantized weights / artifact), ``notes`` and any extra fields for the
JSON. The driver reads peak RSS right after the call and then measures perplexity with ``fn``. A peer
that cannot run raises; the driver records the error as the row's result.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------------------------------ helpers


def file_mb(*paths: Path) -> float:
    """Total size of files (folders: every file below them) in MB (1e6 bytes)."""
    total = 0
    for p in paths:
        p = Path(p)
        total += (
            sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        )
    return total / 1e6


def state_dict_mb(module: torch.nn.Module, path: Path) -> float:
    """Size of ``torch.save(module.state_dict())`` in MB (tied tensors are stored once)."""
    torch.save(module.state_dict(), path)
    return file_mb(path)


class _Logits(torch.nn.Module):
    """HF causal LM -> logits only, input_ids only (what OpenVINO's converter traces). The all-ones
    attention mask is made inside the graph: without one, transformers 5 looks for packed sequences in the
    position ids with ``torch.diff``, which OpenVINO's TorchScript frontend cannot convert."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


@contextlib.contextmanager
def capture_logs(name: str) -> Iterator[list[str]]:
    """Collect the messages of logger ``name`` (still printed by its own handlers)."""
    lines: list[str] = []

    class _H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                lines.append(record.getMessage())

    h = _H(level=logging.INFO)
    log = logging.getLogger(name)
    log.addHandler(h)
    try:
        yield lines
    finally:
        log.removeHandler(h)


# ------------------------------------------------------------------------------------------ OpenVINO


def ov_convert(ctx: Any):
    """The float HF model as an OpenVINO model: input_ids [batch?, seq?] i64 -> logits [batch, seq, vocab]."""
    import openvino as ov

    ov_model = ov.convert_model(
        _Logits(ctx.model).eval(),
        example_input=ctx.example_ids,
        input=[("input_ids", ov.PartialShape([-1, -1]), ov.Type.i64)],
    )
    ins = [(i.any_name, str(i.get_partial_shape())) for i in ov_model.inputs]
    outs = [str(o.get_partial_shape()) for o in ov_model.outputs]
    if len(ins) != 1 or len(outs) != 1 or not ov_model.inputs[0].get_partial_shape().is_dynamic:
        raise RuntimeError(f"unexpected converted model: inputs {ins}, outputs {outs}")
    return ov_model


def ov_runner(ov_model, threads: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Compile for CPU in f32 (quantization error only, no bf16) and wrap as LongTensor -> torch logits."""
    import openvino as ov

    core = ov.Core()
    t0 = time.perf_counter()
    compiled = core.compile_model(
        ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    )
    load_s = time.perf_counter() - t0
    request = compiled.create_infer_request()
    out = compiled.output(0)

    def run(input_ids: torch.Tensor) -> torch.Tensor:
        res = request.infer({0: input_ids.numpy()})
        return torch.from_numpy(res[out].copy())

    info = {
        "ov_compile_s": load_s,
        "ov_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "ov_input": str(ov_model.inputs[0].get_partial_shape()),
    }
    return run, info


def ov_save_mb(ov_model, ctx: Any, stem: str) -> float:
    """Size of the .bin weights of ``openvino.save_model(..., compress_to_fp16=False)``."""
    import openvino as ov

    xml = Path(ctx.workdir) / f"{stem}.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return file_mb(xml.with_suffix(".bin"))


def openvino_fp32_row(ctx: Any) -> dict[str, Any]:
    """The float model converted to OpenVINO, unquantized: the conversion is lossless."""
    t0 = time.perf_counter()
    ov_model = ov_convert(ctx)
    convert_s = time.perf_counter() - t0
    size = ov_save_mb(ov_model, ctx, "ov_fp32")
    fn, info = ov_runner(ov_model, ctx.threads)
    return {
        "fn": fn,
        "compile_s": convert_s,
        "size_mb": size,
        "notes": "openvino.convert_model, no quantization",
        **info,
    }


def nncf_row(
    ctx: Any,
    mode: str,
    *,
    group_size: int | None = None,
    awq: bool = False,
    scale_estimation: bool = False,
    gptq: bool = False,
) -> dict[str, Any]:
    """``nncf.compress_weights`` of the converted model (ratio 1.0; NNCF's own defaults otherwise: the
    embedding and the last layer stay 8 bit in the 4-bit modes). A dataset only for AWQ / SE / GPTQ."""
    import nncf

    t0 = time.perf_counter()
    ov_model = ov_convert(ctx)
    convert_s = time.perf_counter() - t0
    kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, mode)}
    if mode.startswith("INT4"):
        kwargs.update(ratio=1.0, group_size=group_size)
    if awq or scale_estimation or gptq:
        name = ov_model.inputs[0].any_name
        kwargs["dataset"] = nncf.Dataset(ctx.calib, lambda w: {name: w.numpy()})
        kwargs.update(
            {k: True for k, v in (("awq", awq), ("scale_estimation", scale_estimation), ("gptq", gptq)) if v}
        )
    t1 = time.perf_counter()
    with capture_logs("nncf") as lines:
        qmodel = nncf.compress_weights(ov_model, **kwargs)
    compress_s = time.perf_counter() - t1
    size = ov_save_mb(qmodel, ctx, f"nncf_{mode}")
    fn, info = ov_runner(qmodel, ctx.threads)
    table = bitwidth_table(lines)
    settings = ", ".join(
        f"{k}={v.name if hasattr(v, 'name') else ('Dataset(32 windows)' if k == 'dataset' else v)}"
        for k, v in kwargs.items()
    )
    return {
        "fn": fn,
        "compile_s": convert_s + compress_s,
        "convert_s": convert_s,
        "compress_s": compress_s,
        "size_mb": size,
        "notes": bitwidth_summary(table),
        "bitwidth_table": table,
        "settings": f"nncf.compress_weights({settings})",
        **info,
    }


def bitwidth_table(lines: list[str]) -> str | None:
    """NNCF's 'Statistics of the bitwidth distribution' log message (a text table), if it printed one."""
    for i, msg in enumerate(lines):
        if "bitwidth distribution" in msg:
            return "\n".join(lines[i : i + 2]) if "\n" not in msg and i + 1 < len(lines) else msg
    return None


def bitwidth_summary(table: str | None) -> str:
    """'NNCF: int8_asym, per-channel 21% (1 / 211); int4_sym, group size 64 79% (210 / 211) ...' from NNCF's
    bitwidth table (rows: mode | % all parameters (layers) | % ratio-defining parameters (layers))."""
    if not table:
        return ""
    parts = []
    for line in table.splitlines():
        line = line.strip().strip("│|┃").replace("┃", "│").replace("|", "│")
        cells = [c.strip() for c in line.split("│")]
        cells = [c for c in cells if c]
        if len(cells) >= 3 and any(ch.isdigit() for ch in cells[0]) and "%" in cells[1]:
            parts.append(f"{cells[0]} {cells[1]}")
    if parts:
        return "NNCF: " + "; ".join(parts) + " (% of parameters (layers))"
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ torchao

#: what torchao's and quanto's weight-only rows do with SmolLM2's tied embedding / lm_head (NNCF: int8)
TIED_NOTE = (
    "every nn.Linear quantized, lm_head included (untied from the tied embedding, which stays float32, "
    "113 MB); size: torch.save(state_dict)"
)


def torchao_row(ctx: Any, kind: str) -> dict[str, Any]:
    """torchao ``quantize_`` weight-only (every nn.Linear, lm_head included) in eager mode on CPU.
    kind: "int8" (Int8WeightOnlyConfig), "int4" (Int4WeightOnlyConfig(group_size=64)), "intx4" (
    IntxWeightOnlyConfig(int4, PerGroup(64)): int4 values kept unpacked in int8)."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup

    config = {
        "int8": lambda: Int8WeightOnlyConfig(),
        "int4": lambda: Int4WeightOnlyConfig(group_size=64),
        "intx4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
    }[kind]()
    model = ctx.model
    t0 = time.perf_counter()
    quantize_(model, config)
    with torch.no_grad():
        model(ctx.example_ids)  # fail here, not in the middle of the perplexity
    compile_s = time.perf_counter() - t0
    size = state_dict_mb(model, Path(ctx.workdir) / f"torchao_{kind}.pt")
    return {
        "fn": model,
        "compile_s": compile_s,
        "size_mb": size,
        "settings": f"quantize_(model, {config!r})",
        "notes": TIED_NOTE + ("; int4 values stored unpacked in int8" if kind == "intx4" else ""),
    }


# ------------------------------------------------------------------------------------------ optimum-quanto


def quanto_row(ctx: Any, weights: str, group_size: int | None = None) -> dict[str, Any]:
    """optimum-quanto ``quantize(model, weights=qint8|qint4)`` + ``freeze`` (every nn.Linear, lm_head
    included). quanto picks the int4 group size itself (128, or 96 for 576 inputs); ``group_size`` overrides
    it on every quantized module before ``freeze`` quantizes the weights."""
    from optimum import quanto

    qtype = getattr(quanto, weights)
    model = ctx.model
    t0 = time.perf_counter()
    quanto.quantize(model, weights=qtype)
    groups = set()
    for m in model.modules():
        if hasattr(m, "weight_group_size"):
            if group_size is not None and m.weight_group_size is not None:
                m.weight_group_size = group_size
            groups.add(m.weight_group_size)
    quanto.freeze(model)
    with torch.no_grad():
        model(ctx.example_ids)
    compile_s = time.perf_counter() - t0
    size = state_dict_mb(model, Path(ctx.workdir) / f"quanto_{weights}.pt")
    return {
        "fn": model,
        "compile_s": compile_s,
        "size_mb": size,
        "settings": f"quanto.quantize(model, weights={weights}); group sizes {sorted(map(str, groups))}; "
        "freeze",
        "notes": TIED_NOTE + (f"; group size {group_size}" if group_size else ""),
    }


# ------------------------------------------------------------------------------------------ table

#: row name -> (tool, builder(ctx) -> dict)
PEER_ROWS: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "openvino fp32": ("openvino", openvino_fp32_row),
    "nncf INT8_ASYM": ("nncf", lambda c: nncf_row(c, "INT8_ASYM")),
    "nncf INT4_SYM g64 RTN": ("nncf", lambda c: nncf_row(c, "INT4_SYM", group_size=64)),
    "nncf INT4_ASYM g64 RTN": ("nncf", lambda c: nncf_row(c, "INT4_ASYM", group_size=64)),
    "nncf INT4_SYM g64 AWQ+SE": (
        "nncf",
        lambda c: nncf_row(c, "INT4_SYM", group_size=64, awq=True, scale_estimation=True),
    ),
    "nncf INT4_ASYM g64 AWQ+SE": (
        "nncf",
        lambda c: nncf_row(c, "INT4_ASYM", group_size=64, awq=True, scale_estimation=True),
    ),
    "nncf INT4_SYM g64 GPTQ": ("nncf", lambda c: nncf_row(c, "INT4_SYM", group_size=64, gptq=True)),
    "torchao int8 weight-only": ("torchao", lambda c: torchao_row(c, "int8")),
    "torchao int4 weight-only g64": ("torchao", lambda c: torchao_row(c, "int4")),
    "torchao intx int4 weight-only g64": ("torchao", lambda c: torchao_row(c, "intx4")),
    "quanto qint8 weight-only": ("optimum-quanto", lambda c: quanto_row(c, "qint8")),
    "quanto qint4 g64 weight-only": ("optimum-quanto", lambda c: quanto_row(c, "qint4", group_size=64)),
}
