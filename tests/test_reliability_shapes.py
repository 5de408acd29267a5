"""Issue 7, part 6: dynamic shapes.

The CNN is compiled with a declared dynamic batch in [1, 16]; BERT with batch in [1, 4] and sequence
length in [2, 32] (torch.export Dims). On every target, the declared minimum, the maximum and 10 seeded
random sizes in between run within tolerance:

- SQNR against the FP32 model >= 30 dB (CNN) / 25 dB (BERT), the floors of the end-to-end tests;
- SQNR against the torch target (the fake-quant oracle) >= 35 dB for the targets that share its qparams
  (onnxruntime-int8, openvino-int8, triton). tensorrt-int8 quantizes activations symmetrically (its
  Q/DQ take zero point 0), so it has its own qparams: only the FP32 floor applies to it.

A size outside the range (one above each maximum, one below each minimum) is refused before anything
runs with an InputError naming the input, the dim, its symbol and the declared range; also after the
artifact is saved and reloaded.

target="torch" with compile=True (inductor) compiles one static graph per input shape, ~3.5 s each on
two cores: it runs the CNN at the declared minimum and maximum only, not the 10 random sizes.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import torch
from torch.export import Dim

import lowbit
from lowbit.backends.registry import TARGETS
from lowbit.runtime.qparams import sqnr

from helpers import capture_cache, one_torch_thread
from models import SmallResNet, bert_batch, randomize_bn, tiny_bert

CNN_BATCH = (1, 16)
BERT_BATCH, BERT_SEQ = (1, 4), (2, 32)
RANDOM_SIZES = 10
FP32_FLOOR_DB = {"cnn": 30.0, "bert": 25.0}
ORACLE_FLOOR_DB = 35.0
#: target -> compile options; tensorrt-int8 runs its export on ONNX Runtime CPU (no GPU here)
OPTIONS: dict[str, dict[str, Any]] = {"torch": {}, "onnxruntime-int8": {}, "openvino-int8": {}, "triton": {}}
if "tensorrt-int8" in TARGETS:
    OPTIONS["tensorrt-int8"] = {"export_only": True}
SAME_QPARAMS = {"onnxruntime-int8", "openvino-int8", "triton"}
# BERT without SmoothQuant's search and the automatic plan: 5 targets x 13 s would be most of this
# suite; the plain W8A8 pipeline exercises the same dynamic-shape machinery
BERT_CONFIG = lowbit.QuantConfig(smoothquant=False, target_sqnr_db=None)
FIGURES: list[str] = []


def cnn_dynamic() -> dict[str, Any]:
    return {"x": {0: Dim("batch", min=CNN_BATCH[0], max=CNN_BATCH[1])}}


def bert_dynamic() -> dict[str, Any]:
    b, s = Dim("batch", min=BERT_BATCH[0], max=BERT_BATCH[1]), Dim("seq", min=BERT_SEQ[0], max=BERT_SEQ[1])
    return {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}


def cnn_sizes() -> list[int]:
    rng = random.Random(11)
    return [CNN_BATCH[0], CNN_BATCH[1]] + [rng.randint(CNN_BATCH[0] + 1, CNN_BATCH[1] - 1) for _ in range(RANDOM_SIZES)]


def bert_sizes() -> list[tuple[int, int]]:
    rng = random.Random(12)
    rand = [(rng.randint(*BERT_BATCH), rng.randint(BERT_SEQ[0] + 1, BERT_SEQ[1] - 1)) for _ in range(RANDOM_SIZES)]
    return [(BERT_BATCH[0], BERT_SEQ[0]), (BERT_BATCH[1], BERT_SEQ[1])] + rand


def cnn_input(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(batch))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return randomize_bn(SmallResNet()), tiny_bert()


@pytest.fixture(scope="module")
def capture_once():
    with capture_cache(), one_torch_thread():  # torch.export once per model: its graph does not depend on the target
        yield


def compile_pair(models, target: str, **options: Any):
    cnn, bert = models
    g = torch.Generator().manual_seed(1)
    cal = [(torch.randn(8, 1, 16, 16, generator=g),) for _ in range(4)]
    qc = lowbit.compile(cnn, cal[0], target=target, calibration=cal, dynamic_shapes=cnn_dynamic(), progress=False,
                        **options)
    if options.get("compile"):
        return qc, None
    bcal = [bert_batch(4, 16, i) for i in range(1, 5)]
    qb = lowbit.compile(bert, bert_batch(2, 16, 0), target=target, calibration=bcal, config=BERT_CONFIG,
                        dynamic_shapes=bert_dynamic(), progress=False, **options)
    return qc, qb


@pytest.fixture(scope="module")
def oracle(models, capture_once):
    return compile_pair(models, "torch")


@pytest.fixture(scope="module", params=list(OPTIONS))
def compiled(request, models, oracle, capture_once):
    target = request.param
    if target == "torch":
        return target, oracle
    return target, compile_pair(models, target, **OPTIONS[target])


def test_every_size_in_the_declared_range_runs_within_tolerance(models, oracle, compiled):
    cnn, bert = models
    target, (qc, qb) = compiled
    oc, ob = oracle
    t0 = time.perf_counter()
    worst = {"cnn": [99.0, 99.0], "bert": [99.0, 99.0]}
    for batch in cnn_sizes():
        x = cnn_input(batch)
        out = qc(x)
        assert out.shape == (batch, 10)
        db = sqnr(cnn(x), out)
        assert db >= FP32_FLOOR_DB["cnn"], f"CNN {target} batch {batch}: {db:.1f} dB vs FP32"
        worst["cnn"][0] = min(worst["cnn"][0], db)
        if target in SAME_QPARAMS:
            db = sqnr(oc(x), out)
            assert db >= ORACLE_FLOOR_DB, f"CNN {target} batch {batch}: {db:.1f} dB vs the torch target"
            worst["cnn"][1] = min(worst["cnn"][1], db)
    for batch, seq in bert_sizes():
        b = bert_batch(batch, seq, 100 + seq)
        out = qb(**b)[0]
        assert out.shape == (batch, seq, 64)
        db = sqnr(bert(**b).last_hidden_state, out)
        assert db >= FP32_FLOOR_DB["bert"], f"BERT {target} {batch}x{seq}: {db:.1f} dB vs FP32"
        worst["bert"][0] = min(worst["bert"][0], db)
        if target in SAME_QPARAMS:
            db = sqnr(ob(**b)[0], out)
            assert db >= ORACLE_FLOOR_DB, f"BERT {target} {batch}x{seq}: {db:.1f} dB vs the torch target"
            worst["bert"][1] = min(worst["bert"][1], db)
    oracle_text = {m: f", vs torch >= {v[1]:.1f} dB" if target in SAME_QPARAMS else "" for m, v in worst.items()}
    FIGURES.append(f"{target}: CNN {len(cnn_sizes())} batch sizes in {list(CNN_BATCH)}, SQNR vs FP32 >= "
                   f"{worst['cnn'][0]:.1f} dB{oracle_text['cnn']}; BERT {len(bert_sizes())} (batch, seq) in "
                   f"{list(BERT_BATCH)} x {list(BERT_SEQ)}, vs FP32 >= {worst['bert'][0]:.1f} dB{oracle_text['bert']}; "
                   f"{time.perf_counter() - t0:.1f} s")
    print(f"\n[shapes] {FIGURES[-1]}")


OUT_OF_RANGE = [
    ("cnn", lambda: (cnn_input(CNN_BATCH[1] + 1),), r"input 'x' dim 0 \(batch\) is 17, outside .*batch in \[1, 16\]"),
    ("cnn", lambda: (torch.randn(0, 1, 16, 16),), r"input 'x' dim 0 \(batch\) is 0, outside .*batch in \[1, 16\]"),
    ("bert", lambda: bert_batch(BERT_BATCH[1] + 1, 8, 0),
     r"input 'input_ids' dim 0 \(batch\) is 5, outside .*batch in \[1, 4\]"),
    ("bert", lambda: bert_batch(2, BERT_SEQ[1] + 1, 0), r"input 'input_ids' dim 1 \(seq\) is 33, outside .*seq in \[2, 32\]"),
    ("bert", lambda: bert_batch(2, BERT_SEQ[0] - 1, 0), r"input 'input_ids' dim 1 \(seq\) is 1, outside .*seq in \[2, 32\]"),
]


def call(q: lowbit.CompiledModel, inputs: Any) -> Any:
    return q(**inputs) if isinstance(inputs, dict) else q(*inputs)


def test_sizes_outside_the_range_name_the_constraint(compiled, tmp_path):
    target, (qc, qb) = compiled
    reloaded = {}
    if target != "torch":  # ONNX, graph and TensorRT artifacts reload without the model
        reloaded = {"cnn": lowbit.load(qc.save(tmp_path / "cnn")), "bert": lowbit.load(qb.save(tmp_path / "bert"))}
    refused = 0
    for name, make, message in OUT_OF_RANGE:
        for q in [{"cnn": qc, "bert": qb}[name]] + ([reloaded[name]] if reloaded else []):
            with pytest.raises(lowbit.InputError, match=message):
                call(q, make())
            refused += 1
    print(f"\n[shapes] {target}: out-of-range sizes refused with InputError naming the input, dim and range: "
          f"{refused}/{refused}" + (" (compiled and reloaded)" if reloaded else ""))


def test_torch_compile_runs_the_declared_minimum_and_maximum(models, capture_once):
    cnn, _ = models
    qc, _ = compile_pair(models, "torch", compile=True)
    t0 = time.perf_counter()
    dbs = []
    for batch in CNN_BATCH:  # each new shape is a new inductor graph
        x = cnn_input(batch)
        dbs.append(sqnr(cnn(x), qc(x)))
        assert dbs[-1] >= FP32_FLOOR_DB["cnn"], f"CNN torch compile=True batch {batch}: {dbs[-1]:.1f} dB"
    with pytest.raises(lowbit.InputError, match=OUT_OF_RANGE[0][2]):
        qc(cnn_input(CNN_BATCH[1] + 1))
    print(f"\n[shapes] torch compile=True: CNN batch {CNN_BATCH[0]} and {CNN_BATCH[1]}, SQNR vs FP32 "
          f"{', '.join(f'{d:.1f}' for d in dbs)} dB; batch 17 refused; {time.perf_counter() - t0:.1f} s")


def test_checked_calls_are_remembered_per_shape_never_past_a_bad_input():
    """Signature.flatten_call remembers the (dtype, shape) of calls it accepted, so a repeat skips the
    checks; any other dtype or shape is checked in full again (and refused when wrong)."""
    from lowbit.errors import InputError
    from lowbit.runtime.signature import Signature, TensorSig

    sig = Signature([TensorSig("ids", "int64", ("batch", "seq")), TensorSig("mask", "int64", ("batch", "seq"))],
                    keywords=["ids", "mask"], num_positional=0, outputs=["output_0"],
                    dim_bounds={"seq": (1, 16)})
    ok = {"ids": torch.ones(2, 8, dtype=torch.long), "mask": torch.ones(2, 8, dtype=torch.long)}
    for _ in range(2):
        assert [t.shape for t in sig.flatten_call((), ok)] == [(2, 8), (2, 8)]
    assert len(sig._accepted) == 1
    bad = [
        ({"ids": torch.ones(2, 8, dtype=torch.int32), "mask": ok["mask"]}, "dtype int32"),
        ({"ids": torch.ones(2, 8, dtype=torch.long), "mask": torch.ones(2, 9, dtype=torch.long)}, "dim 'seq'"),
        ({"ids": torch.ones(2, 17, dtype=torch.long), "mask": torch.ones(2, 17, dtype=torch.long)}, "outside"),
        ({"ids": ok["ids"], "other": ok["mask"]}, "missing \\['mask'\\]"),
    ]
    for inputs, match in bad:
        with pytest.raises(InputError, match=match):
            sig.flatten_call((), inputs)
    assert len(sig._accepted) == 1
    fsig = Signature([TensorSig("x", "float32", ("batch", 4))], keywords=None, num_positional=1,
                     outputs=["output_0"])
    x = torch.ones(3, 4)
    fsig.flatten_call((x,), {}, check_finite=True)
    fsig.flatten_call((x,), {})
    with pytest.raises(InputError, match="contains NaN"):  # a finiteness check is never skipped
        fsig.flatten_call((torch.full((3, 4), float("nan")),), {}, check_finite=True)
