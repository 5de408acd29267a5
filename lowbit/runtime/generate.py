"""A compiled causal LM: called like the model (logits), and ``generate()`` with a KV cache.

The engine runs one graph (``lowbit.compiler.decode``): prefill over the prompt, then one-token decode
steps, the cache going in and out as tensors. This module is the loop around it (masks, positions, the
cache, greedy or sampled choice, end of sequence, streaming), with Hugging Face's ``generate``
conventions: the result is the prompt followed by the new tokens; finished rows are padded with
``pad_token_id``; a ``streamer`` gets ``put(prompt)``, then ``put(tokens)`` per step, then ``end()``.

Every call keeps its own cache in local variables, so one loaded model serves any number of threads.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import InputError
from lowbit.runtime import artifact
from lowbit.runtime.model import CompiledModel
from lowbit.runtime.signature import Signature

TOKENIZER_DIR = "tokenizer"


class CausalLM(CompiledModel):
    """A causal LM compiled for one target. ``model(input_ids, attention_mask)`` returns the logits as the
    original model does (its output structure, with the cache off); ``model.generate(...)`` decodes."""

    def __init__(self, step: CompiledModel, layout: dict[str, Any], signature: Signature,
                 tokenizer: Any = None, tokenizer_dir: Path | None = None) -> None:
        super().__init__(step.target, step._runner, signature, step._plan, step.report, None,
                         step.graph_module, step.options)
        self.step = step
        self.layout = dict(layout)
        self.state = step.state
        self._tokenizer = tokenizer
        self._tokenizer_dir = tokenizer_dir
        self._step_names = [s.name for s in step.signature.inputs]
        self._cache_names = self._step_names[4:]
        #: timings of the last generate() call on this thread's model object (not shared state: a dict
        #: replaced whole at the end of a call)
        self.last_generate: dict[str, float] = {}

    # -- the engine --------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, mask: torch.Tensor, past_mask: torch.Tensor, index: torch.Tensor,
             past: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # no autograd: a torch graph's outputs would otherwise chain every step's graph (and its dequantized
        # weights) through the cache
        with torch.no_grad():
            return list(self.step._runner([x, mask, past_mask, index, *past]))

    def _empty_cache(self, batch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One masked slot of zeros: a prefill's past (the step graph's cache is never empty)."""
        lay = self.layout
        z = torch.zeros(batch, lay["kv_heads"], 1, lay["head_dim"], dtype=getattr(torch, lay["dtype"]))
        return torch.zeros(batch, 1, dtype=torch.long), [z] * len(self._cache_names)

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        """The logits of every position, in the original model's output structure (cache off). Takes
        ``input_ids`` and an optional ``attention_mask`` (0 on left padding) whatever the example held."""
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k != "use_cache")
        if unknown:
            raise InputError(f"a compiled causal LM takes input_ids and attention_mask; got {unknown}")
        if input_ids is None:
            raise InputError("input_ids is required")
        ids = _as_long(input_ids, "input_ids")
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids: expected [batch, sequence >= 1], got shape {list(ids.shape)}")
        mask = None
        if attention_mask is not None:
            mask = _as_long(attention_mask, "attention_mask")
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask: shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
        top = self.layout.get("max_positions")
        if top is not None and ids.shape[1] > top:
            raise InputError(f"input_ids: sequence length {ids.shape[1]} exceeds the model's {top} positions")
        with torch.no_grad():
            return self.signature.unflatten(self._logits(ids, mask))

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        self._check_ids(ids, "input_ids")
        mask = torch.ones_like(ids) if mask is None else mask
        past_mask, past = self._empty_cache(ids.shape[0])
        outs = self._run(ids, mask, past_mask, torch.arange(ids.shape[1]), past)
        return [outs[0]]

    # -- generation --------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Prompt + up to ``max_new_tokens`` new tokens per row ([batch, prompt + new], int64).

        Greedy unless ``do_sample``; sampling applies ``temperature``, then ``top_k``, then ``top_p``, as
        Hugging Face's warpers do. A batch of prompts of different lengths is left-padded, with
        ``attention_mask`` 0 on the padding. Generation stops when every row has produced an end token
        (``eos_token_id``, default the model's) or after ``max_new_tokens``."""
        ids = _as_long(input_ids, "input_ids")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids: expected [batch, prompt length >= 1], got shape {list(ids.shape)}")
        self._check_ids(ids, "input_ids")
        batch, length = ids.shape
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = _as_long(attention_mask, "attention_mask")
            mask = mask[None] if mask.ndim == 1 else mask
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask: shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
            if bool((mask.sum(-1) == 0).any()):
                row = int((mask.sum(-1) == 0).nonzero()[0])
                raise InputError(f"attention_mask: row {row} masks every prompt token")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        top = self.layout.get("max_positions")
        if top is not None and length + max_new_tokens > top:
            raise InputError(f"prompt length {length} + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"{top} positions")
        if do_sample and temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
        eos = self.layout.get("eos_token_id", []) if eos_token_id is None else eos_token_id
        eos_ids = torch.tensor([int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])], dtype=torch.long)
        pad = pad_token_id if pad_token_id is not None else self.layout.get("pad_token_id")
        if pad is None:
            pad = int(eos_ids[0]) if len(eos_ids) else 0

        out = ids
        if streamer is not None:
            streamer.put(ids.cpu())
        t0 = time.perf_counter()
        engine = 0.0
        prefill = 0.0
        past_mask, past = self._empty_cache(batch)
        x, m, index = ids, mask, torch.tensor([length - 1])
        unfinished = torch.ones(batch, dtype=torch.bool)
        for step in range(max_new_tokens):
            e0 = time.perf_counter()
            outs = self._run(x, m, past_mask, index, past)
            engine += time.perf_counter() - e0
            if step == 0:
                prefill = time.perf_counter() - t0
            logits, past = outs[0][:, -1, :], outs[1:]
            past_mask = torch.cat([past_mask, m], dim=1)
            nxt = _choose(logits.float(), do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
            out = torch.cat([out, nxt[:, None]], dim=1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if len(eos_ids):
                unfinished &= ~torch.isin(nxt, eos_ids)
                if not bool(unfinished.any()):
                    break
            x, m, index = nxt[:, None], torch.ones(batch, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        if streamer is not None:
            streamer.end()
        total = time.perf_counter() - t0
        self.last_generate = {"total_s": total, "engine_s": engine, "prefill_s": prefill,
                              "new_tokens": float(out.shape[1] - length),
                              "overhead_share": (total - engine) / total if total > 0 else 0.0}
        return out

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{name}: token ids must be int64 or int32, got {ids.dtype}")
        vocab = int(self.layout["vocab_size"])
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise InputError(f"{name}: token id {int(ids[pos])} at position {list(pos)} is outside the vocabulary "
                             f"[0, {vocab})")

    # -- tokenizer and artifacts -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer given to compile(tokenizer=...) or saved in the artifact (None without one)."""
        if self._tokenizer is None and self._tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self._tokenizer_dir))
        return self._tokenizer

    def save(self, directory: str | os.PathLike[str]) -> Path:
        extra = {"causal_lm": {"layout": self.layout, "signature": self.signature.to_json()}}

        def write(tmp: Path) -> None:
            if self._tokenizer is not None and hasattr(self._tokenizer, "save_pretrained"):
                self._tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            elif self._tokenizer_dir is not None:
                shutil.copytree(self._tokenizer_dir, tmp / TOKENIZER_DIR)

        with artifact.extra_content(extra, write):
            return self.step.save(directory)

    @classmethod
    def from_artifact(cls, step: CompiledModel, manifest: dict[str, Any], directory: Path) -> CausalLM:
        info = manifest["causal_lm"]
        tok = artifact.inside(directory, TOKENIZER_DIR, "tokenizer directory")
        return cls(step, info["layout"], Signature.from_json(info["signature"]),
                   tokenizer_dir=tok if tok.is_dir() else None)

    def __repr__(self) -> str:
        return f"CausalLM(target={self.target!r}, layers={len(self._plan.layers)}, {self._plan.counts()})"


def _as_long(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{name}: expected integer tensors, got {t.dtype}")
    return t.to(torch.long)


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
