"""The automatic plan: meets a target, promotes the sensitive layer, runs only what the engine runs, says
clearly when no plan can, and round-trips as JSON."""

import importlib.util
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compiler.planner import FidelityError, undominated
from lowbit.config import QuantConfig
from lowbit.runtime.qparams import sqnr

from models import ChannelOutlier, bert_batch, tiny_bert

BERT_DYN = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")




class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def data(n, seed=0, token_outlier=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 8, 16, generator=g)
        if token_outlier:  # the first token of every sequence 50x the others: per-token scales fix it
            x[:, 0] *= 50.0
        out.append((x,))
    return out


def compile_(model, cal, target="torch", **cfg):
    cfg.setdefault("smoothquant", False)
    return lowbit.compile(model, cal[0], target=target, calibration=cal, progress=False, config=QuantConfig(**cfg))


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(layers=1)


def test_meets_a_target_on_tiny_bert_and_the_fidelity_is_measured(bert):
    cal = [bert_batch(4, 16, i) for i in range(1, 4)]
    # float embedding tables: the all-w8a8 start is then the linears' error alone (int8 tables cost this
    # random-weight model ~46 dB, which a target 4 dB above the start would have to refuse anyway)
    base = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False,
                          config=QuantConfig(embeddings="float"))
    start = base.report.sections["plan"]["start_fidelity"]
    assert base._plan.counts() == {"w8a8": 7}  # the default target is met as it is: nothing promoted
    target = start + 4.0
    q = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False,
                       config=QuantConfig(target_sqnr_db=target))
    plan = q.report.sections["plan"]
    assert plan["fidelity"] >= target and plan["steps"]
    assert q._plan.counts().get("w8a8", 0) < 7 and set(q._plan.counts()) <= {"w8a8", "w8a8_dynamic", "float"}
    # the planner measured fake-quant on the calibration batches: the compiled model agrees
    b = cal[0]
    assert sqnr(bert(**b).last_hidden_state, q(**b)[0]) >= target - 1.0
    assert "sensitivity" in q.report.sections and "plan: sqnr_db" in str(q.report)
    assert any("embeddings stay float" in w for w in q.report.sections["warnings"])


def test_fidelity_counts_the_int8_embedding_tables(bert):
    """With int8 tables the planner measures against the float model, not the graph's own float run:
    its fidelity is what the compiled model gives on the same batches."""
    cal = [bert_batch(4, 16, i) for i in range(1, 4)]
    q = lowbit.compile(bert, bert_batch(2, 16, 0), calibration=cal, dynamic_shapes=BERT_DYN, progress=False)
    assert q.report.sections["embeddings"]["tables"]
    measured = q.report.sections["plan"]["fidelity"]
    with torch.no_grad():
        ref = torch.cat([bert(**b).last_hidden_state.flatten() for b in cal[:2]])
        out = torch.cat([q(**b)[0].flatten() for b in cal[:2]])
    assert abs(sqnr(ref, out) - measured) < 0.1, (sqnr(ref, out), measured)
    alone = q.report.sections["embeddings"]["alone_sqnr_db"]
    assert measured < alone  # the tables' error is in it


def test_promotes_the_sensitive_layer_only():
    torch.manual_seed(0)
    model = ChannelOutlier().eval()
    cal = data(4)
    start = compile_(model, cal, target_sqnr_db=-100.0).report.sections["plan"]["fidelity"]
    q = compile_(model, cal, target_sqnr_db=start + 10.0)
    layers = q.plan["layers"]
    assert layers["mid"]["scheme"] == "float"  # per-token cannot fix a channel outlier; float can
    assert layers["first"]["scheme"] == layers["last"]["scheme"] == "w8a8"
    assert q.report.sections["plan"]["steps"][-1]["layer"] == "mid"
    assert q.report.sections["sensitivity"]["layers"][0]["layer"] == "mid"


