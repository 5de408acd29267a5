"""Benchmark lowbit's Triton kernels on Llama-7B linear shapes against cuBLAS and torch._int_mm.

    python benchmarks/gpu_kernels.py [--check] [--out benchmarks/results/kernels.json]
    python benchmarks/gpu_kernels.py --dry-run        # no GPU: tiny shapes, interpreter, correctness

For every (N, K) in Llama-7B's linears (4096x4096 attention, 11008x4096 up/gate, 4096x11008 down)
and M in {1, 16, 128, 4096} it times, with L2 flushed before every run (a 256 MB write, > the
50 MB L2 of an H100) and CUDA events, the median of ``--reps`` runs of:

    fp16 matmul (cuBLAS)      x16 @ w16.T                        baseline for every speedup
    torch._int_mm             int8 x int8 -> int32 (cuBLASLt)    baseline for the int8 kernels
    lowbit int8_gemm          int8 x int8 -> int32, no epilogue
    lowbit w8a8_linear        int8 GEMM + per-token/per-channel scales -> fp16
    lowbit quantize_per_token fp16 -> int8 rows (bandwidth bound)
    lowbit w8a16              per-channel int8 weight, fp16 x
    lowbit w4a16 g128         group-128 int4 weight, fp16 x
    lowbit llm_int8           8 outlier columns in fp16, the rest int8

and reports median ms, TFLOPS (TOPS for int8) or, for M <= 16 where a linear is bandwidth bound,
TB/s of compulsory traffic, the fraction of H100 SXM peak (1979 dense int8 TOPS, 989 dense fp16
TFLOPS, 3.35 TB/s), and the speedup over fp16 and over ``torch._int_mm``. A markdown table goes to
stdout, everything to JSON at ``--out``. ``--check`` first compares each kernel with
:mod:`lowbit.runtime.reference` at the benchmarked shape and marks the row ok / FAIL.

``--dry-run`` runs the same code path on CPU under ``TRITON_INTERPRET=1`` on tiny shapes with the
check always on; its timings are interpreter timings and mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PEAK_INT8_OPS = 1979e12  # H100 SXM dense int8 tensor-core ops/s
PEAK_FP16_FLOPS = 989e12  # H100 SXM dense fp16 tensor-core FLOP/s
PEAK_HBM_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s
LLAMA7B_LINEARS = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K)
M_VALUES = [1, 16, 128, 4096]
BANDWIDTH_BOUND_MAX_M = 16
L2_FLUSH_BYTES = 256 * 2**20
N_OUTLIER_COLUMNS = 8

DRY_RUN_LINEARS = [(40, 96)]
DRY_RUN_M = [1, 5, 33]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kernels.json"
CHECK_TOLERANCES = {  # (rtol, atol) for O(1) outputs; one ulp of the output dtype plus fp32 order
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float32: (1e-4, 1e-4),
}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One timed kernel at one shape; ``None`` marks a metric that does not apply."""

    kernel: str
    m: int
    n: int
    k: int
    ms: float | None
    tflops: float | None = None
    tbps: float | None = None
    pct_peak: float | None = None
    vs_fp16: float | None = None
    vs_int_mm: float | None = None
    check: str = "-"
    note: str = ""


@dataclass
class Case:
    """A kernel call with its work: ``flops`` of useful math and ``bytes`` of compulsory traffic."""

    name: str
    fn: Callable[[], torch.Tensor]
    flops: float
    bytes: float
    peak_ops: float
    check: Callable[[torch.Tensor], str] | None = None
    baseline: bool = False
    note: str = ""


