"""The KV-cache step graph of a Hugging Face causal LM: one graph for prefill and for decode steps.

A decoder is captured as a function of its cache (tensors in, tensors out)::

    step(input_ids [B, S], attention_mask [B, S], past_mask [B, P], logits_index [K],
         past_key_0 [B, H, P, D], past_value_0 [B, H, P, D], ...)
      -> logits [B, K, V], present_key_0 [B, H, P + S, D], present_value_0 [B, H, P + S, D], ...

- ``attention_mask`` masks the new tokens (left padding of a batch of prompts), ``past_mask`` the cached
  ones; position ids are counted from the two masks (``sum(past_mask) + cumsum(attention_mask) - 1``),
  as Hugging Face's ``generate`` counts them for left-padded batches.
- ``logits_index`` picks the positions whose logits are computed (``logits_to_keep``): all of them when the
  model is called for perplexity, the last one during generation, so the output projection (a fifth of a
  small LLM's weights) runs once per sequence in prefill, not once per prompt token.
- The cache always holds at least one slot: a prefill passes one masked slot of zeros as its past. So
  prefill and decode are the same graph (one plan, one set of quantized weights, one engine) with every
  dim dynamic and none that can be zero (engines and torch.export both treat 0-sized dims specially). The
  masked slot is exact: its attention weight is exp(-inf) = 0.

The graph is captured with torch.export as it is for any model and goes through the same passes; a causal
LM is compiled twice: once over whole sequences (calibration, GPTQ/AWQ, the perplexity plan), then this
step graph *re-applying* that plan and its qparams, as loading a recipe does (``ctx.qparams``), so both
graphs compute with the same codes. The step module shares the model's submodules under the same names,
so layer names, and so plans and qparams, are the same in both.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import CaptureError

#: the step graph's inputs before the cache, in order
STEP_INPUTS = ("input_ids", "attention_mask", "past_mask", "logits_index")


@dataclass(frozen=True)
class CacheLayout:
    """What a decoding loop needs to know about the step graph (stored in the artifact's manifest)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_positions: int | None
    vocab_size: int
    eos_token_id: list[int]
    pad_token_id: int | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_names(layers: int) -> list[str]:
    return [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):  # transformers >= 5.x names it ``cache``
        if name in params:
            return name
    raise CaptureError(f"{type(model).__name__}.forward takes no KV cache (neither 'cache' nor 'past_key_values')")


def _new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_layout(model: torch.nn.Module) -> CacheLayout:
    """Run the model once on two tokens with a cache and read the cache's shapes (any attention layout:
    GQA, MQA, GPT-2's fused qkv) instead of trusting config field names."""
    config = model.config
    cache = _new_cache(model)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise CaptureError(f"{type(model).__name__}: its cache is not a per-layer key/value cache; lowbit's decode "
                           "graph supports decoder-only transformers with a DynamicCache (Llama, Mistral, Qwen2, "
                           "GPT-2, ...)")
    k = layers[0].keys
    eos = config.eos_token_id
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    gen = getattr(model, "generation_config", None)
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return CacheLayout(layers=len(layers), kv_heads=int(k.shape[1]), head_dim=int(k.shape[3]),
                       dtype=str(k.dtype).replace("torch.", ""), max_positions=int(max_pos) if max_pos else None,
                       vocab_size=int(out.logits.shape[-1]), eos_token_id=eos_ids,
                       pad_token_id=None if pad is None else int(pad))


class _Step(torch.nn.Module):
    """The model as a function of its cache. Registered children are the model's own, so parameter names
    are unchanged (``model.layers.0.self_attn.q_proj.weight``)."""

    def __init__(self, lm: torch.nn.Module, layers: int) -> None:
        super().__init__()
        # not a child (its children are registered here directly), and held weakly: the step module is kept
        # beside its model (``_STEPS``) and must not keep it alive
        self.__dict__["_lm_ref"] = weakref.ref(lm)
        for name, child in lm.named_children():
            self.add_module(name, child)
        self._layers = layers
        self._cache_kwarg = _cache_kwarg(lm)

    @property
    def _lm(self) -> torch.nn.Module:
        lm = self.__dict__["_lm_ref"]()
        if lm is None:
            raise CaptureError("the model of this step graph was deleted")
        return lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_mask: torch.Tensor,
                logits_index: torch.Tensor, **past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = _new_cache(self._lm)
        for i, layer in enumerate(cache.layers):
            k, v = past[f"past_key_{i}"], past[f"past_value_{i}"]
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        mask = torch.cat([past_mask, attention_mask], dim=1)
        positions = (past_mask.sum(-1, keepdim=True) + attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self._lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=logits_index, **{self._cache_kwarg: cache})
        presents: list[torch.Tensor] = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


#: model -> (its cache layout, its step module): the same step module for every compile of one model, so the
#: capture cache (lowbit.compiler.capture) finds its program again (~15 s of torch.export for SmolLM2-135M)
_STEPS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[CacheLayout, torch.nn.Module]] = weakref.WeakKeyDictionary()


def step_module(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]],
                                                 dict[str, tuple[int, int | None]], CacheLayout]:
    """(step module, example inputs by name, dynamic_shapes, dim bounds, cache layout) of a causal LM."""
    model = model.eval()
    layout = cache_layout(model)
    names = cache_names(layout.layers)
    kept = _STEPS.get(model)
    if kept is not None and kept[0] == layout and dict(kept[1].named_children()) == dict(model.named_children()):
        module = kept[1]
    else:
        cls = type(f"{type(model).__name__}Step", (_Step,), {})
        kinds = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params = [inspect.Parameter(n, kinds) for n in ("self", *STEP_INPUTS, *names)]
        # a subclass per model: the signature with this model's cache names lives on it, not on _Step
        cls.forward = _with_signature(_Step.forward, inspect.Signature(params))
        module = cls(model, layout.layers)
        _STEPS[model] = (layout, module)
    b, s, p, k = 2, 5, 3, 2  # all >= 2 (torch.export specialises sizes 0 and 1) and all different
    dtype = getattr(torch, layout.dtype)
    example: dict[str, torch.Tensor] = {
        "input_ids": torch.randint(0, layout.vocab_size, (b, s)),
        "attention_mask": torch.ones(b, s, dtype=torch.long),
        "past_mask": torch.ones(b, p, dtype=torch.long),
        "logits_index": torch.arange(s - k, s),
    }
    gen = torch.Generator().manual_seed(0)
    for n in names:
        example[n] = torch.randn(b, layout.kv_heads, p, layout.head_dim, generator=gen, dtype=dtype)
    dynamic: dict[str, dict[int, str]] = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"},
                                          "past_mask": {1: "past"}, "logits_index": {0: "keep"}}
    dynamic.update({n: {2: "past"} for n in names})
    top = layout.max_positions
    bounds: dict[str, tuple[int, int | None]] = {"seq": (1, top), "past": (1, top), "keep": (1, top)}
    return module, example, dynamic, bounds, layout


def _with_signature(fn: Any, sig: inspect.Signature) -> Any:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(self, *args, **kwargs)
        a = bound.arguments
        past = {n: a[n] for n in list(a)[1 + len(STEP_INPUTS):]}
        return fn(self, *(a[n] for n in STEP_INPUTS), **past)

    forward.__signature__ = sig  # type: ignore[attr-defined]
    return forward
