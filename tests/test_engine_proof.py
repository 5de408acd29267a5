"""The int8 proof reads what the engine executes (issue 19).

A MobileNet-style net compiled with one layer forced float (``b1.expand.0``) and one quantized layer whose
Q/DQ pattern no engine turns into an integer kernel (the stem conv as w8a16: int8 weights behind a
DequantizeLinear, reading the model's float input) must be reported as such on each CPU engine: the float
layer and the weight-only layer int8 False with the engine's float kernel (``Conv``; OpenVINO's
``Convolution:brgconv_..._bf16``), the depthwise and 1x1 convs int8 True, and the int8 share below 1 by at
least the weight-only layer's MACs. Each report is then checked against the engine's own per-node profile
(OpenVINO's perf counters, ONNX Runtime's profiler), which the report does not read.

(A w8a16 layer behind a quantized residual add is not such a layer on OpenVINO: the add's int8 output
reaches the conv, and OpenVINO runs it as an I8 convolution -- which the report then says.)
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import lowbit
from lowbit.config import QuantConfig
from lowbit.runtime.engines import OpenVinoRunner, int8_share, mac_nodes

from helpers import needs_engine
from models import TinyMobileNet, randomize_bn

FLOAT_LAYER, WEIGHT_ONLY, DEPTHWISE, POINTWISE = "b1.expand.0", "stem.0", "b1.dw.0", "b1.project.0"
CONFIG = QuantConfig(overrides={FLOAT_LAYER: "skip", WEIGHT_ONLY: "w8a16"}, target_sqnr_db=None)


def _batches(n: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module", params=["onnxruntime-int8", "openvino-int8"])
def compiled(request):
    needs_engine(request.param)
    torch.manual_seed(0)
    model = randomize_bn(TinyMobileNet())
    cal = _batches(3)
    return request.param, lowbit.compile(model, cal[0], target=request.param, calibration=cal, config=CONFIG,
                                         progress=False)


def test_float_and_unfused_layers_read_float_and_the_rest_int8(compiled):
    target, q = compiled
    engine = q.report.sections["engine"]
    layers, floats = engine["layers"], engine.get("float_layers", {})
    assert FLOAT_LAYER not in layers and set(floats) == {FLOAT_LAYER}, floats
    float_kernels = {"onnxruntime-int8": ("Conv", "FusedConv"), "openvino-int8": None}[target]
    for name, entry in ((FLOAT_LAYER, floats[FLOAT_LAYER]), (WEIGHT_ONLY, layers[WEIGHT_ONLY])):
        assert entry["int8"] is False, (name, entry)
        if float_kernels is not None:
            assert entry["kernel"] in float_kernels, (name, entry)
        else:  # oneDNN's primitive, e.g. Convolution:brgconv_avx512_1x1_bf16
            assert entry["kernel"].startswith("Convolution:") and entry["precision"] in ("bf16", "f32"), entry
            assert entry["kernel"].lower().endswith(entry["precision"]), entry
    for name in (DEPTHWISE, POINTWISE, "b2.dw.0", "b2.expand.0"):
        entry = layers[name]
        assert entry["int8"] is True, (name, entry)
        if target == "onnxruntime-int8":
            assert entry["kernel"] == "QLinearConv", (name, entry)
        else:
            assert entry["kernel"].startswith("Convolution:") and entry["kernel"].endswith("_I8"), (name, entry)
    rows = {r["layer"]: r for r in q.report.layers}
    assert rows[FLOAT_LAYER]["int8"] is False and rows[FLOAT_LAYER]["kernel"] == floats[FLOAT_LAYER]["kernel"]
    assert rows[WEIGHT_ONLY]["int8"] is False and rows[DEPTHWISE]["int8"] is True
    macs = {k: v["macs"] for k, v in layers.items()}
    assert engine["int8_share"] == pytest.approx(int8_share(layers, macs))
    assert engine["int8_share"] <= 1 - macs[WEIGHT_ONLY] / sum(macs.values()) + 1e-9 < 1.0


@pytest.mark.parametrize("compiled", ["openvino-int8"], indirect=True)
def test_openvino_report_matches_its_perf_counters(compiled, tmp_path):
    """Every reported kernel is the exec type OpenVINO's own profiler gives the layer's compute node, on a
    fresh compile of the saved model at the example's shape."""
    target, q = compiled
    import openvino as ov

    runner = q.state["runner"]
    assert runner.serving() is runner.static  # calls of the example shape run the static model
    q.save(tmp_path / "art")
    model_path = tmp_path / "art" / "model.onnx"
    core = ov.Core()
    model = core.read_model(str(model_path))
    model.reshape({model.inputs[0].get_any_name(): [4, 3, 32, 32]})
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    request.infer({0: _batches(1)[0][0].numpy()})
    profile = [p for p in request.get_profiling_info() if p.node_type in ("Convolution", "GroupConvolution",
                                                                         "FullyConnected", "MatMul")]
    engine = q.report.sections["engine"]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    weights = {**manifest["weights"], **manifest["float_weights"]}
    nodes = mac_nodes(onnx.load(str(model_path)), {w: layer for layer, w in weights.items()})
    checked = 0
    for layer, entry in {**engine["layers"], **engine["float_layers"]}.items():
        name = nodes[layer].name
        hits = [p for p in profile if p.node_name == name or p.node_name.startswith(name + "/")]
        assert len(hits) == 1, (layer, name, [p.node_name for p in profile])
        assert entry["kernel"].split(":", 1)[1] == hits[0].exec_type, (layer, entry, hits[0].exec_type)
        assert entry["int8"] == hits[0].exec_type.endswith("_I8"), (layer, entry, hits[0].exec_type)
        checked += 1
    assert checked == len(engine["layers"]) + 1


