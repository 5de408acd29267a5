"""quantize_embeddings: large tables become int8 rows + a scale per row, gathered first and scaled after.

The rewritten graph must equal the model with its tables replaced by their dequantized int8 version to
1e-6 relative (the same products in another order: gather-then-scale reads the same codes and scales),
and the table's own error is that of int8 per row (>= 40 dB SQNR on random normal weights).
"""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import QuantConfigError
from lowbit.passes import Canonicalize, QuantizeEmbeddings
from lowbit.passes.quantize_embeddings import MIN_NUMEL
from lowbit.runtime.qparams import sqnr

from helpers import call_flat, count, rel_err, run_passes
from models import bert_batch, tiny_bert

aten = torch.ops.aten


def _int8_rows(table: torch.Tensor) -> torch.Tensor:
    """The table as the pass stores it: symmetric int8 per row, codes in [-127, 127], dequantized."""
    scale = table.abs().amax(dim=1, keepdim=True) / 127.0
    return torch.clamp(torch.round(table / scale), -127, 127) * scale


def _int8_lookups(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is aten.embedding.default
            and n.args[0].meta.get("val") is not None and n.args[0].meta["val"].dtype == torch.int8]


def test_bert_tables_become_int8_rows_and_the_graph_equals_the_dequantized_model():
    # the word table (120 x 64) is read by a lookup; canonicalize folds the position lookup (constant
    # position ids) into a constant; the token-type table (2 x 64) is too small
    bert = tiny_bert()
    example = bert_batch(2, 16, 0)
    gm, pm, ctx = run_passes(bert, example, [Canonicalize(), QuantizeEmbeddings()])
    stats = pm.records[1].stats
    assert stats["tables_int8"] == 1 and set(ctx.notes["embeddings"]["tables"]) == {"embeddings.word_embeddings.weight"}
    assert len(_int8_lookups(gm)) == 1
    for name, row in ctx.notes["embeddings"]["tables"].items():
        assert row["sqnr_db"] >= 40.0, (name, row)
        assert row["int8_mb"] < row["float_mb"] / 2
    ref = tiny_bert()
    with torch.no_grad():
        ref.embeddings.word_embeddings.weight.copy_(_int8_rows(ref.embeddings.word_embeddings.weight))
    b = bert_batch(3, 16, 5)
    with torch.no_grad():
        expected = ref(**b).last_hidden_state
    got = call_flat(gm, b["input_ids"], b["attention_mask"])
    assert rel_err(got, expected) < 1e-6
    # and the int8 tables are what the float model would lose: small, but not nothing
    with torch.no_grad():
        float_out = tiny_bert()(**b).last_hidden_state
    assert 0 < rel_err(got, float_out) < 0.05


class TiedLM(nn.Module):
    """A table read by a lookup and, tied, by the output projection; and a small table."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 16)
        self.small = nn.Embedding(4, 16)

    def forward(self, ids):
        h = self.emb(ids) + self.small(ids % 4)
        return nn.functional.linear(h, self.emb.weight)


def test_tied_table_lookups_go_int8_the_projection_keeps_the_float_table_and_small_tables_stay_float():
    assert 4 * 16 < MIN_NUMEL <= 200 * 16
    m = TiedLM().eval()
    ids = torch.randint(0, 200, (2, 7))
    gm, pm, _ = run_passes(m, (ids,), [Canonicalize(), QuantizeEmbeddings()])
    assert pm.records[1].stats["tables_int8"] == 1
    lookups = _int8_lookups(gm)
    assert len(lookups) == 1 and lookups[0].args[0].meta["val"].shape == (200, 16)  # the small table: float
    (linear,) = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert torch.equal(gm.get_parameter(str(linear.args[1].target)), m.emb.weight)
    out, ref = call_flat(gm, ids), m(ids)
    assert sqnr(ref, out) > 35.0  # int8 rows (~43 dB) feeding a float projection


def test_switched_off_by_config_or_by_the_target():
    bert = tiny_bert()
    example = bert_batch(2, 16, 0)
    gm, pm, _ = run_passes(bert, example, [Canonicalize(), QuantizeEmbeddings()],
                           config=QuantConfig(embeddings="float"))
    assert pm.records[1].stats == {} and not _int8_lookups(gm)
    gm, pm, ctx = run_passes(bert, example, [Canonicalize(), QuantizeEmbeddings()],
                             notes={"int8_embeddings": False, "target": "tensorrt-int8"})
    assert not _int8_lookups(gm)
    assert any("embeddings stay float" in w and "tensorrt-int8" in w for w in ctx.notes["warnings"])
    with pytest.raises(QuantConfigError, match="embeddings must be 'int8' or 'float'"):
        QuantConfig(embeddings="int4")


def test_compiled_model_reports_the_tables_and_its_torch_graph_reads_int8():
    bert = tiny_bert()
    cal = [bert_batch(4, 16, i) for i in range(1, 4)]
    q = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, progress=False)
    section = q.report.sections["embeddings"]
    assert set(section["tables"]) == {"embeddings.word_embeddings.weight"}
    assert section["alone_sqnr_db"] >= 18.0 + 10.0  # the default target and the tables' margin
    assert "embedding tables as int8 rows: embeddings.word_embeddings.weight 0.03 -> 0.01 MB" in str(q.report)
    assert count(q.graph_module, aten._to_copy.default) >= 1
    assert len(_int8_lookups(q.graph_module)) == 1
    # a config saved before the option existed reloads with float tables, as it was compiled
    assert QuantConfig.from_json({k: v for k, v in QuantConfig().to_json().items() if k != "embeddings"}
                                 ).embeddings == "float"
