"""KV-cache decoding: the step graph, generate(), engines against the torch reference, artifacts.

A tiny random Llama (2 layers, GQA 4/2 heads) keeps each compile to seconds. Greedy tokens are compared
exactly; where an engine's rounding flips a token, the test finds the first divergence and requires it
to be a near-tie of the reference (top-2 logit margin under ``NEAR_TIE``), so a real defect cannot hide.
"""

from __future__ import annotations

import threading

import pytest
import torch

import lowbit
from lowbit.errors import InputError

from helpers import needs_engine

transformers = pytest.importorskip("transformers")

VOCAB = 128
NEAR_TIE = 0.05  # logits of this tiny model span ~+-1; an int8-activation kernel moves them by ~1e-2
CPU_TARGETS = ["torch", "onnxruntime-int8", "openvino-int8"]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init: fewer near-ties between random tokens
        model.lm_head.weight.mul_(4.0)
    return model


def _prompts(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n prompts of lengths 5..12, left-padded into one batch (pad id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5 + (i * 3) % 8 for i in range(n)]
    width = max(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, width - length:] = torch.randint(1, VOCAB, (length,), generator=g)
        mask[i, width - length:] = 1
    return ids, mask


def _config(scheme: str) -> lowbit.QuantConfig:
    extra = {"group_size": 32, "weight_granularity": "per_group"} if scheme == "w4a16" else {}
    return lowbit.QuantConfig(scheme=scheme, target_sqnr_db=None, target_ppl_increase=None, **extra)


_CACHE: dict[tuple[str, str], lowbit.CompiledModel] = {}


def _compiled(model, target: str, scheme: str):
    key = (target, scheme)
    if key not in _CACHE:
        ids, _ = _prompts(2)
        calibration = [(_prompts(4, seed=10 + i)[0],) for i in range(4)] if scheme == "w8a8" else None
        _CACHE[key] = lowbit.compile(model, (ids,), target=target, config=_config(scheme), calibration=calibration,
                                     progress=False)
    return _CACHE[key]


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(row, position) of the first token where a and b differ, or None."""
    diff = (a != b).nonzero()
    if len(diff) == 0:
        return None
    rows = diff[:, 0]
    first = min(range(len(diff)), key=lambda i: (int(diff[i, 1]), int(rows[i])))
    return int(diff[first, 0]), int(diff[first, 1])


def assert_greedy_match(reference, engine_tokens: torch.Tensor, ref_tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """Token for token, or the first divergence is a near-tie of the reference's logits there."""
    where = first_divergence(engine_tokens, ref_tokens)
    if where is None:
        return
    row, pos = where
    prefix = ref_tokens[row:row + 1, :pos]
    m = torch.cat([mask[row:row + 1], torch.ones(1, pos - mask.shape[1], dtype=torch.long)], dim=1)
    logits = reference(prefix, m)[0][0, -1]
    top2 = torch.topk(logits, 2).values
    margin = float(top2[0] - top2[1])
    assert margin < NEAR_TIE, (f"first divergence at row {row}, position {pos} (new token {pos - mask.shape[1]}): "
                               f"the reference's top-2 margin there is {margin:.4f}, not a near-tie")


def test_generate_float_matches_hugging_face(llama):
    """The step graph with every layer float (int8 embedding rows aside: float too here) gives Hugging Face's
    own greedy tokens for a left-padded batch of 8 prompts."""
    ids, mask = _prompts()
    cfg = lowbit.QuantConfig(scheme="float", embeddings="float", output_layer_scheme=None, target_sqnr_db=None,
                             target_ppl_increase=None)
    compiled = lowbit.compile(llama, (ids,), target="torch", config=cfg, progress=False)
    assert isinstance(compiled, lowbit.CausalLM)
    ours = compiled.generate(ids, attention_mask=mask, max_new_tokens=24)
    theirs = llama.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert ours.shape == (8, ids.shape[1] + 24)
    assert first_divergence(ours, theirs) is None
    # called like the model: the logits of every position, within float rounding of the model's own
    with torch.no_grad():
        ref = llama(ids, attention_mask=mask).logits
    out = compiled(ids, mask)[0]
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_left_padding_equals_one_prompt_at_a_time(llama):
    ids, mask = _prompts(4)
    compiled = _compiled(llama, "torch", "w8a16")
    batch = compiled.generate(ids, attention_mask=mask, max_new_tokens=12)
    for i in range(4):
        alone = compiled.generate(ids[i][mask[i].bool()][None], max_new_tokens=12)
        assert torch.equal(batch[i, -12:], alone[0, -12:]), f"prompt {i}"


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w8a8"])
@pytest.mark.parametrize("target", CPU_TARGETS[1:])
def test_engine_greedy_matches_torch_reference(llama, target, scheme):
    """8 prompts x 32 new tokens on the engine against the torch reference with the same plan; the engine's
    logits against the reference's: SQNR >= 25 dB (ORT's MatMulNBits runs int8 activations, OpenVINO bf16)."""
    needs_engine(target)
    ids, mask = _prompts()
    ref = _compiled(llama, "torch", scheme)
    eng = _compiled(llama, target, scheme)
    assert eng.plan == ref.plan
    r = ref.generate(ids, attention_mask=mask, max_new_tokens=32)
    e = eng.generate(ids, attention_mask=mask, max_new_tokens=32)
    assert_greedy_match(ref, e, r, mask)
    a, b = ref(ids, mask)[0][mask.bool()], eng(ids, mask)[0][mask.bool()]
    sqnr = 10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum())
    assert sqnr >= 25, f"{target} {scheme}: logits SQNR {float(sqnr):.1f} dB against the reference"