@pytest.mark.parametrize("compiled", ["onnxruntime-int8"], indirect=True)
def test_onnxruntime_report_matches_its_profile(compiled, tmp_path):
    """Every reported kernel is the op ONNX Runtime's profiler timed for the layer's compute node."""
    target, q = compiled
    import onnxruntime as ort

    runner = q.state["runner"]
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(q.state["model_dir"] / "model.onnx"), so, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: _batches(1)[0][0].numpy()})
    events = json.loads(open(session.end_profiling()).read())
    timed = {e["name"][: -len("_kernel_time")]: e["args"]["op_name"] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    engine = q.report.sections["engine"]
    weights = {**q.state["weights"], **q.state["float_weights"]}
    nodes = runner._kernel_nodes({w: layer for layer, w in weights.items()})
    for layer, entry in {**engine["layers"], **engine["float_layers"]}.items():
        assert timed.get(nodes[layer].name) == entry["kernel"], (layer, entry, nodes[layer].name)


def test_openvino_reads_the_primitive_not_the_input_precision():
    """runtimePrecision names a node's input precision: a conv reading u8 activations whose primitive runs
    bf16 (what issue 19 saw for depthwise convs) is float; an I8 primitive reading f32 activations is too."""
    bf16 = {"kind": "Convolution", "precision": "u8", "primitive": "brgconv_avx512_dw_bf16", "types": ["u8", "i8"]}
    assert OpenVinoRunner._entry(bf16) == {"kernel": "Convolution:brgconv_avx512_dw_bf16", "int8": False,
                                           "precision": "bf16", "weights": "int8"}
    dynamic_quant = {"kind": "FullyConnected", "precision": "f32", "primitive": "brgemm_avx512_I8",
                     "types": ["f32", "u4"]}
    assert OpenVinoRunner._entry(dynamic_quant)["int8"] is False
    int8 = {"kind": "Convolution", "precision": "u8", "primitive": "brgconv_avx512_dw_I8", "types": ["u8", "i8"]}
    assert OpenVinoRunner._entry(int8)["int8"] is True
    unchosen = {"kind": "FullyConnected", "precision": "u8", "primitive": "undef_I8", "types": ["u8", "i8"]}
    assert OpenVinoRunner._entry(unchosen)["precision"] == "u8" and OpenVinoRunner._entry(None)["int8"] is False
