"""smooth_quant: exact in float, one s per shared input, 1/s folded where a producer can take it and an
explicit rescale where none can, and better W8A8 fidelity on a model with planted activation outliers."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.config import QuantConfig
from lowbit.passes import Canonicalize, FuseActivation, FuseLinearBias, SmoothQuant
from lowbit.passes.smooth_quant import AUTO_GRID, smoothing_factors
from lowbit.runtime.qparams import sqnr

from helpers import count, rel_err, run_passes
from models import bert_batch, tiny_bert

aten = torch.ops.aten
FRONT = [Canonicalize(), FuseLinearBias(), FuseActivation(), SmoothQuant()]


class Block(nn.Module):
    """Pre-LN attention (the LayerNorm feeds only Q/K/V), an FFN with GELU, and a ReLU head pair.

    Where 1/s goes: q/k/v -> the LayerNorm; proj (attention context), fc1 (its input also feeds the
    residual), fc2 (GELU output) and head1 (a residual sum) -> explicit rescales; head2 -> head1's rows
    (through the ReLU)."""

    def __init__(self, d: int = 32, outliers: bool = True) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head1, self.head2 = nn.Linear(d, d), nn.Linear(d, 8)
        self.d = d
        if outliers:  # a few activation channels 30x the rest: what SmoothQuant is for
            with torch.no_grad():
                self.ln.weight[:3] = 30.0
                self.fc1.weight[:4] *= 20.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / self.d ** 0.5, dim=-1)
        y = x + self.proj(att @ self.v(h))
        y = y + self.fc2(F.gelu(self.fc1(y)))
        return self.head2(torch.relu(self.head1(y)))


def data(n: int, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 10, 32, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def smoothed(model, example, cal, **cfg):
    return run_passes(model, example, FRONT, calibration=cal, config=QuantConfig(target_sqnr_db=None, **cfg))


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothed_float_block_equals_the_original(block, alpha):
    gm, pm, ctx = smoothed(block, data(1)[0], data(4, 1), smoothquant_alpha=alpha)
    x = torch.randn(3, 10, 32)
    out = gm(x)
    assert rel_err(out[0] if isinstance(out, (tuple, list)) else out, block(x)) <= 1e-5
    stats = pm.records[-1].stats
    if alpha == 0.5:  # auto may leave a group unsmoothed
        assert stats == {"layers_smoothed": 8, "folded_layer_norm": 1, "folded_linear": 1, "explicit_rescales": 4}
        made = [n for n in gm.graph.nodes if n.meta.get("lowbit_created_by") == "smooth_quant"
                and n.op == "call_function"]
        assert len(made) == 4 and all(n.target is aten.mul.Tensor for n in made)
    report = ctx.notes["smooth_quant"]
    assert set(report) == {"q", "k", "v", "proj", "fc1", "fc2", "head1", "head2"}
    assert all(r["alpha"] is None or r["alpha"] in AUTO_GRID or r["alpha"] == 0.5 for r in report.values())


def test_where_one_over_s_goes(block):
    gm, _, ctx = smoothed(block, data(1)[0], data(4, 1), smoothquant_alpha=0.5)
    report = ctx.notes["smooth_quant"]
    assert report["q"]["folded_into"] == "layer_norm ln"
    assert report["head2"]["folded_into"] == "linear head1"
    for name in ("proj", "fc1", "fc2", "head1"):
        assert report[name]["folded_into"] == "explicit rescale" and report[name]["why_not_folded"]
    assert "also feeds" in report["fc1"]["why_not_folded"]  # the residual add
    assert count(gm, aten.mul.Tensor) == 4


def test_qkv_share_one_s_from_the_max_over_their_weights(block):
    cal = data(4, 1)
    gm, _, ctx = smoothed(block, data(1)[0], cal, smoothquant_alpha=0.5)
    qp = ctx.notes["qparams"]
    s = qp["q.smooth_scale"]
    assert torch.equal(s, qp["k.smooth_scale"]) and torch.equal(s, qp["v.smooth_scale"])
    with torch.no_grad():  # the oracle: absmax of the LayerNorm output, max over the three weights' columns
        act = torch.stack([block.ln(x).abs().amax(dim=(0, 1)) for (x,) in cal]).amax(0)
        wmax = torch.stack([m.weight.abs().amax(0) for m in (block.q, block.k, block.v)]).amax(0)
    assert torch.allclose(s, smoothing_factors(act, wmax, 0.5), rtol=1e-5)
    assert torch.allclose(s, act.sqrt() / wmax.sqrt(), rtol=1e-4)
    assert ctx.notes["smooth_quant"]["q"]["group"] == ["q", "k", "v"]


def test_tiny_bert_smoothed_equals_the_original():
    bert = tiny_bert(layers=1)
    cal = [bert_batch(4, 16, i) for i in range(1, 3)]
    gm, pm, ctx = run_passes(bert, bert_batch(2, 16, 0), FRONT, calibration=cal,
                             config=QuantConfig(target_sqnr_db=None, smoothquant_alpha=0.5))
    b = bert_batch(3, 16, 9)
    out, ref = gm(b["input_ids"], b["attention_mask"]), bert(**b)
    assert rel_err(out[0], ref.last_hidden_state) <= 1e-5 and rel_err(out[1], ref.pooler_output) <= 1e-5
    # every LayerNorm output also feeds a residual (post-LN) and FFN2 reads a GELU: explicit rescales,
    # one per distinct input (q/k/v share theirs); the attention-output projection's 1/s goes into the
    # value projection's rows (attention mixes tokens, not channels)
    assert pm.records[-1].stats == {"layers_smoothed": 7, "folded_linear": 1, "explicit_rescales": 4}
    report = ctx.notes["smooth_quant"]
    out_proj = next(k for k in report if k.endswith("attention.output.dense"))
    assert report[out_proj]["folded_into"] == "linear " + out_proj.replace("output.dense", "self.value")


def test_per_layer_alpha_override_and_opt_out(block):
    cfg = dict(smoothquant_alpha=0.5, overrides={"fc2": {"smoothquant_alpha": 0.8}, "head*": {"smoothquant": False}})
    _, _, ctx = smoothed(block, data(1)[0], data(2, 1), **cfg)
    report = ctx.notes["smooth_quant"]
    assert report["fc2"]["alpha"] == 0.8 and report["fc1"]["alpha"] == 0.5
    assert "head1" not in report and "head2" not in report
    with pytest.raises(lowbit.QuantConfigError, match="smoothquant_alpha"):
        QuantConfig(smoothquant_alpha=1.5)


def test_one_shot_iterator_is_materialised_once(block):
    gm, pm, ctx = smoothed(block, data(1)[0], iter(data(3, 1)), smoothquant_alpha=0.5)
    assert isinstance(ctx.calibration, list) and len(ctx.calibration) == 3  # calibrate can read it again


class OutlierMLP(nn.Module):
    """LayerNorm -> up -> GELU -> down, with two LayerNorm channels 50x the rest and three GELU channels
    20x: static per-tensor int8 activations lose the other channels to these few."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        with torch.no_grad():
            self.ln.weight[:2] = 50.0
            self.up.weight[:3] *= 20.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.ln(x))))


def test_smoothquant_improves_w8a8_on_planted_outliers():
    torch.manual_seed(0)
    model = OutlierMLP().eval()
    cal = data(8, 1)
    plain = lowbit.compile(model, cal[0], calibration=cal, progress=False,
                           config=QuantConfig(smoothquant=False, target_sqnr_db=None))
    smooth = lowbit.compile(model, cal[0], calibration=cal, progress=False, config=QuantConfig(target_sqnr_db=None))
    for (x,) in data(2, 7):
        before, after = sqnr(model(x), plain(x)), sqnr(model(x), smooth(x))
        assert after >= before + 6.0, (before, after)
    assert "smooth_quant" in smooth.report.sections and "smooth" in str(smooth.report)


def test_artifact_reapplies_the_same_smoothing(block, tmp_path):
    q = lowbit.compile(block, data(1)[0], calibration=data(4, 1), progress=False,
                       config=QuantConfig(target_sqnr_db=None))
    assert any(k.endswith(".smooth_scale") for k in q.state["qparams"])
    reloaded = lowbit.load(q.save(tmp_path / "a"), model=block)
    x = torch.randn(2, 10, 32)
    assert torch.equal(reloaded(x), q(x))
