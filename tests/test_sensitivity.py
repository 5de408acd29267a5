"""Sensitivity: the probe toggles layers without recompiling; a planted-outlier layer ranks first."""

import json

import torch

import lowbit
from lowbit.compiler.sensitivity import Probe, SqnrFidelity, analyze
from lowbit.config import QuantConfig
from lowbit.passes import Annotate, Calibrate, Canonicalize, FuseActivation, FuseLinearBias, InsertObservers
from lowbit.runtime.qparams import sqnr

from helpers import run_passes
from models import ChannelOutlier


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 16, generator=g),) for _ in range(n)]


def probed():
    """ChannelOutlier, 4 calibration batches, and a Probe over its calibrated (unlowered) graph."""
    torch.manual_seed(0)
    model = ChannelOutlier().eval()
    cal = data(4)
    cfg = QuantConfig(smoothquant=False, target_sqnr_db=None)
    gm, _, _ = run_passes(model, cal[0], [Canonicalize(), FuseLinearBias(), FuseActivation(), Annotate(),
                                          InsertObservers(), Calibrate()], config=cfg, calibration=cal)
    return model, cal, Probe(gm, cfg)


def test_probe_toggles_layers_and_matches_the_lowered_model():
    model, cal, probe = probed()
    x = cal[0][0]
    probe.set({})
    assert torch.allclose(probe(x)[0], model(x), atol=1e-5)  # all float: the float model
    probe.set({"first": "w8a8", "mid": "w8a8", "last": "w8a8"})
    # the probe measures plans before bias correction (a pass after the plan, which only moves biases)
    compiled = lowbit.compile(model, cal[0], calibration=cal, progress=False,
                              config=QuantConfig(smoothquant=False, target_sqnr_db=None, bias_correction=False))
    assert sqnr(compiled(x), probe(x)[0]) > 40.0  # fake-quant probe ~ the lowered Q/DQ graph
    probe.set({"mid": "w8a8_dynamic"})
    assert probe.layers["mid"].input.mode == "token" and probe.layers["first"].option == "float"


def test_planted_outlier_layer_is_the_most_sensitive():
    model, cal, probe = probed()
    fid = SqnrFidelity(probe, [list(b) for b in cal[:2]], target=0.0)
    sens = analyze(probe, {"first": "w8a8", "mid": "w8a8", "last": "w8a8"}, fid, {}, progress=False)
    assert [r.layer for r in sens.layers][0] == "mid"
    mid = sens.layers[0]
    assert mid.float_gain > 6.0 and mid.alone < min(r.alone for r in sens.layers[1:])
    assert sens.evaluations == 7  # all-quantized + 2 per layer
    assert "mid" in sens.table()


def test_sensitivity_in_report_and_dump_dir(tmp_path):
    torch.manual_seed(0)
    model = ChannelOutlier().eval()
    cal = data(4)
    q = lowbit.compile(model, cal[0], calibration=cal, progress=False, dump_dir=tmp_path,
                       config=QuantConfig(smoothquant=False, target_sqnr_db=None, sensitivity=True))
    section = q.report.sections["sensitivity"]
    assert section["layers"][0]["layer"] == "mid" and section["metric"] == "sqnr_db"
    assert q._plan.counts() == {"w8a8": 3}  # no target: the analysis changes nothing
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    assert saved["layers"][0]["layer"] == "mid"
    png = (tmp_path / "sensitivity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_metric_drives_the_analysis():
    torch.manual_seed(0)
    model = ChannelOutlier().eval()
    cal = data(4)
    x = cal[1][0]
    ref = model(x)

    def metric(m):  # higher is better: negative mean squared error on one batch
        return -float((m(x) - ref).pow(2).mean())

    q = lowbit.compile(model, cal[0], calibration=cal, progress=False,
                       config=QuantConfig(smoothquant=False, fidelity_fn=metric, fidelity_tolerance=1e9,
                                          sensitivity=True))
    section = q.report.sections["sensitivity"]
    assert section["metric"] == "fidelity_fn" and section["layers"][0]["layer"] == "mid"
    assert section["float_value"] == 0.0


def test_forked_sweep_equals_one_plan_at_a_time():
    """Probe.sweep runs the shared prefix once; every forked result must equal setting that plan and running
    the whole graph (same ops in the same order: equal to float rounding)."""
    _, cal, probe = probed()
    quantized = {"first": "w8a8", "mid": "w8a8_dynamic", "last": "w8a8"}
    changes = [("first", "float"), ("mid", "w4a16/g16"), ("last", "float"), ("mid", "float")]
    x = cal[2][0]
    got: dict[int, torch.Tensor] = {}
    base_out = probe.sweep([x], quantized, changes, lambda k, outs: got.__setitem__(k, outs[0]))
    assert {k: v.option for k, v in probe.layers.items()} == quantized  # left on the base plan
    probe.set(quantized)
    assert torch.allclose(base_out[0], probe(x)[0], rtol=0, atol=1e-6)
    for k, (layer, option) in enumerate(changes):
        probe.set({**quantized, layer: option})
        assert torch.allclose(got[k], probe(x)[0], rtol=0, atol=1e-6), changes[k]
        assert not torch.allclose(got[k], base_out[0], atol=1e-4), changes[k]  # the change did something
    fid = SqnrFidelity(probe, [list(b) for b in cal[:2]], target=0.0)
    value, values = fid.sweep(probe, quantized, changes)
    probe.set(quantized)
    assert abs(value - fid(probe)) < 1e-6
    for k, (layer, option) in enumerate(changes):
        probe.set({**quantized, layer: option})
        assert abs(values[k] - fid(probe)) < 1e-6, changes[k]
