"""`make demo`: compile the bundled MiniLM-L6 to INT8, save, reload, and compare with FP32.

Calibration: 32 batches of pydoc text; evaluation on a disjoint split. Per-pass dumps go to dumps/minilm.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402

from common import embedding_cosines, load_minilm, median_ms, text_batches  # noqa: E402


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default=None, help="lowbit target (default: the fastest installed CPU engine)")
    ap.add_argument("--calibration-batches", type=int, default=32)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump-dir", default="dumps/minilm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = args.target or default_target()

    model, tok = load_minilm()
    cal = text_batches(tok, n_batches=args.calibration_batches, offset=0)
    evalb = text_batches(tok, n_batches=args.eval_batches, offset=1)
    print(f"MiniLM-L6: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"{len(cal)} calibration and {len(evalb)} evaluation batches of 8 x 128 tokens")

    t0 = time.perf_counter()
    qmodel = lowbit.compile(model, cal[0], target=target, calibration=cal, dump_dir=args.dump_dir,
                            dynamic_shapes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    compile_s = time.perf_counter() - t0
    print(f"compiled for target {target!r} in {compile_s:.1f} s; per-pass dumps: {args.dump_dir}/index.html")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "minilm-int8"
        qmodel.save(out)
        reloaded = lowbit.load(out, model=model) if target == "torch" else lowbit.load(out)
        size_int8 = dir_size_mb(out)
    fp32_size = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6

    cos = embedding_cosines(model, reloaded, evalb)
    b = evalb[0]
    with torch.no_grad():
        fp32_ms = median_ms(lambda: model(**b))
        int8_ms = median_ms(lambda: reloaded(**b))
    print()
    print(f"| model | target | median ms (8x128, {args.threads} threads) | cosine mean | cosine min | size MB |")
    print("|---|---|---|---|---|---|")
    print(f"| FP32 | torch eager | {fp32_ms:.1f} | 1.0000 | 1.0000 | {fp32_size:.1f} |")
    print(f"| lowbit INT8 | {target} | {int8_ms:.1f} | {cos.mean():.4f} | {cos.min():.4f} | {size_int8:.1f} |")
    print()
    print(qmodel.report.summary())


def default_target() -> str:
    """The fastest CPU engine installed (the order measured by benchmarks/cpu.py)."""
    from lowbit.backends.registry import TARGETS

    for t in ("openvino-int8", "onnxruntime-int8"):
        if t in TARGETS:
            try:
                from lowbit.backends.registry import get_backend

                get_backend(t).check_available()
                return t
            except Exception:  # not installed: try the next one
                continue
    return "torch"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