def test_token_outliers_go_per_token_where_the_engine_runs_it():
    torch.manual_seed(0)
    model = MLP().eval()
    cal = data(4, token_outlier=True)
    start = compile_(model, cal, target_sqnr_db=-100.0).report.sections["plan"]["fidelity"]
    q = compile_(model, cal, target_sqnr_db=start + 6.0)
    promoted = {v["scheme"] for v in q.plan["layers"].values()} - {"w8a8"}
    assert promoted == {"w8a8_dynamic"}  # cost 1.15 beats float's 2.0 when it recovers as much


@needs_ort
def test_respects_the_engine_capabilities():
    torch.manual_seed(0)
    model = MLP().eval()
    cal = data(4, token_outlier=True)
    start = compile_(model, cal, target_sqnr_db=-100.0).report.sections["plan"]["fidelity"]
    q = compile_(model, cal, target="onnxruntime-int8", target_sqnr_db=start + 6.0)
    schemes = {v["scheme"] for v in q.plan["layers"].values()}
    assert "w8a8_dynamic" not in schemes and schemes - {"w8a8"} <= {"float", "w8a16"} and schemes != {"w8a8"}
    x = data(1, 5, token_outlier=True)[0][0]
    assert sqnr(model(x), q(x)) >= start + 3.0


def test_unreachable_target_names_the_best_plan_and_its_fidelity():
    torch.manual_seed(0)
    model = ChannelOutlier().eval()
    with pytest.raises(FidelityError, match=r"best plan found reaches [0-9.]+ dB with \{'w8a16': 3\}") as e:
        compile_(model, data(4), target_sqnr_db=200.0, plan_schemes=("w8a8", "w8a16"))
    assert isinstance(e.value, lowbit.PlanError) and e.value.fidelity < 200.0
    assert e.value.plan.counts() == {"w8a16": 3}
    with pytest.raises(FidelityError, match="target 200 dB"):
        compile_(model, data(4), target_sqnr_db=200.0, plan_schemes=("w8a8",))


def test_plan_json_round_trip_reapplies_exactly():
    torch.manual_seed(0)
    model = ChannelOutlier().eval()
    cal = data(4)
    q = compile_(model, cal, target_sqnr_db=40.0, smoothquant=True)
    text = json.dumps(q.plan)
    again = lowbit.compile(model, cal[0], calibration=cal, progress=False, plan=json.loads(text))
    assert again.plan == q.plan and "plan" not in again.report.sections  # a given plan is not searched
    x = data(1, 9)[0][0]
    assert torch.equal(again(x), q(x))


@needs_ort
def test_invalid_plan_entries_are_named():
    torch.manual_seed(0)
    model = MLP().eval()
    cal = data(2)
    with pytest.raises(lowbit.PlanError, match="plan entry 'b'.*'w8a8_dynamic' is not supported by target "
                                               "'onnxruntime-int8'"):
        lowbit.compile(model, cal[0], target="onnxruntime-int8", calibration=cal, progress=False,
                       plan={"layers": {"b": {"scheme": "w8a8_dynamic"}}})
    with pytest.raises(lowbit.PlanError, match="plan entry 'nope' names no layer"):
        lowbit.compile(model, cal[0], calibration=cal, progress=False, plan={"layers": {"nope": {"scheme": "float"}}})
    with pytest.raises(lowbit.PlanError, match="plan entry 'a': scheme 'w8a16' is weight-only"):
        lowbit.compile(model, cal[0], calibration=cal, progress=False, plan={"layers": {"a": {
            "scheme": "w8a16", "weight": {"dtype": "int8"}, "activation": {"dtype": "int8"}}}})
    q = lowbit.compile(model, cal[0], calibration=cal, progress=False, plan={"layers": {"a": {"scheme": "w4a16",
                                                                                                "group_size": 16}}})
    assert q.plan["layers"]["a"]["weight"]["group_size"] == 16  # a bare scheme takes its default specs


def test_dominated_options_are_dropped():
    costs = {"w8a8": 1.0, "w8a8_dynamic": 1.15, "float": 2.0, "w8a16": 2.2}
    assert undominated(["w8a8_dynamic", "w8a16", "float"], costs) == ("w8a8_dynamic", "float")
