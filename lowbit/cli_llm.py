"""``lowbit quantize | eval | generate | bench``: the whole job from a shell (the ``lowbit`` command's LLM half).

Models come from local folders only (nothing is downloaded): a Hugging Face folder (``config.json`` and weights),
a ``.gguf`` file (its tokenizer inside), or ``package.module:factory`` returning any torch module (then
``--example-inputs FILE.safetensors``). Calibration text (``.txt``, ``.jsonl`` with a ``text`` field, or
``.safetensors`` holding ``input_ids``) is tokenized with the model's tokenizer into ``--samples`` windows of
``--seq-len`` tokens; without ``--calibration``, the calibration split of Python's ``pydoc_data.topics``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.runtime.progress import step


class CliError(LowbitError):
    """A command-line problem: a missing file or folder, a bad option value."""


# -- models and data -------------------------------------------------------------------------------------------
def check_model(spec: str) -> None:
    """The errors ``load_model`` can tell before loading anything (so they come before the progress line)."""
    path = Path(spec)
    if ":" in spec and not path.exists():
        return
    if not path.exists():
        raise CliError(f"MODEL {spec!r}: no such folder or file (lowbit reads local models only; nothing is downloaded)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise CliError(f"MODEL {spec!r}: a Hugging Face folder needs config.json")


def load_model(spec: str) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a folder, a .gguf file, or ``package.module:factory``."""
    import torch

    check_model(spec)
    path = Path(spec)
    if ":" in spec and not path.exists():
        module, _, factory = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), factory)
        except (ImportError, AttributeError) as e:
            raise CliError(f"MODEL {spec!r}: cannot import {factory!r} from {module!r} ({e})") from e
        return fn().eval(), None
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder, gguf = (str(path.parent), path.name) if path.is_file() else (str(path), None)
    kwargs = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(folder, **kwargs)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])) or gguf
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise CliError(f"MODEL {spec!r}: no tokenizer in the folder ({str(e).splitlines()[0][:120]})") from e
    return model, tokenizer


