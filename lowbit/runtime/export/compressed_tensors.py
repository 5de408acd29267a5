"""compressed-tensors checkpoints: what vLLM, llm-compressor and ``transformers`` load.

A Hugging Face model directory (``config.json`` + ``model.safetensors``) whose ``config.json`` carries a
``quantization_config`` with ``quant_method: "compressed-tensors"``. Per quantized linear ``<m>``:

- ``pack-quantized`` (weight-only, W4A16 / W8A16): ``<m>.weight_packed`` int32 ``[out, ceil(in * bits / 32)]``,
  codes in the *signed* range (``q - 2^(bits-1)`` for an unsigned lowbit code) offset back to unsigned and
  packed densely, element ``i`` of 32 at bit ``i * bits`` (compressed_tensors' ``pack_to_int32``);
  ``<m>.weight_scale`` ``[out, in / group]`` (group), ``[out, 1]`` (channel) or ``[1]`` (tensor);
  ``<m>.weight_zero_point`` (asymmetric only) packed the same way along the output dim; ``<m>.weight_shape``.
- ``int-quantized`` (W8A8): ``<m>.weight`` int8, ``<m>.weight_scale``, ``weight_zero_point`` when asymmetric;
  dynamic per-token activations in the config, or static per-tensor ``<m>.input_scale`` /
  ``<m>.input_zero_point``.

Dequantization is ``(q - zp) * scale`` in both conventions, so shifting code and zero point by the same offset is
exact: the checkpoint holds lowbit's codes, not a re-quantization. Layers with one scheme share a config group
(targets: their module names); ``mixed-precision`` names each group's format when they differ. Float layers are
listed in ``ignore``. Every other parameter is written in float32 under its own name, as the compiled graph
computes with it (SmoothQuant/AWQ folds applied, int8 embedding rows dequantized); an ``lm_head`` quantized apart
from its tied embedding table unties them (``tie_word_embeddings: false``).

Activation conventions differ for W8A8: compressed-tensors' dynamic per-token scale is ``absmax / 127.5``,
lowbit's (and PyTorch's ``choose_qparams_per_token``) ``absmax / 127``; the weights are bit-exact either way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import ExportError
from lowbit.runtime.artifact import save_tensors, write_artifact
from lowbit.runtime.export.view import CheckpointView, QuantizedLinear

FORMAT = "compressed-tensors"
STRATEGIES = {"per_tensor": "tensor", "per_channel": "channel", "per_group": "group"}


def pack_to_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit codes (int8) -> int32, 32 codes per ``bits`` words along ``dim``, no padding bits
    between codes: code ``i`` of a run of 32 lands at bit ``i * bits`` (it may straddle two words). The codes
    are offset by ``2^(bits-1)`` first (stored unsigned). ``dim`` 0 packs columns (zero points)."""
    # assumes codes in [-2^(bits-1), 2^(bits-1)); a 2-D tensor
    if codes.dtype != torch.int8 or codes.ndim != 2:
        raise ValueError(f"pack_to_int32 takes 2-D int8 codes, got {codes.dtype} {tuple(codes.shape)}")
    v = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    padded = math.ceil(cols / 32) * 32
    v = torch.nn.functional.pad(v, (0, padded - cols)).reshape(rows, padded // 32, 32)
    start = torch.arange(32, dtype=torch.int64) * bits  # bit offset of each code within its run of 32
    words = torch.zeros(rows, padded // 32, bits, dtype=torch.int64)
    words.scatter_add_(2, (start // 32).expand(rows, padded // 32, 32), (v << (start % 32)) & 0xFFFFFFFF)
    spill = (start % 32) + bits - 32  # bits of a code that run into the next word
    over = spill > 0
    if bool(over.any()):
        words.scatter_add_(2, (start[over] // 32 + 1).expand(rows, padded // 32, int(over.sum())),
                           v[..., over] >> (bits - spill[over]))
    out = words.reshape(rows, -1)[:, :math.ceil(cols * bits / 32)]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the same bits as a signed int32
    return (out.t() if dim == 0 else out).contiguous()


def unpack_from_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_to_int32`: int8 codes of ``shape``."""
    p = (packed.t() if dim == 0 else packed).to(torch.int64) & 0xFFFFFFFF
    rows, cols = (shape[1], shape[0]) if dim == 0 else shape
    padded = math.ceil(cols / 32) * 32
    words = torch.nn.functional.pad(p, (0, padded // 32 * bits - p.shape[1])).reshape(rows, padded // 32, bits)
    start = torch.arange(32, dtype=torch.int64) * bits
    lo = torch.gather(words, 2, (start // 32).expand(rows, padded // 32, 32)) >> (start % 32)
    hi_idx = torch.clamp(start // 32 + 1, max=bits - 1)
    hi = torch.gather(words, 2, hi_idx.expand(rows, padded // 32, 32)) << (32 - start % 32)
    spill = ((start % 32) + bits > 32)
    v = (torch.where(spill, lo | hi, lo) & ((1 << bits) - 1)).reshape(rows, padded)[:, :cols]
    codes = (v - (1 << (bits - 1))).to(torch.int8)
    return (codes.t() if dim == 0 else codes).contiguous()


def signed_codes(q: torch.Tensor, dtype: str) -> torch.Tensor:
    """lowbit's codes (any integer tensor) in compressed-tensors' signed int8 range: an unsigned code (and its
    zero point) loses 2^(bits-1); a signed one is as it is."""
    offset = {"uint4": 8, "uint8": 128}.get(dtype, 0)
    return (q.to(torch.int16) - offset).to(torch.int8)


def _args(spec: Any, *, activation: bool = False) -> dict[str, Any]:
    if activation and spec.dynamic:
        return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
                "block_structure": None, "dynamic": True, "actorder": None, "observer": None, "observer_kwargs": {}}
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "group_size": spec.group_size if spec.granularity == "per_group" else None,
            "strategy": STRATEGIES[spec.granularity], "block_structure": None, "dynamic": False,
            "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def layer_format(layer: QuantizedLinear) -> str:
    if layer.activation is not None:
        if layer.spec.bits != 8 or layer.activation.outlier_threshold is not None:
            raise ExportError(f"layer {layer.name!r}: {layer.scheme} ({layer.spec.describe()}) has no compressed-tensors "
                              "scheme (int-quantized holds int8 weights with int8 per-token or per-tensor "
                              "activations; LLM.int8()'s outlier split has none): use a w8a8/w8a8_dynamic, "
                              "w8a16 or w4a16 plan for it")
        return "int-quantized"
    return "pack-quantized"


def describe(layer: QuantizedLinear) -> str:
    """The format's representation of one layer, as the report names it: 'pack-quantized int4 g64'."""
    s = layer.spec
    gran = {"per_group": f"g{s.group_size}", "per_channel": "per-channel", "per_tensor": "per-tensor"}[s.granularity]
    sym = "" if s.symmetric else " asym"
    act = ""
    if layer.activation is not None:
        act = " + int8 per-token activations" if layer.activation.dynamic else " + int8 static activations"
    return f"{layer_format(layer)} int{s.bits}{sym} {gran}{act}"


def _layer_tensors(layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    s, m = layer.spec, layer.name
    shape = tuple(layer.codes.shape)
    if len(shape) != 2:
        raise ExportError(f"layer {m!r}: weight of shape {shape} is not a linear's [out, in]")
    q = signed_codes(layer.codes, s.dtype)
    scale = layer.scale.float()
    zp = signed_codes(layer.zero_point, s.dtype)
    if s.granularity == "per_channel":
        scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
    elif s.granularity == "per_tensor":
        scale, zp = scale.reshape(1), zp.reshape(1)
    out: dict[str, torch.Tensor] = {f"{m}.weight_scale": scale}
    if layer_format(layer) == "int-quantized":
        out[f"{m}.weight"] = q
        if not s.symmetric:
            out[f"{m}.weight_zero_point"] = zp
        if layer.activation is not None and not layer.activation.dynamic:
            out[f"{m}.input_scale"] = layer.input_scale.float().reshape(1)
            out[f"{m}.input_zero_point"] = signed_codes(layer.input_zero_point.reshape(1), layer.activation.dtype)
        return out
    out[f"{m}.weight_packed"] = pack_to_int32(q, s.bits)
    out[f"{m}.weight_shape"] = torch.tensor(shape, dtype=torch.int64)
    if not s.symmetric:
        out[f"{m}.weight_zero_point"] = pack_to_int32(zp.reshape(shape[0], -1), s.bits, dim=0)
    return out


def quantization_config(view: CheckpointView) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for name, layer in view.quantized.items():
        act = layer.activation
        scheme = {"weights": _args(layer.spec), "input_activations": _args(act, activation=True) if act else None,
                  "output_activations": None, "format": layer_format(layer)}
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(name)
    formats = {g["format"] for g in groups.values()}
    linears = [m for m, kind in view.source.modules.items() if kind == "Linear"]
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": [m for m in linears if m not in view.quantized],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def tensor_parallel_sizes(config: Any, quantized: dict[str, QuantizedLinear], largest: int = 16) -> list[int]:
    """The tensor-parallel sizes vLLM can split this checkpoint over (``--tensor-parallel-size``).

    vLLM splits the attention heads (query heads divisible by the size; key/value heads too, or the size a
    multiple of them, which replicates them) and the MLP's intermediate dim; the row-parallel linears (the
    attention output and down projections) are split along their *input* dim, so each shard's slice of a
    grouped weight must be a whole number of groups: ``in_features / size`` a multiple of the group size."""
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    inter = int(getattr(config, "intermediate_size", 0) or 0)
    sizes = []
    for t in range(1, largest + 1):
        if not heads or heads % t or (kv % t if kv >= t else t % kv) or (inter and inter % t):
            continue
        ok = True
        for name, layer in quantized.items():
            if name.endswith(("o_proj", "down_proj")) and layer.spec.granularity == "per_group":
                width = layer.codes.shape[1]
                ok &= width % t == 0 and (width // t) % int(layer.spec.group_size or 1) == 0
        if ok:
            sizes.append(t)
    return sizes


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write(view: CheckpointView, directory: str | Path, representation: dict[str, str],
          dtype: str = "float32") -> None:
    """Write the checkpoint (atomically: a temp dir renamed into place); fills ``representation`` (layer ->
    what the format holds) before anything is written. ``dtype``: of the float tensors and scales ("float32":
    exactly what lowbit computes with; "bfloat16"/"float16": the dtype vLLM serves in, half the float bytes, scales
    rounded to it)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: compressed-tensors export writes {', '.join(DTYPES)}")
    config = view.source.config
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError("compressed-tensors export needs a Hugging Face model (its config.json is part of the "
                          "checkpoint); this model has no .config")
    tensors: dict[str, torch.Tensor] = {}
    for layer in view.quantized.values():
        tensors.update(_layer_tensors(layer))
    tensors.update(view.tensors)
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    cfg = config.to_dict()
    tied = _tied_pairs(view)
    cfg["tie_word_embeddings"] = bool(tied) and all(
        a in tensors and b in tensors and torch.equal(tensors[a], tensors[b]) for a, b in tied)
    if cfg["tie_word_embeddings"]:
        for _, b in tied:
            tensors.pop(b, None)
    cfg["quantization_config"] = quantization_config(view)
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    representation.update({name: describe(layer) for name, layer in view.quantized.items()})

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        save_tensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        tok = view.tokenizer
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(tmp))

    write_artifact(directory, fill, {"kind": "checkpoint", "checkpoint_format": FORMAT, "layers": representation,
                                     "tensor_parallel_sizes": tensor_parallel_sizes(config, view.quantized)})


def _tied_pairs(view: CheckpointView) -> list[tuple[str, str]]:
    """(embedding, output projection) name pairs the model ties."""
    pairs = []
    for name, names in view.source.aliases.items():
        if len(names) > 1 and name == names[0]:
            emb = [n for n in names if view.source.module_of(n) == "Embedding"]
            other = [n for n in names if n not in emb]
            pairs += [(emb[0], o) for o in other] if emb else []
    return pairs
