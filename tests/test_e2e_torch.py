"""End to end on the torch reference target: a ResNet-style CNN and a tiny Hugging Face BERT.

SQNR bounds (issue 2): >= 30 dB for the CNN, >= 25 dB for BERT, W8A8 with min/max calibration, on
batch sizes (and BERT sequence lengths) other than the example's.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime.qparams import sqnr

from models import bert_batch

BERT_DYN = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}


def cnn_data(n, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 16, 16, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def cnn_q(cnn, tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump_cnn")
    q = lowbit.compile(cnn, cnn_data(1)[0], calibration=cnn_data(8), dump_dir=dump, progress=False)
    return q, dump


@pytest.fixture(scope="module")
def bert_q(bert):
    cal = [bert_batch(4, 16, i) for i in range(1, 9)]
    return lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False)


# -- fidelity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_cnn_sqnr_at_least_30_db_with_dynamic_batch(cnn, cnn_q, batch):
    q, _ = cnn_q
    x = torch.randn(batch, 1, 16, 16)
    assert sqnr(cnn(x), q(x)) >= 30.0


@pytest.mark.parametrize("batch,seq", [(1, 16), (3, 24), (5, 9)])
def test_bert_sqnr_at_least_25_db_with_dynamic_batch_and_sequence(bert, bert_q, batch, seq):
    b = bert_batch(batch, seq, 100 + batch)
    ref = bert(**b)
    out = bert_q(**b)
    assert isinstance(out, tuple) and len(out) == 2  # a ModelOutput becomes its tensors
    assert sqnr(ref.last_hidden_state, out[0]) >= 25.0
    assert sqnr(ref.pooler_output, out[1]) >= 25.0


def test_bert_really_is_quantized(bert_q):
    counts = bert_q._plan.counts()
    assert counts == {"w8a8": 13}  # 2 layers x (q, k, v, attn out, ffn1, ffn2) + pooler
    qd = torch.ops.quantized_decomposed
    targets = [n.target for n in bert_q.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(qd.dequantize_per_channel.default) == 13
    # one Q per distinct input: per layer q/k/v share one, attn-out, ffn1, ffn2; plus the pooler
    assert targets.count(qd.quantize_per_tensor.default) == 2 * 4 + 1
    assert targets.count(qd.dequantize_per_tensor.default) == 13


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_cnn_other_calibration_methods(cnn, method):
    q = lowbit.compile(cnn, cnn_data(1)[0], calibration=cnn_data(6),
                       config=lowbit.QuantConfig(calibration=method), progress=False)
    x = torch.randn(4, 1, 16, 16)
    assert sqnr(cnn(x), q(x)) >= 28.0


@pytest.mark.parametrize("scheme,floor", [("w8a8_dynamic", 30.0), ("w8a16", 35.0), ("w4a16", 12.0)])
def test_bert_other_schemes(bert, scheme, floor):
    cfg = lowbit.QuantConfig(scheme=scheme, group_size=32)
    q = lowbit.compile(bert, bert_batch(2, 16, 0), config=cfg, dynamic_shapes=BERT_DYN, progress=False)
    b = bert_batch(3, 12, 7)
    assert sqnr(bert(**b).last_hidden_state, q(**b)[0]) >= floor


def test_weight_granularities(cnn):
    x = torch.randn(4, 1, 16, 16)
    per_tensor = lowbit.compile(cnn, cnn_data(1)[0], calibration=cnn_data(4), progress=False,
                                config=lowbit.QuantConfig(weight_granularity="per_tensor"))
    assert {r["weight_granularity"] for r in per_tensor.report.layers} == {"per_tensor"}
    assert sqnr(cnn(x), per_tensor(x)) >= 25.0


# -- calling ---------------------------------------------------------------------------------------------


def test_numpy_inputs_and_positional_calls(bert, bert_q):
    b = bert_batch(2, 10, 3)
    out_np = bert_q(input_ids=b["input_ids"].numpy(), attention_mask=b["attention_mask"].numpy())
    out_pos = bert_q(b["input_ids"], b["attention_mask"])
    assert torch.equal(out_np[0], out_pos[0]) and isinstance(out_np[0], torch.Tensor)


def test_wrong_inputs_at_call_time_are_named(bert_q, cnn_q):
    q, _ = cnn_q
    with pytest.raises(lowbit.InputError, match=r"input 'x' has shape \(2, 3, 16, 16\); dim 1 must be 1"):
        q(torch.randn(2, 3, 16, 16))
    with pytest.raises(lowbit.InputError, match="dtype float64, expected float32"):
        q(torch.randn(2, 1, 16, 16, dtype=torch.float64))
    b = bert_batch(2, 10, 3)
    with pytest.raises(lowbit.InputError, match=r"dim 'seq' is 10 in 'attention_mask' but 12"):
        bert_q(input_ids=torch.randint(0, 100, (2, 12)), attention_mask=b["attention_mask"])
    with pytest.raises(lowbit.InputError, match=r"missing \['attention_mask'\]"):
        bert_q(input_ids=b["input_ids"])


# -- dumps, plans, report ----------------------------------------------------------------------------------


def test_dump_files_for_every_pass(cnn_q):
    from lowbit.compiler.pipeline import default_passes

    _, dump = cnn_q
    names = sorted(p.name for p in Path(dump).iterdir())
    passes = [p.name for p in default_passes()]  # the torch target adds no lowering passes
    assert {"canonicalize", "fold_conv_bn", "fuse_linear_bias", "fuse_activation", "annotate",
            "insert_observers", "calibrate", "lower_qdq"} <= set(passes)
    for i, p in enumerate(passes, start=1):
        for ext in (".txt", ".dot", ".svg", ".stats.json", ".diff.html"):
            assert f"{i:03d}_{p}{ext}" in names
    stem = {p: f"{i:03d}_{p}" for i, p in enumerate(passes, start=1)}
    stats = json.loads((Path(dump) / f"{stem['fold_conv_bn']}.stats.json").read_text())
    assert stats["stats"] == {"bn_folded": 6} and stats["nodes_after"] < stats["nodes_before"]
    index = (Path(dump) / "index.html").read_text()
    assert all(p in index for p in passes) and f"{stem['lower_qdq']}.diff.html" in index
    lowered = (Path(dump) / f"{stem['lower_qdq']}.txt").read_text()
    assert "by=lower_qdq" in lowered and "role=act_q" in lowered
    # the picture (pure-Python layout, no Graphviz): one box per node of the graph text, one curve per edge
    import xml.etree.ElementTree as ET

    svg = ET.parse(Path(dump) / f"{stem['lower_qdq']}.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    boxes = svg.findall(f"{ns}g/{ns}rect")
    assert len(boxes) == lowered.count("\n") and float(svg.get("width")) > 100 and float(svg.get("height")) > 100
    edges = sum(len(n.all_input_nodes) for n in cnn_q[0].graph_module.graph.nodes) if hasattr(
        cnn_q[0], "graph_module") else None
    if edges is not None:
        assert len(svg.findall(f"{ns}g/{ns}path")) == edges
    assert (Path(dump) / "report.html").is_file()  # the report, its passes linked to these files
    page = (Path(dump) / "report.html").read_text()
    assert f'href="./{stem["lower_qdq"]}.svg"' in page


def test_dump_dir_from_environment(cnn, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DUMP_DIR", str(tmp_path / "envdump"))
    lowbit.compile(cnn, cnn_data(1)[0], calibration=cnn_data(2), progress=False)
    assert (tmp_path / "envdump" / "index.html").is_file()


def test_every_node_records_its_pass(cnn_q):
    q, _ = cnn_q
    by = {n.meta.get("lowbit_created_by") for n in q.graph_module.graph.nodes}
    # fold_conv_bn's folded weights and biases are themselves replaced by lower_qdq (int8 weights, biases on
    # the int32 accumulator grid); the folds show in the pass records instead
    assert None not in by and {"capture", "lower_qdq"} <= by
    assert q.report.passes and any(p["pass"] == "fold_conv_bn" and p["stats"].get("bn_folded") for p in q.report.passes)


def test_plan_is_json_and_reapplies(bert, bert_q):
    plan = json.loads(json.dumps(bert_q.plan))
    plan["layers"]["encoder.layer.0.output.dense"] = {"scheme": "float"}
    plan["layers"]["encoder.layer.1.intermediate.dense"]["scheme"] = "w8a16"
    plan["layers"]["encoder.layer.1.intermediate.dense"]["activation"] = None
    cal = [bert_batch(4, 16, i) for i in range(1, 4)]
    q2 = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, plan=plan, dynamic_shapes=BERT_DYN,
                        progress=False)
    assert q2._plan.counts() == {"w8a8": 11, "float": 1, "w8a16": 1}
    rows = {r["layer"]: r for r in q2.report.layers}
    assert rows["encoder.layer.0.output.dense"]["scheme"] == "float"
    assert "w SQNR dB" in str(q2.report) and "encoder.layer.0.output.dense" in str(q2.report)
    with pytest.raises(lowbit.PlanError, match="'encoder.layer.9.output.dense'"):
        lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False,
                       plan={"layers": {"encoder.layer.9.output.dense": {"scheme": "float"}}})


# -- artifacts ---------------------------------------------------------------------------------------------


def test_save_and_load_reproduce_outputs_exactly(bert, bert_q, tmp_path):
    out = bert_q.save(tmp_path / "bert")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["example_inputs.safetensors", "manifest.json", "plan.json", "qparams.safetensors", "report.html",
                     "report.json", "timings.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"manifest.json", "report.html", "timings.json"}
    assert manifest["target"] == "torch"
    reloaded = lowbit.load(out, model=bert)
    b = bert_batch(3, 20, 11)
    assert torch.equal(reloaded(**b)[0], bert_q(**b)[0])
    assert reloaded.plan == bert_q.plan


def test_load_without_model_is_a_clear_error(bert_q, tmp_path):
    bert_q.save(tmp_path / "bert")
    with pytest.raises(lowbit.ArtifactError, match="model="):
        lowbit.load(tmp_path / "bert")


@pytest.mark.parametrize("damage", ["missing", "altered", "manifest"])
def test_damaged_artifacts_are_refused(cnn, cnn_q, tmp_path, damage):
    q, _ = cnn_q
    d = q.save(tmp_path / "cnn")
    if damage == "missing":
        (d / "qparams.safetensors").unlink()
        match = "qparams.safetensors: listed in the manifest but missing"
    elif damage == "altered":
        with open(d / "plan.json", "a") as f:
            f.write(" ")
        match = "plan.json: SHA-256 does not match"
    else:
        m = json.loads((d / "manifest.json").read_text())
        m["target"] = "onnxruntime-int8"
        (d / "manifest.json").write_text(json.dumps(m))
        match = "altered after it was written"
    with pytest.raises(lowbit.ArtifactError, match=match):
        lowbit.load(d, model=cnn)


def test_nothing_is_half_written(cnn_q, tmp_path, monkeypatch):
    q, _ = cnn_q
    from lowbit.runtime import artifact

    def boom(path, tensors):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        q.save(tmp_path / "cnn")
    assert list(tmp_path.iterdir()) == []  # no target dir, no temp dir left behind


def test_saving_over_an_existing_artifact_replaces_it(cnn_q, tmp_path):
    q, _ = cnn_q
    d = tmp_path / "cnn"
    d.mkdir()
    (d / "stale.txt").write_text("old")
    q.save(d)
    assert not (d / "stale.txt").exists() and (d / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cnn"]


# -- bad input ---------------------------------------------------------------------------------------------


def test_unexportable_model_raises_capture_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # branches on a value
                return x * 2
            return x

    with pytest.raises(lowbit.CaptureError, match="torch.export could not capture DataDependent"):
        lowbit.compile(DataDependent(), (torch.randn(2, 3),), calibration=[(torch.randn(2, 3),)])


def test_all_zero_activation_gives_finite_scales():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.relu(-torch.relu(self.a(x))))  # b's input is always exactly zero

    m = Dead().eval()
    q = lowbit.compile(m, (torch.randn(2, 8),), calibration=[(torch.randn(4, 8),)], progress=False)
    scale = q.state["qparams"]["b.input.scale"]
    assert torch.isfinite(scale) and scale > 0
    x = torch.randn(3, 8)
    out = q(x)
    assert torch.isfinite(out).all() and torch.allclose(out, m(x), atol=1e-6)


def test_unknown_target_and_bad_example_inputs(cnn):
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        lowbit.compile(cnn, cnn_data(1)[0], target="tpu")
    with pytest.raises(TypeError, match="tuple of positional arguments or a dict"):
        lowbit.compile(cnn, 3.0)


def test_numpy_calibration_batches_are_accepted(cnn):
    cal = [(np.random.default_rng(i).standard_normal((4, 1, 16, 16)).astype(np.float32),) for i in range(3)]
    q = lowbit.compile(cnn, cnn_data(1)[0], calibration=cal, progress=False)
    x = torch.randn(2, 1, 16, 16)
    assert sqnr(cnn(x), q(x)) > 25


if os.environ.get("LOWBIT_PRINT_SQNR"):
    def test_print_sqnr_table(cnn, cnn_q, bert, bert_q):  # `LOWBIT_PRINT_SQNR=1 pytest -s`: the note's figures
        q, dump = cnn_q
        x = torch.randn(16, 1, 16, 16)
        b = bert_batch(4, 24, 5)
        print(f"\nCNN SQNR (batch 16): {sqnr(cnn(x), q(x)):.2f} dB")
        print(f"BERT SQNR (batch 4, seq 24): {sqnr(bert(**b).last_hidden_state, bert_q(**b)[0]):.2f} dB")
        print("\n".join(sorted(p.name for p in Path(dump).iterdir())))


def test_progress_always_shows_bars_and_steps_in_a_log(cnn, capsys):
    lowbit.compile(cnn, cnn_data(1)[0], calibration=cnn_data(2), progress="always")
    err = capsys.readouterr().err
    assert re.search(r"lowbit [a-z_ ]+: .*batch", err)  # a calibration bar (tqdm prints at most every 0.1 s)
    assert "building the torch engine: done in" in err
    lowbit.compile(cnn, cnn_data(1)[0], calibration=cnn_data(2), progress=False)
    assert capsys.readouterr().err == ""
