"""fuse_attention (ONNX Runtime target): SDPA + head reshapes -> one lowbit::attention; numerics unchanged."""

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
