"""target="torch" with compile=True: inductor's x86 fusions map q/dq + linear to oneDNN int8 kernels."""

import torch

import lowbit
from lowbit.runtime.qparams import sqnr

from models import SmallResNet, bert_batch, randomize_bn, tiny_bert

BERT_DYN = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}


def test_bert_linears_become_onednn_int8_kernels():
    bert = tiny_bert()
    cal = [bert_batch(4, 16, i) for i in range(1, 4)]
    eager = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False)
    q = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False,
                       compile=True)
    engine = q.report.sections["engine"]
    assert engine["engine"] == "inductor" and engine["calls"]["qlinear_pointwise"] == 13
    assert engine["int8_share"] >= 0.9
    for batch, seq in ((3, 20), (1, 7)):  # new shapes recompile with freezing still on
        b = bert_batch(batch, seq, 1)
        out = q(**b)[0]
        assert sqnr(bert(**b).last_hidden_state, out) >= 25.0
        assert sqnr(eager(**b)[0], out) >= 35.0  # oneDNN's integer math vs the fake-quant oracle


def test_cnn_convs_become_onednn_int8_kernels():
    torch.manual_seed(0)
    m = randomize_bn(SmallResNet())
    cal = [(torch.randn(8, 1, 16, 16),) for _ in range(2)]
    q = lowbit.compile(m, cal[0], calibration=cal, compile=True, progress=False)
    engine = q.report.sections["engine"]
    assert engine["int8_share"] >= 0.9, engine["calls"]
    for batch in (8, 3):  # another batch size recompiles a static graph
        x = torch.randn(batch, 1, 16, 16)
        assert sqnr(m(x), q(x)) >= 30.0
