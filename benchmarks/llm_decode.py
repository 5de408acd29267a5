"""SmolLM2-135M decoding: prefill ms, decode tokens/s, batch-8 throughput, perplexity and size, lowbit's CPU
engines beside Hugging Face generate (torch FP32) and llama.cpp (Q8_0, Q4_0, the shipped Q4_1).

    python benchmarks/llm_decode.py [--repeats 5] [--rows NAME,...] [--out DIR] [--workdir DIR] [--skip-build]

Protocol: 2 threads everywhere, batch 1, a 128-token prompt (the start of ``pydoc_text("evaluation")``),
128 new tokens greedy with end-of-sequence ignored; prefill = time to the first new token, decode =
(new tokens - 1) / the rest. Batch 8: 8 different 128-token prompts, 64 new tokens each, tokens/s of the
whole batch (llama-cpp-python's API decodes one sequence: not measured). Perplexity: the same 16 x 512
windows as ``benchmarks/llm.py``, run on each engine itself (lowbit: ``CompiledModel.__call__`` on the
engine; llama.cpp: ``logits_all`` over each window).

1. Build (one subprocess per lowbit configuration): the torch reference is compiled once (calibration 32 x
   512 as in llm.py), every engine re-applies its plan and qparams (the same codes), each is saved; the
   greedy tokens of 8 prompts x 64 new tokens on each engine are compared with the reference's (first
   divergence and the reference's top-2 logit margin there). llama.cpp's Q8_0 / Q4_0 come from the
   shipped Q4_1 file with ``llama_model_quantize`` (``allow_requantize``).
2. Time (one process): every engine loaded, runs interleaved (engine A, B, C, ... then again), medians.

Also recorded: the bandwidth of a plain 2-thread copy (read + written bytes per second) and each row's
weight bytes read per decoded token, so each row shows its share of the bandwidth limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import llm  # noqa: E402  (the perplexity benchmark: its paths, offline settings and context)
from harness import _json_default  # noqa: E402

THREADS = llm.THREADS
PROMPT = 128
NEW = 128
BATCH = 8
BATCH_NEW = 64
MATCH_PROMPTS = 8
MATCH_NEW = 64

W4_BEST = {"scheme": "w4a16", "group_size": 64, "weight_granularity": "per_group", "weight_symmetric": False,
           "weight_method": "awq+gptq", "target_sqnr_db": None, "target_ppl_increase": None}
#: lowbit configurations: name -> (QuantConfig fields, engines)
CONFIGS: dict[str, dict[str, Any]] = {
    "w8a16": {"scheme": "w8a16", "target_sqnr_db": None, "target_ppl_increase": None},
    "w4a16 g64 asym AWQ+GPTQ": W4_BEST,
    "w8a8 static smoothquant": {"scheme": "w8a8", "target_sqnr_db": None, "target_ppl_increase": None},
}
ENGINES = ("onnxruntime-int8", "openvino-int8")
LLAMA_CPP = {"Q8_0": 7, "Q4_0": 2, "Q4_1 (shipped)": None}  # llama_ftype values


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def setup() -> tuple[Any, Any, Any, Any]:
    import torch

    torch.set_num_threads(THREADS)
    ctx = llm.load_ctx(Path("/tmp"))
    ev = ctx.eval_ids
    prompts = torch.stack([ev[i * PROMPT:(i + 1) * PROMPT] for i in range(BATCH)])
    return ctx, prompts, ev, torch


# -- build ---------------------------------------------------------------------------------------------
def build(name: str, workdir: Path) -> dict[str, Any]:
    import lowbit
    from lowbit.compiler.pipeline import compile_model
    from lowbit.evaluate import perplexity

    ctx, prompts, ev, torch = setup()
    fields = CONFIGS[name]
    config = lowbit.QuantConfig(**fields)
    t0 = time.perf_counter()
    ref = lowbit.compile(ctx.model, (ctx.example_ids,), target="torch", calibration=ctx.calib, config=config,
                         progress=False)
    out: dict[str, Any] = {"config": fields, "reference_compile_s": time.perf_counter() - t0, "engines": {}}
    ids = prompts[:MATCH_PROMPTS, : PROMPT // 2]
    r = ref.generate(ids, max_new_tokens=MATCH_NEW, eos_token_id=[])
    out["reference_ppl"] = perplexity(ref, ev, seq_len=512, progress=False)
    for target in ENGINES:
        t0 = time.perf_counter()
        eng = compile_model(ctx.model, (ctx.example_ids,), target=target, config=config, plan=ref.plan,
                            qparams=ref.state["qparams"], progress=False)
        seconds = time.perf_counter() - t0
        e = eng.generate(ids, max_new_tokens=MATCH_NEW, eos_token_id=[])
        diff = (e != r).nonzero()
        match: dict[str, Any] = {"prompts": MATCH_PROMPTS, "new_tokens": MATCH_NEW,
                                 "identical_rows": int(sum(torch.equal(e[i], r[i]) for i in range(len(e))))}
        if len(diff):
            row, pos = min(((int(a), int(b)) for a, b in diff), key=lambda x: (x[1], x[0]))
            logits = ref(r[row:row + 1, :pos])[0][0, -1]
            top2 = torch.topk(logits, 2).values
            match.update(first_divergence={"row": row, "new_token": pos - ids.shape[1]},
                         reference_top2_margin=float(top2[0] - top2[1]))
        path = workdir / slug(f"{name} {target}")
        eng.save(path)
        out["engines"][target] = {"dir": str(path), "replay_compile_s": seconds, "greedy_match": match,
                                  "weight_bytes_per_token": weight_bytes(eng.plan, ctx.model),
                                  "size_mb": dir_mb(path),
                                  "kernels": kernel_summary(eng)}
        del eng
        gc.collect()
    return out


def weight_bytes(plan: dict[str, Any], model: Any) -> int:
    """Bytes of weights (codes and scales) a decode step reads: every linear of the plan once."""
    import torch

    mods = dict(model.named_modules())
    total = 0
    for layer, spec in plan["layers"].items():
        mod = mods.get(layer)
        if not isinstance(mod, torch.nn.Linear):
            continue
        n, k = mod.weight.shape
        w = spec.get("weight") or {}
        bits = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8}.get(w.get("dtype"), 32)
        groups = k // w["group_size"] if w.get("group_size") else 1
        if bits < 32:  # fp32 scales per group (per channel), and 4-bit zero points when asymmetric
            total += n * groups * 4 + (n * groups // 2 if w.get("dtype") == "uint4" else 0)
        total += n * k * bits // 8
    return total


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def kernel_summary(eng: Any) -> dict[str, int]:
    try:
        layers = eng.step._runner.int8_layers(eng.state["weights"])
    except Exception as e:  # noqa: BLE001 - the summary is informative only
        return {"error": str(e)[:200]}  # type: ignore[dict-item]
    out: dict[str, int] = {}
    for v in layers.values():
        out[v["kernel"]] = out.get(v["kernel"], 0) + 1
    return out


def build_llama_cpp(workdir: Path) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    from lowbit.evaluate import smollm2_path

    folder, name = smollm2_path()
    src = Path(folder) / name
    out = {}
    for label, ftype in LLAMA_CPP.items():
        if ftype is None:
            out[label] = str(src)
            continue
        dst = workdir / f"smollm2-{label}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.nthread = THREADS
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {label} failed ({rc})")
        out[label] = str(dst)
    return out


# -- timing --------------------------------------------------------------------------------------------
class Lowbit:
    def __init__(self, path: str) -> None:
        import lowbit

        self.model = lowbit.load(path, threads=THREADS)

    def run(self, ids: Any, new: int) -> tuple[float, float]:
        self.model.generate(ids, max_new_tokens=new, eos_token_id=[])
        g = self.model.last_generate
        return g["prefill_s"], g["total_s"]

    def overhead(self) -> float:
        return self.model.last_generate["overhead_share"]

    def logits(self, ids: Any) -> Any:
        return self.model(ids)[0]


class HF:
    def __init__(self, model: Any) -> None:
        self.model = model
        model.config.use_cache = True

    def run(self, ids: Any, new: int) -> tuple[float, float]:
        import torch

        first: list[float] = []

        class Clock:
            def __init__(self) -> None:
                self.calls = 0

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:
                    first.append(time.perf_counter())

            def end(self) -> None:
                pass

        t0 = time.perf_counter()
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, streamer=Clock() if ids.shape[0] == 1 else None, pad_token_id=0)
        total = time.perf_counter() - t0
        return (first[0] - t0 if first else float("nan")), total


class LlamaCpp:
    def __init__(self, path: str) -> None:
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                         verbose=False)

    def run(self, ids: Any, new: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        first = None
        n = 0
        for _ in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
            if n >= new:
                break
        return float(first or 0.0), time.perf_counter() - t0

    def perplexity(self, ev: Any, windows: int = 16, seq: int = 512) -> float:
        import math

        import numpy as np
        from llama_cpp import Llama

        llm = Llama(model_path=self.path, n_ctx=seq, n_batch=seq, n_threads=THREADS, logits_all=True, verbose=False)
        total, count = 0.0, 0
        for w in range(windows):
            toks = ev[w * seq:(w + 1) * seq].tolist()
            llm.reset()
            llm.eval(toks)
            scores = np.asarray(llm.scores[: len(toks)], dtype=np.float64)
            m = scores.max(-1, keepdims=True)
            logp = scores - (m + np.log(np.exp(scores - m).sum(-1, keepdims=True)))
            total -= float(sum(logp[i, toks[i + 1]] for i in range(len(toks) - 1)))
            count += len(toks) - 1
        del llm
        return math.exp(total / count)


def copy_bandwidth(torch: Any) -> float:
    """Bytes read + written per second by a 2-thread copy of 256 MB (median of 7)."""
    src = torch.ones(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def time_all(rows: dict[str, dict[str, Any]], repeats: int) -> None:
    from lowbit.evaluate import perplexity

    ctx, prompts, ev, torch = setup()
    one = prompts[:1]
    runners: dict[str, Any] = {}
    for name, row in rows.items():
        kind = row["kind"]
        runners[name] = (HF(ctx.model) if kind == "hf" else Lowbit(row["dir"]) if kind == "lowbit"
                         else LlamaCpp(row["path"]))
        runners[name].run(one, 4)  # warm-up: engine plans, caches, first-call allocations
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in rows}
    overhead: dict[str, list[float]] = {n: [] for n in rows}
    for _ in range(repeats):
        for name, r in runners.items():
            samples[name].append(r.run(one, NEW))
            if isinstance(r, Lowbit):
                overhead[name].append(r.overhead())
    for name, r in runners.items():
        row = rows[name]
        pre = statistics.median(s[0] for s in samples[name])
        dec = statistics.median((NEW - 1) / (s[1] - s[0]) for s in samples[name])
        row.update(prefill_ms=pre * 1000, decode_tok_s=dec)
        if overhead[name]:
            row["loop_overhead_share"] = statistics.median(overhead[name])
        if not isinstance(r, LlamaCpp):
            t = [r.run(prompts, BATCH_NEW) for _ in range(max(1, repeats // 2))]
            row["batch8_tok_s"] = statistics.median(BATCH * BATCH_NEW / s[1] for s in t)
    bandwidth = copy_bandwidth(torch)
    if "torch FP32 (HF generate)" in rows:  # every linear, the tied output projection included, in float32
        rows["torch FP32 (HF generate)"]["weight_bytes_per_token"] = 4 * sum(
            m.weight.numel() for m in ctx.model.modules() if isinstance(m, torch.nn.Linear))
    for name, r in runners.items():
        row = rows[name]
        if "ppl" not in row:
            row["ppl"] = (r.perplexity(ev) if isinstance(r, LlamaCpp) else
                          perplexity(r.logits if isinstance(r, Lowbit) else ctx.model, ev, seq_len=512, progress=False))
        if row.get("weight_bytes_per_token"):
            limit = bandwidth / row["weight_bytes_per_token"]
            row["bandwidth_limit_tok_s"] = limit
            row["share_of_limit"] = row["decode_tok_s"] / limit
    rows["_copy_bandwidth_gb_s"] = {"value": bandwidth / 1e9}  # type: ignore[assignment]


def _f(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def render(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    fp32 = rows.get("torch FP32 (HF generate)", {}).get("ppl")
    lines = [
        "# SmolLM2-135M decode (batch 1, 2 threads, prompt 128, 128 new tokens greedy)",
        "",
        f"Copy bandwidth (2 threads, bytes read + written): {payload['copy_bandwidth_gb_s']:.1f} GB/s. "
        "Limit = that bandwidth / the weight bytes a decode step reads.",
        "",
        "| row | decode tok/s | prefill ms | batch 8 tok/s | perplexity | vs FP32 | size MB | weight MB/token | "
        "share of bandwidth limit | loop overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        ppl = r.get("ppl")
        rel = f"{(ppl / fp32 - 1) * 100:+.2f} %" if ppl and fp32 else ""
        wb = r.get("weight_bytes_per_token")
        share = r.get("share_of_limit")
        over = r.get("loop_overhead_share")
        lines.append(
            f"| {name} | {_f(r.get('decode_tok_s'), '.1f')} | {_f(r.get('prefill_ms'), '.0f')} | "
            f"{_f(r.get('batch8_tok_s'), '.1f')} | {_f(ppl, '.3f')} | {rel} | {_f(r.get('size_mb'), '.1f')} | "
            f"{_f(wb / 1e6 if wb else None, '.1f')} | {_f(share * 100 if share else None, '.0f')} % | "
            f"{_f(over * 100 if over is not None else None, '.1f')} % |")
    lines += ["", "## Greedy tokens against the torch reference (8 prompts of 64 tokens, 64 new tokens)", "",
              "| configuration | engine | identical rows | first divergence (row, new token) | reference top-2 margin |",
              "|---|---|---:|---|---:|"]
    for name, b in payload.get("builds", {}).items():
        for target, e in b.get("engines", {}).items():
            m = e["greedy_match"]
            fd = m.get("first_divergence")
            where = "none" if fd is None else f"({fd['row']}, {fd['new_token']})"
            lines.append(f"| {name} | {target} | {m['identical_rows']} / {m['prompts']} | {where} | "
                         f"{_f(m.get('reference_top2_margin'), '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lowbit-llm-decode"))
    ap.add_argument("--skip-build", action="store_true", help="reuse the builds recorded in the workdir")
    ap.add_argument("--build-only", action="store_true", help="build what is missing, then stop (time later)")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.build:  # child: one configuration
        result = build(args.build, args.workdir)
        (args.workdir / f"{slug(args.build)}.json").write_text(json.dumps(result, default=_json_default))
        return 0
    builds: dict[str, Any] = {}
    for name in args.configs.split(","):
        path = args.workdir / f"{slug(name)}.json"
        if not (args.skip_build and path.exists()):
            print(f"build {name} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--build", name, "--workdir", str(args.workdir)], check=True)
        builds[name] = json.loads(path.read_text())
    gguf = build_llama_cpp(args.workdir)
    if args.build_only:
        return 0
    rows: dict[str, dict[str, Any]] = {"torch FP32 (HF generate)": {"kind": "hf", "ppl": 15.092, "size_mb": 538.1}}
    for name, b in builds.items():
        for target, e in b["engines"].items():
            rows[f"lowbit {target} {name}"] = {"kind": "lowbit", "dir": e["dir"], "size_mb": e["size_mb"],
                                               "weight_bytes_per_token": e["weight_bytes_per_token"]}
    for label, path in gguf.items():
        size = Path(path).stat().st_size
        rows[f"llama.cpp {label}"] = {"kind": "llama.cpp", "path": path, "size_mb": size / 1e6,
                                      "weight_bytes_per_token": size}
    print("timing ...", flush=True)
    time_all(rows, args.repeats)
    bandwidth = rows.pop("_copy_bandwidth_gb_s")["value"]
    payload = {"protocol": __doc__, "copy_bandwidth_gb_s": bandwidth, "rows": rows, "builds": builds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm_decode.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    text = render(payload)
    (args.out / "llm_decode.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
