"""The ONNX QDQ targets on each installed engine: fidelity, the int8 proof, graph shape, artifacts, errors.

Bounds: SQNR vs FP32 >= 30 dB (CNN) / 25 dB (BERT), as for the torch reference; >= 90% of the quantized
layers' multiply-accumulates in integer kernels (issue 3); the engine within 30 dB of the torch oracle
(integer rounding and OpenVINO's bf16 attention differ from fake-quant float math).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.runtime.qparams import sqnr

from models import bert_batch, cnn_cal

BERT_DYN = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
ENGINES = [
    pytest.param("onnxruntime-int8", marks=pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")),
    pytest.param("openvino-int8", marks=pytest.mark.skipif(
        importlib.util.find_spec("openvino") is None, reason="openvino is not installed (extra 'openvino')")),
]


@pytest.fixture(scope="module", params=ENGINES)
def compiled(request, cnn, bert):
    target = request.param
    qc = lowbit.compile(cnn, cnn_cal(1)[0], target=target, calibration=cnn_cal(), progress=False)
    cal = [bert_batch(4, 16, i) for i in range(1, 6)]
    qb = lowbit.compile(bert, bert_batch(2, 16, 0), target=target, calibration=cal, dynamic_shapes=BERT_DYN,
                        progress=False)
    return target, qc, qb


def test_fidelity_with_dynamic_dims(cnn, bert, compiled):
    _, qc, qb = compiled
    for batch in (1, 5):
        x = torch.randn(batch, 1, 16, 16)
        assert sqnr(cnn(x), qc(x)) >= 30.0
    for batch, seq in ((1, 8), (3, 21)):
        b = bert_batch(batch, seq, batch + seq)
        assert sqnr(bert(**b).last_hidden_state, qb(**b)[0]) >= 25.0


def test_at_least_90_percent_of_quantized_macs_run_int8(compiled):
    target, qc, qb = compiled
    for q in (qc, qb):
        engine = q.report.sections["engine"]
        assert engine["int8_share"] >= 0.90, engine["layers"]
        assert "integer kernels" in str(q.report)
    kernels = {v["kernel"] for v in qb.report.sections["engine"]["layers"].values()}
    if target == "onnxruntime-int8":
        assert kernels == {"MatMulIntegerToFloat"}
        assert {v["kernel"] for v in qc.report.sections["engine"]["layers"].values()} >= {"QLinearConv"}
    else:
        assert all(k.startswith("FullyConnected:") and k.endswith("_I8") for k in kernels), kernels  # oneDNN int8


def test_engine_agrees_with_the_torch_oracle_layer_by_layer(bert, compiled):
    target, _, qb = compiled
    cal = [bert_batch(4, 16, i) for i in range(1, 6)]
    ref = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False,
                         )
    rep = lowbit.compare_layers(ref, qb, **bert_batch(2, 12, 3))
    assert len(rep.rows) == 13 and "SQNR" in str(rep)
    assert min(r["sqnr_db"] for r in rep.rows) >= 30.0
    if target == "onnxruntime-int8":
        # integer kernels compute what the fake-quant graph computes; only ORT's fused SkipLayerNormalization
        # rounds its float math differently from torch's LayerNorm, so an activation that sits on a rounding
        # boundary may land one int8 step away (one such flip: ~55-65 dB for the layer, not 30)
        assert min(r["sqnr_db"] for r in rep.rows) >= 50.0


def test_graph_shape(compiled, tmp_path):
    target, qc, qb = compiled
    for q, name in ((qc, "cnn"), (qb, "bert")):
        d = q.save(tmp_path / name)
        model = onnx.load(str(d / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 17
        section = q.report.sections["onnx_export"]
        assert section["problems"] == [] and section["qdq_placement_problems"] == 0
        consumers = {}
        for n in model.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        inits = {t.name for t in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        requant = [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"
                   and getattr(producers.get(n.input[0]), "op_type", None) == "DequantizeLinear"]
        assert requant == [], f"{name}: a quantized value quantized again: {requant}"
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear":
                users = consumers.get(n.output[0], [])
                assert len(users) == 1, f"{n.name} feeds {len(users)} nodes: a DQ per consumer"
                if n.input[0] in inits:  # weights feed the MatMul/Conv directly, no Transpose between
                    assert users[0].op_type in ("MatMul", "Conv", "Gemm")
    bert_model = onnx.load(str(tmp_path / "bert" / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in bert_model.graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    ops = [n.op_type for n in bert_model.graph.node]
    if target == "onnxruntime-int8":  # every linear is one MatMulIntegerToFloat that adds its own bias
        fused = {n.output[0] for n in bert_model.graph.node if n.op_type == "MatMulIntegerToFloat"}
        assert len(fused) == 13 and "MatMul" not in ops
        inits = {t.name for t in bert_model.graph.initializer}
        left = [n.name for n in bert_model.graph.node
                if n.op_type == "Add" and set(n.input) & fused and set(n.input) & inits]
        assert left == [], f"bias Adds left outside MatMulIntegerToFloat: {left}"
        assert qb.report.sections["onnx_export"]["bias_fused"] >= 12  # the pooler's all-zero bias is gone
    else:  # standard ops only: OpenVINO runs no contrib op
        assert "MatMul" in ops and all(o.domain in ("", "ai.onnx") for o in bert_model.opset_import)


def test_artifact_reloads_without_the_compiler(compiled, tmp_path):
    target, _, qb = compiled
    d = qb.save(tmp_path / "bert")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["target"] == target and manifest["opset"] >= 17 and manifest["lowbit_version"]
    assert set(manifest["files"]) == {"model.onnx", "plan.json", "qparams.safetensors", "report.json"}
    assert manifest["dynamic_dims"] == {"input_ids": {"0": "batch", "1": "seq"},
                                        "attention_mask": {"0": "batch", "1": "seq"}}
    b = bert_batch(2, 9, 4)
    save_file(b, str(tmp_path / "inputs.safetensors"))
    script = (
        "import sys, lowbit\n"
        "from safetensors.torch import load_file, save_file\n"
        f"m = lowbit.load({str(d)!r})\n"
        f"b = load_file({str(tmp_path / 'inputs.safetensors')!r})\n"
        f"save_file({{'out': m(**b)[0]}}, {str(tmp_path / 'out.safetensors')!r})\n"
        "bad = [k for k in sys.modules if k.startswith(('lowbit.compiler', 'lowbit.passes', 'lowbit.backends'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["out"], qb(**b)[0])


def test_artifact_qparams_hold_no_weight_copies_and_reapply_exactly(bert, compiled, tmp_path):
    """qparams.safetensors keeps scales and zero points only (the int8 weights are in model.onnx, once);
    re-applying them to the float model recomputes the same codes: the same graph, bit for bit."""
    from lowbit.compiler.pipeline import compile_model

    _, _, qb = compiled
    d = qb.save(tmp_path / "bert")
    stored = load_file(str(d / "qparams.safetensors"))
    assert stored and not [k for k in stored if k.endswith(".weight.q")]
    assert {k for k in qb.state["qparams"] if k.endswith(".weight.q")}  # what the compile had
    kw = {"calibration": [bert_batch(4, 16, i) for i in range(1, 6)], "dynamic_shapes": BERT_DYN,
          "progress": False, "plan": qb.plan}
    fresh = compile_model(bert, bert_batch(2, 16, 0), **kw)
    reapplied = compile_model(bert, bert_batch(2, 16, 0), qparams=stored, **kw)
    b = bert_batch(2, 9, 4)
    assert torch.equal(reapplied(**b)[0], fresh(**b)[0])
    for name, t in fresh.graph_module.state_dict().items():
        assert torch.equal(reapplied.graph_module.state_dict()[name], t), name
    # the int8 embedding tables are the ones the qparams list (with their row scales), no others
    tables = [k for k in stored if k.endswith(".row_scale")]
    assert tables
    without = compile_model(bert, bert_batch(2, 16, 0), qparams={k: v for k, v in stored.items() if k not in tables},
                            **kw)
    assert "embeddings" not in without.report.sections


@pytest.mark.parametrize("damage", ["missing", "altered", "manifest"])
def test_damaged_onnx_artifacts_are_refused(compiled, tmp_path, damage):
    _, qc, _ = compiled
    d = qc.save(tmp_path / "cnn")
    if damage == "missing":
        (d / "model.onnx").unlink()
    elif damage == "altered":
        data = bytearray((d / "model.onnx").read_bytes())
        data[-10] ^= 0xFF
        (d / "model.onnx").write_bytes(bytes(data))
    else:
        m = json.loads((d / "manifest.json").read_text())
        m["opset"] = 13
        (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(lowbit.ArtifactError):
        lowbit.load(d)


def test_numpy_inputs_and_wrong_inputs(compiled):
    _, qc, _ = compiled
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(qc(x.numpy()), qc(x))
    with pytest.raises(lowbit.InputError, match="input 'x'"):
        qc(torch.randn(2, 1, 15, 16))
    with pytest.raises(lowbit.InputError, match="dtype int64"):
        qc(torch.ones(2, 1, 16, 16, dtype=torch.int64))


def test_openvino_runs_residual_blocks_as_int8_convs(compiled):
    """Both ONNX targets quantize conv outputs and residual adds (in and out). OpenVINO fuses each add and
    its ReLU into the conv before it: no add runs as a node of its own, and every conv writes int8."""
    target, qc, _ = compiled
    stats = next(p["stats"] for p in qc.report.passes if p["pass"] == "insert_observers")
    assert stats["residual_adds_quantized"] == 2  # one per residual block of SmallResNet
    if target == "onnxruntime-int8":
        return  # DQ, DQ -> Add (-> Relu) -> Q: QLinearAdd (tests/test_qdq_mobilenet.py checks the kernels)
    runner = qc.state["runner"]
    fused = 0
    for op in runner.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if any(n.startswith("node_add") for n in names.split(",")):
            assert kind == "Convolution", f"{names} runs as {kind}"
            fused += 1
        if kind == "Convolution":
            assert info["runtimePrecision"].astype(str) in ("u8", "i8")
    assert fused == 2


def test_outputs_stay_valid_after_the_next_call(compiled):
    """Outputs are copied out of the engine's buffers: a later call (same shape, the static engine on
    openvino-int8; another shape, the dynamic one) leaves earlier results untouched."""
    _, qc, _ = compiled
    x1, x2, x3 = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), torch.randn(3, 1, 16, 16)
    first = qc(x1)
    kept = first.clone()
    qc(x2)
    qc(x3)
    assert torch.equal(first, kept) and torch.equal(qc(x1), kept)


def test_missing_engine_names_the_extra(monkeypatch, cnn):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(lowbit.BackendNotAvailable, match=r'pip install "lowbit\[openvino\]"'):
        lowbit.compile(cnn, cnn_cal(1)[0], target="openvino-int8", calibration=cnn_cal(1))


@torch.library.custom_op("lowbit_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone() * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_op_without_onnx_translation_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.ops.lowbit_test.mystery(self.fc(x))

    m = Odd().eval()
    x = torch.randn(2, 4)
    with pytest.raises(lowbit.LowbitError, match=r"lowbit_test.mystery.*node 'mystery'"):
        lowbit.compile(m, (x,), target="onnxruntime-int8", calibration=[(x,)], progress=False)


def test_thread_count_is_configurable(cnn):
    q = lowbit.compile(cnn, cnn_cal(1)[0], target="onnxruntime-int8", calibration=cnn_cal(2), threads=1,
                       progress=False)
    assert q.state["runner"].session.get_session_options().intra_op_num_threads == 1


def test_openvino_runs_attention_scores_in_int8(bert, compiled):
    """openvino-int8 quantizes the query and key projections' outputs (int8, per tensor), so OpenVINO's
    fused MHA computes Q K^T as an int8 matmul; ONNX Runtime's Attention op would not use them."""
    target, _, qb = compiled
    outputs = {k: v["output"] for k, v in qb.plan["layers"].items() if v["output"] is not None}
    if target == "onnxruntime-int8":
        assert outputs == {}
        return
    assert set(outputs) == {f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key")}
    assert all(o["dtype"] == "int8" and o["symmetric"] and o["granularity"] == "per_tensor" for o in outputs.values())
    kernels = qb.report.sections["engine"]["attention_kernels"]
    assert kernels and all(k.endswith(":i8") for k in kernels), kernels
    assert "attention kernels compute Q K^T in int8" in str(qb.report)
    ops = [n.op_type for n in onnx.load(str(qb.state["model_dir"] / "model.onnx")).graph.node]
    assert ops.count("Softmax") == 2 and "Attention" not in ops
    cal = [bert_batch(4, 16, i) for i in range(1, 6)]
    off = lowbit.compile(bert, bert_batch(2, 16, 0), target=target, calibration=cal, dynamic_shapes=BERT_DYN,
                         progress=False, quantize_attention_scores=False)
    assert all(v["output"] is None for v in off.plan["layers"].values())
    assert not any(k.endswith(":i8") for k in off.report.sections["engine"]["attention_kernels"])
    b = bert_batch(2, 16, 7)
    ref = bert(**b).last_hidden_state
    assert sqnr(ref, qb(**b)[0]) >= sqnr(ref, off(**b)[0]) - 1.0  # int8 scores cost < 1 dB here


def test_exporter_registry_is_built_once_and_exports_the_same_model(cnn):
    """export.py builds torch.onnx's torchlib registry once per opset (~1 s per export otherwise): the ONNX is
    byte-identical to the exporter's own, a custom translation stays in its export's copy, and the class is
    restored after."""
    from torch.onnx._internal.exporter import _registration

    from lowbit.backends.onnx import export as ex
    from lowbit.backends.onnx.weight_only import TRANSLATIONS

    x = cnn_cal(1)[0][0]

    def export() -> bytes:
        return torch.onnx.export(cnn, (x,), dynamo=True, optimize=False, verbose=False, report=False,
                                 opset_version=ex.OPSET,
                                 custom_translation_table=TRANSLATIONS).model_proto.SerializeToString()

    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    plain = export()
    with ex._torchlib_registry_built_once():
        first = export()
        built = dict(ex._REGISTRIES)
        second = export()
    assert first == plain and second == plain
    assert built and all(ex._REGISTRIES[k] is v for k, v in built.items())  # not rebuilt by the second export
    custom = {op.name() for op in TRANSLATIONS}
    assert not custom & {k for r in built.values() for k in r.functions if isinstance(k, str)}
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed (extra 'openvino')")
def test_openvino_strided_pointwise_conv_gets_its_padding_as_a_pad_of_the_quantized_input(monkeypatch):
    """OpenVINO 2026.4 returns [3, 16, 10, 12] for a quantized 1x1 conv (stride 2, pads 1) on [3, 8, 12, 15]
    (ov_rules): with the padding moved onto the quantized input the shape is right and the numbers are the torch
    reference's (SQNR >= 35 dB; ONNX Runtime's integer convs reach 38.7 dB against it); without the rule, compile refuses the engine with an EngineError naming the output
    and both shapes instead of a figure computed from it. When this OpenVINO defect is fixed, the second half fails:
    remove the rule."""
    from lowbit.backends.onnx.backend import OpenVinoBackend

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1, padding=1)).eval()
    x = torch.randn(3, 8, 12, 15)
    cal = [(torch.randn(3, 8, 12, 15),) for _ in range(4)]
    ref = lowbit.compile(m, (x,), target="torch", calibration=cal, progress=False)
    ov = lowbit.compile(m, (x,), target="openvino-int8", calibration=cal, progress=False)
    assert ov.report.sections["onnx_export"]["pad_strided_pointwise_convs"] == 1  # the stride-1 conv keeps its pads
    assert ov(x).shape == m(x).shape == (3, 16, 9, 11)
    assert sqnr(ref(x), ov(x)) >= 35.0

    monkeypatch.setattr(OpenVinoBackend, "engine_rules", lambda self, model, options=None: {})
    with pytest.raises(lowbit.EngineError, match=r"output 0: the engine returned shape \(3, 16, 10, 12\) where the "
                                                 r"float model gives \(3, 16, 9, 11\)"):
        lowbit.compile(m, (x,), target="openvino-int8", calibration=cal, progress=False)


