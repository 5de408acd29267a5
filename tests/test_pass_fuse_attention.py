"""fuse_attention (ONNX Runtime target): SDPA + head reshapes -> one lowbit::attention; numerics unchanged."""

import pytest
import torch

from lowbit.backends.onnx.attention import FuseAttention
from lowbit.passes import Canonicalize

from helpers import call_flat, count, rel_err, run_passes
from models import bert_batch, tiny_bert

aten = torch.ops.aten


def test_fuse_attention_replaces_every_bert_attention_exactly():
    bert = tiny_bert()
    example = bert_batch(2, 16, 0)
    gm, pm, _ = run_passes(bert, example, [Canonicalize(), FuseAttention()])
    assert pm.records[1].stats == {"attention_fused": 2}
    assert count(gm, aten.scaled_dot_product_attention.default) == 0
    assert count(gm, torch.ops.lowbit.attention.default) == 2
    b = bert_batch(2, 16, 3)  # the example's shape: the captured graph checks its symbolic dims
    ref = bert(**b).last_hidden_state
    assert rel_err(call_flat(gm, b["input_ids"], b["attention_mask"]), ref) < 1e-5


def test_attention_op_matches_sdpa_with_padding_mask():
    q, k, v = (torch.randn(2, 5, 32) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False
    out = torch.ops.lowbit.attention(q, k, v, mask, 4, 0.25)
    heads = [x.reshape(2, 5, 4, 8).transpose(1, 2) for x in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*heads, attn_mask=mask, scale=0.25)
    assert torch.allclose(out, ref.transpose(1, 2).reshape(2, 5, 32), atol=1e-6)


class _Attend(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.ops.lowbit.attention(q, k, v, mask, 4, 0.3)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_matmul_translation_matches_sdpa_including_rows_that_attend_to_nothing(engine, tmp_path):
    """The plain MatMul/Softmax export (openvino-int8) equals SDPA to 1e-5, and, like SDPA, gives zeros for
    a query row whose mask attends to no key (a plain additive mask would spread it evenly instead)."""
    pytest.importorskip(engine)
    from lowbit.backends.onnx.attention import MATMUL_TRANSLATIONS
    from lowbit.backends.onnx.export import _quiet

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 32, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    mask[0, 0, 2] = False  # query 2 of batch 0 attends to nothing
    mask[1, 0, :, 0] = True
    ref = _Attend()(q, k, v, mask)
    assert torch.all(ref[0, 2] == 0)
    with _quiet():
        prog = torch.onnx.export(_Attend(), (q, k, v, mask), dynamo=True, opset_version=21,
                                 custom_translation_table=MATMUL_TRANSLATIONS, input_names=["q", "k", "v", "m"])
    path = tmp_path / "attention.onnx"
    prog.save(str(path))
    ops = [n.op_type for n in prog.model_proto.graph.node]
    assert "Softmax" in ops and "Attention" not in ops and "IsNaN" not in ops
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "m": mask.numpy()}
    if engine == "onnxruntime":
        import onnxruntime as ort

        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    else:
        import openvino as ov

        c = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        out = c(feed)[0]
    out = torch.from_numpy(out)
    assert torch.all(out[0, 2] == 0)
    assert rel_err(out, ref) < 1e-5