@dataclass
class Report:
    device: str
    torch_version: str
    triton_version: str
    dry_run: bool
    peaks: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def time_cuda(fn: Callable[[], object], flush: torch.Tensor, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, each after an L2-evicting buffer write."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def time_cpu(fn: Callable[[], object], flush: torch.Tensor, warmup: int, reps: int) -> float:
    """Dry-run stand-in for :func:`time_cuda` (wall clock; exercises the same bookkeeping)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        flush.zero_()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
def _close(out: torch.Tensor, expected: torch.Tensor) -> str:
    rtol, atol = CHECK_TOLERANCES[expected.dtype]
    diff = (out.float() - expected.float()).abs()
    bad = diff > atol + rtol * expected.float().abs()
    if bool(bad.any()):
        return f"FAIL ({int(bad.sum())} elements, max abs err {diff.max().item():.3g})"
    return "ok"


def _equal(out: torch.Tensor, expected: torch.Tensor) -> str:
    return "ok" if torch.equal(out, expected) else f"FAIL ({int((out != expected).sum())} elements differ)"


def build_cases(m: int, n: int, k: int, device: torch.device) -> list[Case]:
    """Inputs sized so outputs are O(1), quantised with the reference, and one Case per kernel."""
    from lowbit.kernels.llm_int8 import llm_int8_linear
    from lowbit.kernels.quantize_per_token import quantize_per_token
    from lowbit.kernels.w8a8_gemm import int8_gemm, w8a8_linear
    from lowbit.kernels.weight_only_gemm import weight_only_linear
    from lowbit.runtime import reference as ref

    g = torch.Generator(device="cpu").manual_seed(m * 7 + n * 3 + k)
    x16 = torch.randn(m, k, generator=g).to(torch.float16).to(device)
    w16 = (torch.randn(n, k, generator=g) / k**0.5).to(torch.float16).to(device)
    a_q, a_s = ref.quantize_per_token_ref(x16)
    w_q, w_s = ref.quantize_per_channel_ref(w16)
    q8, s8, _ = ref.quantize_weight_groupwise(w16, bits=8, group_size=k)
    g4 = 128 if k % 128 == 0 else k  # group-128 int4 (per channel on the tiny dry-run shapes)
    q4, s4, _ = ref.quantize_weight_groupwise(w16, bits=4, group_size=g4)
    p4 = ref.pack_int4(q4)
    x_out = x16.clone()
    x_out[:, torch.arange(N_OUTLIER_COLUMNS, device=device) * (k // N_OUTLIER_COLUMNS)] *= 20.0

    flops = 2.0 * m * n * k
    out16 = 2.0 * m * n
    cases = [
        Case("fp16 matmul (cuBLAS)", lambda: x16 @ w16.T, flops, 2.0 * (m * k + n * k) + out16,
             PEAK_FP16_FLOPS, baseline=True),
        Case("torch._int_mm", lambda: torch._int_mm(a_q, w_q.T), flops, 1.0 * (m * k + n * k) + 4.0 * m * n,
             PEAK_INT8_OPS, baseline=True),
        Case("lowbit int8_gemm", lambda: int8_gemm(a_q, w_q), flops, 1.0 * (m * k + n * k) + 4.0 * m * n,
             PEAK_INT8_OPS, check=lambda o: _equal(o, ref.int8_gemm_ref(a_q, w_q))),
        Case("lowbit w8a8_linear", lambda: w8a8_linear(a_q, w_q, a_s, w_s, out_dtype=torch.float16), flops,
             1.0 * (m * k + n * k) + 4.0 * (m + n) + out16, PEAK_INT8_OPS,
             check=lambda o: _close(o, ref.w8a8_linear_ref(a_q, w_q, a_s, w_s, out_dtype=torch.float16))),
        Case("lowbit quantize_per_token", lambda: quantize_per_token(x16)[0], 0.0, 3.0 * m * k + 4.0 * m,
             PEAK_HBM_BYTES, check=lambda o: _equal(o, ref.quantize_per_token_ref(x16)[0]),
             note="per-row quantisation of the [M, K] input"),
        Case("lowbit w8a16", lambda: weight_only_linear(x16, q8, s8, bits=8, group_size=k), flops,
             2.0 * m * k + 1.0 * n * k + 2.0 * n + out16, PEAK_FP16_FLOPS,
             check=lambda o: _close(o, ref.weight_only_linear_ref(x16, q8, s8, bits=8, group_size=k)),
             note="per-channel scales"),
        Case(f"lowbit w4a16 g{g4}", lambda: weight_only_linear(x16, p4, s4, bits=4, group_size=g4), flops,
             2.0 * m * k + 0.5 * n * k + 2.0 * n * (k // g4) + out16, PEAK_FP16_FLOPS,
             check=lambda o: _close(o, ref.weight_only_linear_ref(x16, p4, s4, bits=4, group_size=g4))),
        Case("lowbit llm_int8", lambda: llm_int8_linear(x_out, w_q, w_s), flops,
             2.0 * m * k + 1.0 * n * k + out16, PEAK_INT8_OPS,
             check=lambda o: _close(o, ref.llm_int8_linear_ref(x_out, w_q, w_s)),
             note=f"{N_OUTLIER_COLUMNS} outlier columns"),
    ]  # fmt: skip
    return cases


def run_shape(
    m: int,
    n: int,
    k: int,
    *,
    device: torch.device,
    timer: Callable,
    flush: torch.Tensor,
    check: bool,
    warmup: int,
    reps: int,
) -> list[Row]:
    """Check (optionally) and time every case at one shape; speedups relative to the baselines."""
    rows: list[Row] = []
    times: dict[str, float | None] = {}
    for case in build_cases(m, n, k, device):
        status = "-"
        try:
            out = case.fn()
            if check and case.check is not None:
                status = case.check(out)
            ms = timer(case.fn, flush, warmup, reps)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. _int_mm's shape limits
            times[case.name] = None
            rows.append(Row(case.name, m, n, k, None, note=f"n/a: {str(exc).splitlines()[0][:80]}"))
            continue
        times[case.name] = ms
        seconds = ms * 1e-3
        row = Row(case.name, m, n, k, ms, check=status, note=case.note)
        if m <= BANDWIDTH_BOUND_MAX_M or case.flops == 0:
            row.tbps = case.bytes / seconds / 1e12
            row.pct_peak = 100.0 * case.bytes / seconds / PEAK_HBM_BYTES
        else:
            row.tflops = case.flops / seconds / 1e12
            row.pct_peak = 100.0 * case.flops / seconds / case.peak_ops
        rows.append(row)
    t_fp16, t_int_mm = times.get("fp16 matmul (cuBLAS)"), times.get("torch._int_mm")
    for row in rows:
        if row.ms is not None and row.ms > 0:
            row.vs_fp16 = t_fp16 / row.ms if t_fp16 else None
            row.vs_int_mm = t_int_mm / row.ms if t_int_mm else None
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def markdown_table(rows: list[Row]) -> str:
    def fmt(v: float | None, spec: str, suffix: str = "") -> str:
        return "-" if v is None else format(v, spec) + suffix

    lines = [
        "| kernel | M | N | K | median ms | TFLOPS | TB/s | % peak | vs fp16 | vs _int_mm | check | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.m} | {r.n} | {r.k} | {fmt(r.ms, '.4f')} | {fmt(r.tflops, '.1f')} | "
            f"{fmt(r.tbps, '.2f')} | {fmt(r.pct_peak, '.1f')} | {fmt(r.vs_fp16, '.2f', 'x')} | "
            f"{fmt(r.vs_int_mm, '.2f', 'x')} | {r.check} | {r.note} |"
        )
    return "\n".join(lines)


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="verify each kernel against the reference first")
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, check on")
    p.add_argument("--m", type=int, nargs="+", default=None, help="override the M values")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules' triton.jit decorations
        device, timer = torch.device("cpu"), time_cpu
        linears, m_values, check = DRY_RUN_LINEARS, args.m or DRY_RUN_M, True
        warmup, reps, flush_bytes = args.warmup or 0, args.reps or 1, 2**20
    else:
        if not torch.cuda.is_available():
            print(
                "benchmarks/gpu_kernels.py: no CUDA device found. This benchmark times GPU kernels; run it on a "
                "CUDA machine, or use --dry-run to check the kernels on CPU under TRITON_INTERPRET=1.",
                file=sys.stderr,
            )
            return 2
        device, timer = torch.device("cuda"), time_cuda
        linears, m_values, check = LLAMA7B_LINEARS, args.m or M_VALUES, args.check
        warmup, reps, flush_bytes = args.warmup or 5, args.reps or 30, L2_FLUSH_BYTES

    from lowbit.kernels import import_triton

    triton_mod, _ = import_triton()  # fails here, with the install hint, if the extra is missing
    report = Report(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        torch_version=torch.__version__,
        triton_version=triton_mod.__version__,
        dry_run=args.dry_run,
        peaks={"int8_ops": PEAK_INT8_OPS, "fp16_flops": PEAK_FP16_FLOPS, "hbm_bytes_per_s": PEAK_HBM_BYTES},
    )
    flush = torch.empty(flush_bytes, dtype=torch.int8, device=device)
    for n, k in linears:
        for m in m_values:
            report.rows += run_shape(
                m, n, k, device=device, timer=timer, flush=flush, check=check, warmup=warmup, reps=reps
            )

    print(markdown_table(report.rows))
    write_json(report, args.out)
    print(f"\nwrote {args.out}")
    failures = [r for r in report.rows if r.check.startswith("FAIL")]
    for r in failures:
        print(f"CHECK FAILED: {r.kernel} M={r.m} N={r.n} K={r.k}: {r.check}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