class _MaskedHead(nn.Module):
    """What a decoder's step graph holds that the exporter would re-trace for: ``a & b`` and ``Tensor.to``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = (mask > 0) & (x.sum(-1) > -100.0)
        y = self.fc(x).to(torch.float32) * keep.unsqueeze(-1).to(x.dtype)
        return y + x.to(torch.float64).sum(-1, keepdim=True).to(torch.float32) + mask.to(x.dtype).unsqueeze(-1)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
@pytest.mark.parametrize("model", ["masked", "cnn"])
def test_the_exporter_retraces_only_a_program_that_needs_decomposing(model, cnn, monkeypatch):
    """export.py writes `a & b` and `Tensor.to` as the ops the exporter's decomposition makes of them and skips
    its re-trace when every op has an ONNX function (the masked model); the CNN's adaptive_avg_pool2d still gets
    decomposed. Either way the engine's outputs equal, bit for bit, those of the exporter's own path."""
    from contextlib import nullcontext

    from lowbit.backends.onnx import export as ex

    torch.manual_seed(0)
    if model == "cnn":
        net, example, cal, dyn = cnn, cnn_cal(1)[0], cnn_cal(), None
    else:
        net = _MaskedHead().eval()
        x, mask = torch.randn(3, 5, 16), (torch.arange(15).reshape(3, 5) % 4 > 0).long()
        net, example, cal, dyn = net, (x, mask), [(torch.randn(3, 5, 16), mask)], {"x": {1: "seq"}, "mask": {1: "seq"}}
    decompositions = []
    real = torch.export.ExportedProgram.run_decompositions

    def counting(self, *a, **k):
        decompositions.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counting)
    compile_ = lambda: lowbit.compile(net, example, target="onnxruntime-int8", calibration=cal,  # noqa: E731
                                      dynamic_shapes=dyn, progress=False)
    fast = compile_()
    assert len(decompositions) == (1 if model == "cnn" else 0)
    monkeypatch.setattr(ex, "_decompose_only_when_needed", nullcontext)
    monkeypatch.setattr(ex, "_exact_aliases", lambda gm: None)
    plain = compile_()
    assert len(decompositions) == (2 if model == "cnn" else 1)
    inputs = example if isinstance(example, tuple) else (example,)
    for a, b in zip(fast(*inputs), plain(*inputs), strict=True):
        assert torch.equal(a, b)
