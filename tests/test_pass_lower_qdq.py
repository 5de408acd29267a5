"""lower_qdq: observers become Q + one DQ per consumer, weights int8 + scales; numerics equal the oracle."""

import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.passes import Annotate, Calibrate, InsertObservers, LowerQDQ
from lowbit.runtime.qparams import (
    choose_qparams,
    dequantize_weight,
    fake_quantize,
    quantize_per_token,
    quantize_weight,
)
from lowbit.runtime.spec import QuantSpec

from helpers import call_flat, count, run_passes

qd = torch.ops.quantized_decomposed
PASSES = [Annotate(), InsertObservers(), Calibrate(), LowerQDQ()]


class Fan(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)

    def forward(self, x):
        return self.a(x) + self.b(x)  # one producer, two consumers


def test_static_w8a8_matches_the_oracle():
    m = Fan().eval()
    cal = [(torch.randn(4, 32),) for _ in range(3)]
    gm, pm, ctx = run_passes(m, cal[0], PASSES, calibration=cal)
    assert count(gm, qd.quantize_per_tensor.default) == 1
    assert count(gm, qd.dequantize_per_tensor.default) == 2  # a dedicated DQ per consumer
    assert count(gm, qd.dequantize_per_channel.default) == 2
    assert not any(p.dtype.is_floating_point and p.ndim == 2 for p in gm.buffers() if p.shape == (32, 32))
    # the oracle: fake-quant the input with the calibrated range, dequantized int8 weights
    allx = torch.cat([c[0] for c in cal])
    aspec = QuantSpec("uint8", False, "per_tensor")
    s, z = choose_qparams(allx.min(), allx.max(), aspec)
    wspec = QuantSpec("int8", True, "per_channel", axis=0, narrow=True)
    x = torch.randn(6, 32)
    xq = fake_quantize(x, s, z, aspec)
    ref = sum(nn.functional.linear(xq, dequantize_weight(*quantize_weight(lin.weight, wspec), wspec), lin.bias)
              for lin in (m.a, m.b))
    assert torch.allclose(call_flat(gm, x), ref, rtol=1e-5, atol=1e-6)
    assert ctx.notes["qparams"]["a.input.scale"] == ctx.notes["qparams"]["b.input.scale"]


def test_dynamic_weight_only_and_group_schemes_match_the_oracle():
    m = Fan().eval()
    cfg = QuantConfig(group_size=32, overrides={"a": "w8a8_dynamic", "b": "w4a16"})
    gm, _, _ = run_passes(m, (torch.randn(4, 32),), PASSES, config=cfg)
    assert count(gm, qd.quantize_per_tensor.default) == 0
    assert count(gm, qd.quantize_per_token.default) == 1 and count(gm, qd.dequantize_per_channel_group.default) == 1
    x = torch.randn(5, 32) * 3
    q, s = quantize_per_token(x)
    wa = QuantSpec("int8", True, "per_channel", axis=0, narrow=True)
    wb = QuantSpec("int4", True, "per_group", group_size=32, signed_scale=True)  # the full [-8, 7] range
    ref = nn.functional.linear(q.float() * s, dequantize_weight(*quantize_weight(m.a.weight, wa), wa), m.a.bias)
    ref = ref + nn.functional.linear(x, dequantize_weight(*quantize_weight(m.b.weight, wb), wb), m.b.bias)
    assert torch.allclose(call_flat(gm, x), ref, rtol=1e-5, atol=1e-5)


def test_float_layers_carry_no_qdq():
    gm, _, _ = run_passes(Fan().eval(), (torch.randn(4, 32),), PASSES,
                          config=QuantConfig(scheme="float"))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("quantized_decomposed" in str(t) for t in targets)


def test_static_conv_bias_sits_on_the_int32_accumulator_grid():
    # integer convs add the bias as int32 at scale s_x * s_w[c]; the reference rounds it the same way, so
    # engines agree with it to the code (found by the random-graph differential test: tests/fuzz_regressions/)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    cal = [(torch.randn(2, 3, 6, 6),) for _ in range(2)]
    gm, pm, ctx = run_passes(m, cal[0], PASSES, calibration=cal)
    assert pm.records[-1].stats["conv_biases_on_int32_grid"] == 1
    conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    bias = getattr(gm, conv.args[2].target)
    step = ctx.notes["qparams"]["0.input.scale"].double() * ctx.notes["qparams"]["0.weight.scale"].double()
    codes = bias.double() / step
    assert torch.allclose(codes, codes.round(), atol=1e-6)
    assert (bias.double() - m[0].bias.double()).abs().le(step / 2 + 1e-9).all()  # moved by at most half a step