def text_windows(tokenizer: Any, source: Path | None, samples: int, seq_len: int) -> list[Any]:
    """``samples`` [1, seq_len] token windows from a text/jsonl/safetensors file (or the pydoc calibration split)."""
    import torch

    if source is not None and source.suffix == ".safetensors":
        from safetensors.torch import load_file

        ids = load_file(str(source)).get("input_ids")
        if ids is None:
            raise CliError(f"{source}: holds no 'input_ids' tensor")
        return [row[None, :seq_len].long() for row in ids[:samples]]
    if tokenizer is None:
        raise CliError("calibration text needs a tokenizer: the model folder has none (give --calibration "
                       "FILE.safetensors with input_ids)")
    if source is None:
        from lowbit.evaluate import pydoc_text

        text = pydoc_text("calibration")
    elif not source.is_file():
        raise CliError(f"--calibration {source}: no such file")
    elif source.suffix == ".jsonl":
        lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        text = "\n\n".join(str(x["text"]) for x in lines if isinstance(x, dict) and "text" in x)
    else:
        text = source.read_text()
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = min(samples, ids.numel() // seq_len)
    if n < 1:
        raise CliError(f"calibration text holds {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    return [ids[i * seq_len:(i + 1) * seq_len][None] for i in range(n)]


# -- commands --------------------------------------------------------------------------------------------------
def quantize(args: argparse.Namespace) -> int:
    import lowbit

    args.progress = _progress(args.progress)
    check_model(args.model)
    with step(f"loading {args.model}", args.progress, force=True):
        model, tokenizer = load_model(args.model)
    fields: dict[str, Any] = {"scheme": args.scheme or "w8a8"}
    if args.group_size:
        fields.update(group_size=args.group_size, weight_granularity="per_group")
    if args.export == "gguf" and args.group_size == 32:  # GGUF's output layer in Q8_0 blocks of 32 as well
        fields["overrides"] = {"lm_head": {"scheme": "w8a16", "weight_granularity": "per_group", "group_size": 32}}
    if args.weight_method:
        fields["weight_method"] = args.weight_method
    budget = args.target_ppl_increase
    if budget is None and args.scheme is not None:  # a scheme asked for by name: that scheme, no search
        budget = -1.0
    if budget is not None:
        fields["target_ppl_increase"] = None if budget < 0 else budget
        fields["target_sqnr_db"] = None
    config = lowbit.QuantConfig(**fields)
    if args.example_inputs:
        from safetensors.torch import load_file

        example: Any = load_file(str(args.example_inputs))
        calibration = [example]
    else:
        with step("tokenizing the calibration text", args.progress, force=True):
            calibration = text_windows(tokenizer, args.calibration, args.samples, args.seq_len)
        example = (calibration[0],)
    print(f"lowbit quantize: {type(model).__name__}, {len(calibration)} calibration windows, target {args.target}",
          flush=True)
    t0 = time.perf_counter()
    q = lowbit.compile(model, example, target=args.target, calibration=calibration, config=config,
                       dump_dir=args.dump_dir, tokenizer=tokenizer, threads=args.threads, progress=args.progress)
    compile_s = time.perf_counter() - t0
    with step(f"saving {args.out}", args.progress, force=True):
        q.save(args.out)
    print(q.report)
    print(f"saved {args.out} (compiled in {compile_s:.0f} s); open {args.out / 'report.html'} in a browser")
    if args.export:
        where = Path(f"{args.out}-{args.export}")
        with step(f"exporting {args.export}", args.progress, force=True):
            q.export(where, format=args.export)
        print(f"exported {args.export}: {where}")
    return 0


def _load(directory: Path, threads: int) -> Any:
    import lowbit

    if not directory.is_dir():
        raise CliError(f"{directory}: no such artifact directory")
    return lowbit.load(directory, threads=threads)


def evaluate(args: argparse.Namespace) -> int:
    import torch

    from lowbit.evaluate import perplexity

    args.progress = _progress(args.progress)
    if not args.directory.is_dir():
        raise CliError(f"{args.directory}: no such artifact directory")
    with step(f"loading {args.directory}", args.progress, force=True):
        lm = _load(args.directory, args.threads)
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        raise CliError(f"{args.directory}: the artifact holds no tokenizer (compile with tokenizer=...)")
    if args.text is None:
        from lowbit.evaluate import pydoc_text

        text = pydoc_text("evaluation")
    elif not args.text.is_file():
        raise CliError(f"--text {args.text}: no such file")
    else:
        text = args.text.read_text()
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    ppl = perplexity(lm, ids, seq_len=args.seq_len, progress=bool(args.progress))
    print(f"perplexity {ppl:.3f} ({ids.numel()} tokens, windows of {args.seq_len})")
    if args.model:
        check_model(args.model)
        with step(f"loading {args.model}", args.progress, force=True):
            model, _ = load_model(args.model)
        ref = perplexity(model, ids, seq_len=args.seq_len, progress=bool(args.progress))
        print(f"float model {ref:.3f}; quantized {ppl / ref - 1:+.2%}")
    return 0


class _Printer:
    """A generate() streamer that prints each new piece of text as it is decoded."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tokenizer, self.tokens, self.shown, self.first = tokenizer, [], "", True

    def put(self, value: Any) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        self.tokens += [int(t) for t in value.reshape(-1)]
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text

    def end(self) -> None:
        print(flush=True)


def generate(args: argparse.Namespace) -> int:
    lm = _load(args.directory, args.threads)
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None or not hasattr(lm, "generate"):
        raise CliError(f"{args.directory}: not a causal LM artifact with a tokenizer")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    lm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                streamer=_Printer(tokenizer, ids.shape[1]))
    g = lm.last_generate
    rate = (g["new_tokens"] - 1) / max(g["total_s"] - g["prefill_s"], 1e-9)
    print(f"[{g['new_tokens']:.0f} tokens, prefill {g['prefill_s'] * 1000:.0f} ms, {rate:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def bench(args: argparse.Namespace) -> int:
    import torch

    lm = _load(args.directory, args.threads)
    if hasattr(lm, "generate"):
        g = torch.Generator().manual_seed(0)
        vocab = int(lm.layout["vocab_size"])
        ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=g)
        prefill, rate = [], []
        lm.generate(ids, max_new_tokens=2, eos_token_id=[])  # warm-up
        for _ in range(args.repeats):
            lm.generate(ids, max_new_tokens=args.new, eos_token_id=[])
            s = lm.last_generate
            prefill.append(s["prefill_s"] * 1000)
            rate.append(args.batch * (args.new - 1) / max(s["total_s"] - s["prefill_s"], 1e-9))
        print(f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, {args.threads} threads, median of "
              f"{args.repeats}: prefill {statistics.median(prefill):.1f} ms, decode {statistics.median(rate):.1f} "
              "tokens/s")
        return 0
    inputs = lm.signature.example_tensors({"batch": args.batch})
    lm(*inputs)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        lm(*inputs)
        times.append((time.perf_counter() - t0) * 1000)
    print(f"batch {args.batch}, {args.threads} threads, median of {args.repeats}: {statistics.median(times):.2f} ms "
          f"per call")
    return 0


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   type=str, help="progress bars: on a terminal (auto), also into a log or pipe (always), or none")


def _progress(value: str) -> bool | str:
    return {"auto": True, "always": "always", "never": False}[value]


def add_commands(sub: Any) -> None:
    d = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("quantize", formatter_class=d, help="compile a model and save the artifact")
    p.add_argument("model", help="a Hugging Face folder, a .gguf file, or package.module:factory")
    p.add_argument("--out", type=Path, required=True, help="artifact directory")
    p.add_argument("--target", default="onnxruntime-int8", help="onnxruntime-int8, openvino-int8, torch, triton, tensorrt-int8")
    p.add_argument("--scheme", default=None, help="w8a8, w8a8_dynamic, w8a8_llm_int8, w8a16, w4a16: every layer "
                   "in this scheme (no plan search unless --target-ppl-increase); default: lowbit's plan, int8 "
                   "layers promoted until a causal LM is within 1%% of its float perplexity")
    p.add_argument("--group-size", type=int, default=None, help="per-group weights (w4a16: 32, 64, 128)")
    p.add_argument("--weight-method", default=None, help="rtn, gptq, awq, awq+gptq")
    p.add_argument("--calibration", type=Path, default=None, help=".txt, .jsonl (text field) or .safetensors "
                   "(input_ids); default: pydoc_data.topics' calibration split")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (GPTQ and AWQ take time in "
                   "proportion: 32 x 512 tokens is what lowbit's SmolLM2 figures use)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--target-ppl-increase", type=float, default=None,
                   help="perplexity budget for the automatic plan (0.01: +1%%; negative: off); default: 0.01 "
                   "for causal LMs without --scheme, off with it")
    p.add_argument("--export", choices=("compressed-tensors", "gguf"), default=None,
                   help="also write this checkpoint next to the artifact (OUT-FORMAT)")
    p.add_argument("--example-inputs", type=Path, default=None, help="for package.module:factory models")
    p.add_argument("--dump-dir", type=Path, default=None, help="per-pass graph dumps")
    p.add_argument("--threads", type=int, default=2, help="engine threads")
    _progress_option(p)
    p = sub.add_parser("eval", formatter_class=d, help="perplexity of a causal-LM artifact on a text file")
    p.add_argument("directory", type=Path)
    p.add_argument("--text", type=Path, default=None, help="a text file; default: the evaluation split of "
                   "pydoc_data.topics (disjoint from the default calibration split)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only")
    p.add_argument("--model", default=None, help="also the float model's perplexity (its folder)")
    p.add_argument("--threads", type=int, default=2, help="engine threads")
    _progress_option(p)
    p = sub.add_parser("generate", formatter_class=d, help="stream a completion of a prompt")
    p.add_argument("directory", type=Path)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    p.add_argument("--threads", type=int, default=2, help="engine threads")
    p = sub.add_parser("bench", formatter_class=d, help="latency / tokens per second of an artifact")
    p.add_argument("directory", type=Path)
    p.add_argument("--threads", type=int, default=2, help="engine threads")
    p.add_argument("--batch", type=int, default=1, help="rows per call")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (causal LMs)")
    p.add_argument("--new", type=int, default=128, help="new tokens (causal LMs)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (the median is printed)")


COMMANDS = {"quantize": quantize, "eval": evaluate, "generate": generate, "bench": bench}
