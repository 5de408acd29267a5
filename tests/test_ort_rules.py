"""ort_rules.fuse_matmul_integer_to_float: every quantized linear becomes one MatMulIntegerToFloat with its
bias inside, and ONNX Runtime computes the same numbers as from the plain QDQ graph."""

from __future__ import annotations

import onnx
import torch
from torch import nn

import lowbit


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) + self.c(x)


def test_fused_graph_matches_the_plain_qdq_graph():
    torch.manual_seed(0)
    model = TwoLinears().eval()
    cal = [(torch.randn(4, 5, 16),) for _ in range(4)]
    kw = dict(target="onnxruntime-int8", calibration=cal, progress=False, config=lowbit.QuantConfig(smoothquant=False))
    fused = lowbit.compile(model, cal[0], **kw)
    plain = lowbit.compile(model, cal[0], engine_rules=False, **kw)
    graph = onnx.load(str(fused.state["model_dir"] / "model.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and "MatMul" not in ops and "Add" in ops  # the residual sum
    assert fused.report.sections["onnx_export"]["matmul_integer_to_float"] == 3
    assert fused.report.sections["onnx_export"]["bias_fused"] == 2  # c has no bias
    names = {n.name for n in graph.graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert names == {"a/MatMulIntegerToFloat", "b/MatMulIntegerToFloat", "c/MatMulIntegerToFloat"}
    x = torch.randn(3, 5, 16)
    # same int8 products, the bias added inside the kernel instead of after it: float rounding only
    assert torch.allclose(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    assert fused.report.sections["engine"]["int8_share"] == 1.0
