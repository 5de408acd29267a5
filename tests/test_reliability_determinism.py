"""Issue 7, part 5: determinism.

The same model, calibration data and seed compiled twice for onnxruntime-int8 gives a byte-identical
model.onnx, identical scales (qparams.safetensors) and plan.json; report.json differs only in the pass
timings. "Twice" is tried both ways a build can differ: twice in one process (global counters, caches)
and in another process with a different PYTHONHASHSEED and torch thread count (set and dict ordering,
ids, temp paths, reduction order).

100 repeated inferences of each compiled model give bit-identical outputs (torch, onnxruntime-int8 and
openvino-int8 on the CNN; onnxruntime-int8 on BERT), and so does the model reloaded from its artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import lowbit

from helpers import one_torch_thread
from models import SmallResNet, bert_batch, randomize_bn, tiny_bert

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 100
IDENTICAL = ("model.onnx", "plan.json", "qparams.safetensors")


def build_cnn(target: str = "onnxruntime-int8"):
    """The CNN with the default config (SmoothQuant's search, the automatic plan). The second process
    imports this module and runs the same function."""
    torch.manual_seed(0)
    model = randomize_bn(SmallResNet(width=8))
    g = torch.Generator().manual_seed(1)
    cal = [(torch.randn(4, 1, 16, 16, generator=g),) for _ in range(3)]
    return model, lowbit.compile(model, cal[0], target=target, calibration=cal, progress=False)


def build_bert(target: str = "onnxruntime-int8"):
    """BERT with fused attention, plain W8A8 (SmoothQuant's search on BERT would triple this suite's time)."""
    model = tiny_bert(seed=0)
    cal = [bert_batch(2, 8, i) for i in range(1, 3)]
    cfg = lowbit.QuantConfig(smoothquant=False, target_sqnr_db=None)
    return model, lowbit.compile(model, bert_batch(2, 8, 0), target=target, calibration=cal, config=cfg,
                                 dynamic_shapes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}},
                                 progress=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def report_without_timings(d: Path) -> Any:
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "seconds"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(json.loads((d / "report.json").read_text()))


def assert_same_build(a: Path, b: Path) -> int:
    """Every hashed file byte-identical, manifest.json included (the pass timings live in timings.json and the page
    report.html, which the manifest does not hash). Returns the scale count."""
    da, db = digests(a), digests(b)
    for name in IDENTICAL:
        assert da[name] == db[name], f"{name} differs between two compiles ({a} vs {b})"
    assert report_without_timings(a) == report_without_timings(b)
    assert "timings.json" in da and "timings.json" not in json.loads((a / "manifest.json").read_text())["files"]
    differ = sorted(k for k in da if k not in ("timings.json", "report.html") and da[k] != db.get(k))
    assert not differ, f"{differ} differ between two builds ({a} vs {b})"
    qa, qb = load_file(str(a / "qparams.safetensors")), load_file(str(b / "qparams.safetensors"))
    assert qa.keys() == qb.keys() and all(torch.equal(qa[k], qb[k]) for k in qa)
    return sum(1 for k in qa if k.endswith("scale"))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """CNN twice in this process, BERT once; both again in a second process with another hash seed."""
    d = tmp_path_factory.mktemp("builds")
    cnn, q = build_cnn()
    q.save(d / "cnn_a")
    _, q2 = build_cnn()
    q2.save(d / "cnn_b")
    bert, qb = build_bert()
    qb.save(d / "bert_a")
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_reliability_determinism import build_bert, build_cnn\n"
              f"build_cnn()[1].save({str(d / 'cnn_c')!r})\nbuild_bert()[1].save({str(d / 'bert_c')!r})\n")
    # its torch runs on the default thread count (this process: one): the bytes must not depend on it either
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=300, capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": seed})
    assert done.returncode == 0, done.stderr[-3000:]
    return {"dir": d, "cnn": (cnn, q), "bert": (bert, qb), "hash_seed": seed}


def test_compiling_twice_gives_byte_identical_models_and_scales(builds):
    d = builds["dir"]
    n_cnn = assert_same_build(d / "cnn_a", d / "cnn_b")  # twice in one process
    n_cnn2 = assert_same_build(d / "cnn_a", d / "cnn_c")  # in another process, another hash seed
    n_bert = assert_same_build(d / "bert_a", d / "bert_c")
    print(f"\n[determinism] onnxruntime-int8: model.onnx, plan.json, qparams.safetensors byte-identical: CNN "
          f"twice in-process and across processes (PYTHONHASHSEED={builds['hash_seed']}), BERT across processes; "
          f"identical scales: CNN {n_cnn}/{n_cnn2}, BERT {n_bert}; model.onnx sha256 "
          f"{digests(d / 'cnn_a')['model.onnx'][:12]} (CNN), {digests(d / 'bert_a')['model.onnx'][:12]} (BERT)")
    assert n_cnn > 0 and n_bert > 0


def repeat_identical(q: lowbit.CompiledModel, *args: Any, **kwargs: Any) -> torch.Tensor:
    first = q(*args, **kwargs)
    first = first[0] if isinstance(first, tuple) else first
    for i in range(REPEATS - 1):
        out = q(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.equal(out, first), f"inference {i + 2} of {REPEATS} differs from the first"
    return first


def test_repeated_inference_is_bit_identical(builds):
    d = builds["dir"]
    _, q_cnn = builds["cnn"]
    _, q_bert = builds["bert"]
    cnn, q_torch = build_cnn("torch")
    _, q_ov = build_cnn("openvino-int8")
    x = torch.randn(5, 1, 16, 16)
    b = bert_batch(3, 11, 4)
    ran = []
    for name, q in (("torch", q_torch), ("onnxruntime-int8", q_cnn), ("openvino-int8", q_ov)):
        out = repeat_identical(q, x)
        ran.append(f"CNN {name}")
        if name != "torch":
            assert torch.equal(lowbit.load(q.save(d / f"reload_{name}"))(x), out), f"{name}: the reloaded model differs"
    out = repeat_identical(q_bert, **b)
    assert torch.equal(lowbit.load(d / "bert_a")(**b)[0], out)
    ran.append("BERT onnxruntime-int8")
    print(f"\n[determinism] {REPEATS} repeated inferences bit-identical: {', '.join(ran)}; reloaded artifacts give "
          "the same outputs")
