"""GGUF checkpoints: what llama.cpp (and Ollama, LM Studio, llama-cpp-python) load. Llama architecture.

Blocks of 32 weights along the input dim, one fp16 scale each (llama.cpp's ``ggml-common.h``)::

    Q8_0  34 bytes: d, int8 q[32]                      w = q * d            <- lowbit int8  sym g32
    Q4_0  18 bytes: d, uint8 qs[16]                    w = (nibble - 8) * d <- lowbit int4  sym g32
    Q4_1  20 bytes: d, m, uint8 qs[16]                 w = nibble * d + m   <- lowbit uint4 asym g32
                    qs[j] = code[j] | code[j + 16] << 4   (low nibbles: the block's first 16 codes)

lowbit's codes go in as they are (an int4 code c is the nibble c + 8; a uint4 code q with zero point z is
``q * d + m`` with ``m = -z * d``); the scales are rounded to fp16, the one change (relative 2^-11 per block).
Any other weight scheme is an ExportError naming the layer and the schemes GGUF can hold. Float layers and the
norms are F32. An embedding table the compiled graph reads as int8 rows (one scale per row) is written Q8_0 of
those rows: 32-wide blocks of the same values, each with its own scale, so the rows it restores are at least as
close (the report says "Q8_0 (int8 rows re-blocked)").

Names and layout follow llama.cpp's ``convert_hf_to_gguf.py``: ``token_embd``, ``blk.N.attn_q`` ... ``output``;
the query and key projections' rows are permuted from Hugging Face's rotate-half RoPE layout to GGUF's
interleaved pairs (``permute``: a reordering of output rows, so the codes and their per-row group scales move
together, exactly). The tokenizer is copied from a GGUF file (the one the model came from) or written from a
Hugging Face fast tokenizer's BPE model (vocabulary, merges, special tokens, pre-tokenizer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import ExportError
from lowbit.runtime.artifact import write_artifact
from lowbit.runtime.export.view import CheckpointView, QuantizedLinear

FORMAT = "gguf"
ARCHITECTURES = ("llama",)  # Hugging Face model_type values this writer maps to llama.cpp architectures
BLOCK = 32
FILE = "model.gguf"
HOLDS = "Q8_0 (int8 sym g32), Q4_0 (int4 sym g32), Q4_1 (uint4 asym g32) or float"

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _NAMES:
        return _NAMES[hf]
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise ExportError(f"parameter {hf!r} has no place in a llama GGUF (llama.cpp's llama architecture holds "
                      "embeddings, attention q/k/v/o, gated MLP, RMSNorm and output)")


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half RoPE row order -> GGUF's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- blocks ---------------------------------------------------------------------------------------------
def ggml_type(layer: QuantizedLinear) -> str:
    s = layer.spec
    fits = s.granularity == "per_group" and s.group_size == BLOCK
    if fits and s.dtype == "int8" and s.symmetric:
        return "Q8_0"
    if fits and s.dtype == "int4" and s.symmetric:
        return "Q4_0"
    if fits and s.dtype == "uint4" and not s.symmetric:
        return "Q4_1"
    raise ExportError(f"layer {layer.name!r}: {layer.scheme} weights {s.describe()} have no GGUF block type (GGUF "
                      f"holds {HOLDS}); compressed-tensors holds any lowbit weight scheme. Compile it with "
                      "group_size=32 (weight_granularity='per_group'), or export format='compressed-tensors'")


def _fp16(scale: torch.Tensor) -> np.ndarray:
    return scale.to(torch.float32).numpy().astype(np.float16)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, blocks, 32] codes 0..15 -> [rows, blocks, 16] bytes, code j low and code j+16 high."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def encode_blocks(kind: str, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> np.ndarray:
    """codes [rows, cols] with one scale (and zero point) per row and block of 32 -> uint8 [rows, bytes/row]."""
    rows, cols = codes.shape
    if cols % BLOCK:
        raise ExportError(f"a row of {cols} weights is not a whole number of {BLOCK}-blocks")
    nb = cols // BLOCK
    d = _fp16(scale.reshape(rows, nb)).view(np.uint8).reshape(rows, nb, 2)
    q = codes.reshape(rows, nb, BLOCK).to(torch.int16).numpy()
    if kind == "Q8_0":
        body = q.astype(np.int8).view(np.uint8)
        parts = [d, body]
    elif kind == "Q4_0":
        parts = [d, _nibbles((q + 8).astype(np.uint8))]
    elif kind == "Q4_1":
        m = _fp16(-(zero_point.reshape(rows, nb).double() * scale.reshape(rows, nb).double())).view(np.uint8)
        parts = [d, m.reshape(rows, nb, 2), _nibbles(q.astype(np.uint8))]
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))


def q8_0_of_rows(w: torch.Tensor) -> np.ndarray:
    """Q8_0 of a float table (llama.cpp's reference quantizer: d = max|block| / 127, q = round(w / d))."""
    rows, cols = w.shape
    blocks = w.double().reshape(rows, cols // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127.0
    q = torch.where(d[..., None] > 0, torch.round(blocks / d[..., None].clamp_min(1e-300)), 0.0).to(torch.int8)
    return encode_blocks("Q8_0", q.reshape(rows, cols), d.float(), torch.zeros_like(d))


# -- the model ------------------------------------------------------------------------------------------
def _config_value(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ExportError(f"RoPE scaling {kind!r}: the GGUF writer handles unscaled RoPE only")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def check_architecture(cfg: Any) -> str:
    arch = getattr(cfg, "model_type", None)
    if arch not in ARCHITECTURES:
        raise ExportError(f"GGUF export writes the {', '.join(ARCHITECTURES)} architecture; this model is "
                          f"{arch or type(cfg).__name__!r}. Export format='compressed-tensors' instead")
    return str(arch)


def write(view: CheckpointView, directory: str | Path, representation: dict[str, str],
          tokenizer: Any = None, name: str | None = None) -> None:
    """Write ``directory/model.gguf``. ``tokenizer``: a GGUF file to copy the tokenizer from (the model's
    source file), or a Hugging Face tokenizer (default: the one given to compile)."""
    import gguf

    cfg = view.source.config
    arch = check_architecture(cfg)
    heads, kv_heads = int(cfg.num_attention_heads), int(_config_value(cfg, "num_key_value_heads",
                                                                         default=cfg.num_attention_heads))
    hidden = int(cfg.hidden_size)
    head_dim = int(_config_value(cfg, "head_dim", default=hidden // heads))
    types = {n: ggml_type(layer) for n, layer in view.quantized.items()}  # every refusal before writing

    tensors: dict[str, tuple[np.ndarray, str]] = {}  # gguf name -> (array, ggml type)
    for hf_name in [*view.tensors, *(f"{n}.weight" for n in view.quantized)]:
        gname = gguf_name(hf_name)
        rows_heads = heads if ".attn_q." in gname else kv_heads if ".attn_k." in gname else None
        layer = view.quantized.get(hf_name[: -len(".weight")]) if hf_name.endswith(".weight") else None
        if layer is not None:
            codes, scale, zp = layer.codes, layer.scale, layer.zero_point
            if rows_heads:
                codes, scale, zp = (permute_rows(t, rows_heads) for t in (codes, scale, zp))
            kind = types[layer.name]
            tensors[gname] = (encode_blocks(kind, codes, scale, zp), kind)
            representation[layer.name] = f"{kind} (from {layer.spec.describe()})"
            continue
        t = view.tensors[hf_name].detach().float()
        if rows_heads:
            t = permute_rows(t, rows_heads)
        if hf_name in view.int8_embeddings and t.ndim == 2 and t.shape[1] % BLOCK == 0:
            tensors[gname] = (q8_0_of_rows(t), "Q8_0")
            representation[hf_name.rsplit(".", 1)[0]] = "Q8_0 (int8 rows re-blocked)"
        else:
            tensors[gname] = (t.numpy().astype(np.float32), "F32")
    tied = "lm_head.weight" in view.source.aliases.get("model.embed_tokens.weight", ())
    if tied and "output.weight" in tensors:
        # one table, as llama.cpp's converter writes a tied model (llama.cpp reads token_embd for the output):
        # the output projection's, so the lookup reads lm_head's codes (blocks of 32) instead of its int8 rows
        tensors["token_embd.weight"] = tensors.pop("output.weight")
        representation["model.embed_tokens"] = f"tied to lm_head ({tensors['token_embd.weight'][1]})"
    counts: dict[str, int] = {}
    for _, kind in tensors.values():
        counts[kind] = counts.get(kind, 0) + 1
    file_type = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    main = max((k for k in counts if k in file_type), key=lambda k: counts[k], default=None)

    def fill(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp / FILE), arch)
        w.add_name(name or str(getattr(cfg, "_name_or_path", "") or "lowbit model").rstrip("/").split("/")[-1])
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(hidden)
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(int(cfg.vocab_size))
        w.add_file_type(int(file_type[main] if main else gguf.LlamaFileType.ALL_F32))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("general.quantized_by", "lowbit")
        _write_tokenizer(w, tokenizer if tokenizer is not None else view.tokenizer, int(cfg.vocab_size))
        for gname, (arr, kind) in tensors.items():
            w.add_tensor(gname, arr, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_artifact(directory, fill, {"kind": "checkpoint", "checkpoint_format": FORMAT, "file": FILE,
                                     "layers": representation, "tensor_types": counts})


# -- tokenizer ------------------------------------------------------------------------------------------
def _write_tokenizer(w: Any, tokenizer: Any, vocab_size: int) -> None:
    if tokenizer is None:
        raise ExportError("GGUF export needs a tokenizer (llama.cpp reads it from the file): pass "
                          "tokenizer=<the model's .gguf file or a Hugging Face tokenizer>, or compile with tokenizer=")
    if isinstance(tokenizer, (str, os.PathLike)):
        _copy_tokenizer(w, Path(tokenizer), vocab_size)
    else:
        _bpe_tokenizer(w, tokenizer, vocab_size)


def _copy_tokenizer(w: Any, path: Path, vocab_size: int) -> None:
    import gguf

    if not path.is_file():
        raise ExportError(f"tokenizer {path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/struct errors on a bad file
        raise ExportError(f"tokenizer {path}: not a readable GGUF file ({e})") from e
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        n = None if tokens is None else len(tokens.data)
        raise ExportError(f"tokenizer {path}: holds {n} tokens, the model's vocabulary has {vocab_size}")
    for key, f in fields.items():
        value = f.contents()
        main = f.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, main, sub_type=f.types[-1])
        else:
            w.add_key_value(key, value, main)


def _bpe_tokenizer(w: Any, tokenizer: Any, vocab_size: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__}: not a Hugging Face fast tokenizer; pass the "
                          "model's GGUF file as tokenizer= to copy its vocabulary")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"tokenizer: a {model.get('type')} model{' with byte fallback' * bool(model.get('byte_fallback'))}"
                          "; the GGUF writer converts byte-level BPE (GPT-2 style) tokenizers; pass the model's GGUF "
                          "file as tokenizer= to copy its vocabulary")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = bool(t.get("special"))
    if len(vocab) > vocab_size:
        raise ExportError(f"tokenizer: {len(vocab)} tokens, the model's vocabulary has {vocab_size}")
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(3 if special.get(i) else 4 if i in special else 1)  # CONTROL, USER_DEFINED, NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            add(tid)
    w.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


def _pre_tokenizer(pre: Any) -> str:
    """llama.cpp's name for a fast tokenizer's pre-tokenizer: 'gpt-2' (byte-level regex split), 'smollm'
    (single digits, then GPT-2's split); anything else 'default' (llama.cpp's GPT-2-like default)."""
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return "default"