def test_onnxruntime_runs_int4_as_matmul_nbits(llama):
    needs_engine("onnxruntime-int8")
    eng = _compiled(llama, "onnxruntime-int8", "w4a16")
    # 7 linears x 2 layers at 4 bits, and lm_head (w8a16, per channel) as 8-bit blocks
    assert eng.report.sections["onnx_export"]["matmul_nbits"] == 15
    kernels = eng.step._runner.int8_layers(eng.state["weights"])
    assert len(kernels) == 15 and all(k["kernel"].startswith("MatMulNBits(") for k in kernels.values()), kernels
    four = {k: v for k, v in kernels.items() if k != "lm_head"}
    # int8 activations on VNNI (accuracy level 4), the 8-bit output projection (per channel) in 8-bit blocks
    assert all(v["weights"] == "int4 g32" and v["int8"] for v in four.values()), four
    assert kernels["lm_head"]["weights"] == "int8 g64" and kernels["lm_head"]["int8"]
    assert "int4 g32 in MatMulNBits(accuracy_level=4)" in str(eng.report)


def test_openvino_keeps_int4_weights_compressed(llama):
    needs_engine("openvino-int8")
    eng = _compiled(llama, "openvino-int8", "w4a16")
    layers = eng.report.sections["engine"]["layers"]
    four = [n for n, spec in eng.plan["layers"].items() if spec["scheme"] == "w4a16"]
    assert len(four) == 14
    assert all(layers[n]["weights"] == "int4" and layers[n]["kernel"].startswith("FullyConnected") for n in four), layers


def test_streamer_gets_prompt_then_tokens(llama):
    compiled = _compiled(llama, "torch", "w8a16")
    ids, _ = _prompts(1)
    seen: list[torch.Tensor] = []
    ended: list[bool] = []

    class Streamer:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            ended.append(True)

    out = compiled.generate(ids, max_new_tokens=6, streamer=Streamer())
    assert torch.equal(seen[0], ids) and len(seen) == 7 and ended == [True]
    assert torch.equal(torch.stack([s for s in seen[1:]], dim=1), out[:, ids.shape[1]:])


def test_sampling(llama):
    compiled = _compiled(llama, "torch", "w8a16")
    ids, mask = _prompts(2)
    greedy = compiled.generate(ids, attention_mask=mask, max_new_tokens=8)
    top1 = compiled.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1)
    assert torch.equal(greedy, top1)
    a = compiled.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9,
                          generator=torch.Generator().manual_seed(3))
    b = compiled.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9,
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_eos_stops_and_pads(llama):
    compiled = _compiled(llama, "torch", "w8a16")
    ids, mask = _prompts(2)
    free = compiled.generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, ids.shape[1] + 2])  # row 0's third new token ends row 0
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=7)
    row0 = out[0, ids.shape[1]:]
    stop = int((row0 == eos).nonzero()[0])
    assert stop <= 2 and bool((row0[stop + 1:] == 7).all())


def test_bad_inputs_are_named(llama):
    compiled = _compiled(llama, "torch", "w8a16")
    with pytest.raises(InputError, match=r"token id 128 at position \[0, 3\].*\[0, 128\)"):
        compiled.generate(torch.tensor([[1, 2, 3, VOCAB]]), max_new_tokens=2)
    with pytest.raises(InputError, match="token id -1"):
        compiled(torch.tensor([[1, -1, 3]]), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(InputError, match="exceeds the model's 96 positions"):
        compiled.generate(torch.ones(1, 90, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(InputError, match="integer"):
        compiled.generate(torch.ones(1, 3), max_new_tokens=2)


@pytest.mark.parametrize("target", ["onnxruntime-int8", "openvino-int8"])
def test_saved_engine_generates_without_the_model(llama, tmp_path, target):
    needs_engine(target)
    eng = _compiled(llama, target, "w4a16")
    ids, mask = _prompts(3)
    before = eng.generate(ids, attention_mask=mask, max_new_tokens=16)
    eng.save(tmp_path / "lm")
    loaded = lowbit.load(tmp_path / "lm")
    assert isinstance(loaded, lowbit.CausalLM) and loaded.layout == eng.layout
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=16), before)
    torch.testing.assert_close(loaded(ids, mask)[0], eng(ids, mask)[0])


def test_torch_recipe_reloads_onto_the_model(llama, tmp_path):
    ref = _compiled(llama, "torch", "w4a16")
    ids, mask = _prompts(3)
    ref.save(tmp_path / "recipe")
    loaded = lowbit.load(tmp_path / "recipe", model=llama)
    assert isinstance(loaded, lowbit.CausalLM)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=16),
                       ref.generate(ids, attention_mask=mask, max_new_tokens=16))


def test_tokenizer_travels_with_the_artifact(llama, tmp_path):
    needs_engine("onnxruntime-int8")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    ids, _ = _prompts(2)
    eng = lowbit.compile(llama, (ids,), target="onnxruntime-int8", config=_config("w8a16"), tokenizer=fast,
                         progress=False)
    eng.save(tmp_path / "lm")
    loaded = lowbit.load(tmp_path / "lm")
    prompt = loaded.tokenizer("w5 w9 w17", return_tensors="pt").input_ids
    assert prompt.tolist() == [[5, 9, 17]]
    out = loaded.generate(prompt, max_new_tokens=4)
    assert loaded.tokenizer.decode(out[0, :3]) == "w5 w9 w17"


def test_threads_keep_their_own_cache(llama):
    needs_engine("onnxruntime-int8")
    eng = _compiled(llama, "onnxruntime-int8", "w8a16")
    ids, mask = _prompts(8)
    serial = [eng.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=12) for i in range(8)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = eng.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=12)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised by the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[i], serial[i]) for i in range(8))
