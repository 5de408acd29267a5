"""Issue 17: serving reliability. A loaded model called from many threads at once, and inputs nobody checked.

- Threads: per target, 8 threads x 50 calls with different inputs on one model (reloaded from its artifact where
  the target has one): 0 errors, every output bit-identical to the serial output of the same input.
- Token ids: integer inputs that index an embedding table are checked against its rows before any engine runs:
  the table's size, -1, 2^31 - 1 and 10^12 (int64) are InputErrors naming the input, position, value and range;
  float ids are a dtype InputError. NaN/Inf in float inputs are InputErrors too (the chosen policy: a
  quantizer maps NaN to an arbitrary code, so the quantized model would answer with finite garbage).
"""

from __future__ import annotations

import threading

import pytest
import torch

import lowbit
from lowbit.errors import InputError

from helpers import needs_engine
from models import bert_batch, tiny_bert

TARGETS = ["torch", "onnxruntime-int8", "openvino-int8"]
THREADS, CALLS = 8, 50


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


@pytest.fixture(scope="module", params=TARGETS)
def served(request, bert, tmp_path_factory):
    """(target, the model reloaded from its artifact) -- what a server holds."""
    target = request.param
    needs_engine(target)
    q = lowbit.compile(bert, bert_batch(2, 16, 0), target=target, calibration=[bert_batch(2, 16, i) for i in range(2)],
                       progress=False)
    path = tmp_path_factory.mktemp(target) / "artifact"
    q.save(path)
    return target, lowbit.load(path, model=bert) if target == "torch" else lowbit.load(path)


def test_concurrent_calls_match_serial_calls_bit_for_bit(served) -> None:
    target, model = served
    inputs = [bert_batch(1 + i % 4, 16, 100 + i) for i in range(THREADS * CALLS)]
    serial = [model(**x) for x in inputs]
    results: list = [None] * len(inputs)
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(k: int) -> None:
        start.wait()
        for i in range(k, len(inputs), THREADS):
            try:
                results[i] = model(**inputs[i])
            except BaseException as e:  # noqa: BLE001  every failure counts, whatever its type
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{target}: {len(errors)} of {len(inputs)} calls failed, first: {errors[0]!r}"
    for i, (got, want) in enumerate(zip(results, serial, strict=True)):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), f"{target}: call {i} differs"


@pytest.mark.parametrize("bad", [120, -1, 2**31 - 1, 10**12])
def test_out_of_range_token_ids_are_input_errors(served, bad) -> None:
    target, model = served
    x = bert_batch(2, 16, 3)
    x["input_ids"][1, 5] = bad
    with pytest.raises(InputError, match=rf"input 'input_ids' holds {bad} at position \[1, 5\], outside \[0, 120\)"):
        model(**x)
    x["input_ids"][1, 5] = 119  # the last row is in range
    model(**x)


def test_float_ids_are_a_dtype_error(served) -> None:
    target, model = served
    x = bert_batch(2, 16, 3)
    x["input_ids"] = x["input_ids"].float()
    with pytest.raises(InputError, match="input 'input_ids' has dtype float32, expected int64"):
        model(**x)


def test_nan_and_inf_in_a_float_input_are_input_errors() -> None:
    """The NaN/Inf policy: refused before any engine runs (a quantizer maps NaN to an arbitrary code, so the
    quantized model would return finite garbage where the float one propagates NaN), on every target."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(4, 8)
    for target in TARGETS:
        needs_engine(target)
        q = lowbit.compile(net, (x,), target=target, calibration=[(torch.randn(4, 8),) for _ in range(2)],
                           progress=False)
        q(x)  # a call of this shape accepted first: the remembered-shape fast path checks values too
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[2, 3] = bad
            with pytest.raises(InputError, match=rf"input 'input' holds {bad} at position \[2, 3\]"):
                q(y)


# -- capture the way torch users write it -------------------------------------------------------------------
def _bert_w8a16(bert, example, **kw):
    return lowbit.compile(bert, example, config=lowbit.QuantConfig(scheme="w8a16", target_sqnr_db=None),
                          progress=False, **kw)


def _close_to_float(bert, q, batch: dict) -> None:
    with torch.no_grad():
        ref = bert(**batch).last_hidden_state
    got = q(**batch)[0]
    assert got.shape == ref.shape and float((got - ref).norm() / ref.norm()) < 0.05


def test_batch_one_example_compiles_with_a_dynamic_batch(bert) -> None:
    q = _bert_w8a16(bert, bert_batch(1, 16, 0))
    assert q.signature.inputs[0].shape[0] == "batch"
    _close_to_float(bert, q, bert_batch(3, 16, 1))


@pytest.mark.parametrize("form", ["positional", "per-dim tuple", "auto", "named Dim"])
def test_every_torch_export_dynamic_shapes_form(bert, form) -> None:
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq", min=2, max=64)
    shapes = {
        "positional": ({0: batch, 1: seq}, {0: batch, 1: seq}),
        "per-dim tuple": {"input_ids": (batch, seq), "attention_mask": (batch, seq)},
        "auto": ({1: Dim.AUTO}, {1: Dim.DYNAMIC}),
        "named Dim": {"input_ids": {1: seq}, "attention_mask": {1: seq}},
    }[form]
    q = _bert_w8a16(bert, bert_batch(2, 16, 0), dynamic_shapes=shapes)
    assert isinstance(q.signature.inputs[0].shape[1], str)  # the sequence dim is dynamic
    _close_to_float(bert, q, bert_batch(3, 24, 1))


def test_mixed_or_malformed_dynamic_shapes_are_capture_errors(bert) -> None:
    from torch.export import Dim

    with pytest.raises(lowbit.CaptureError, match="keyed by input name, or is a tuple in input order"):
        _bert_w8a16(bert, bert_batch(2, 16, 0), dynamic_shapes={0: {1: Dim("seq")}, "attention_mask": {1: Dim("seq")}})
    with pytest.raises(lowbit.CaptureError, match=r"marks dim 3, but 'input_ids' has 2 dims"):
        _bert_w8a16(bert, bert_batch(2, 16, 0), dynamic_shapes={"input_ids": {3: Dim("x")}})
    with pytest.raises(lowbit.CaptureError, match="3 positional entries but the example has 2 inputs"):
        _bert_w8a16(bert, bert_batch(2, 16, 0), dynamic_shapes=(None, None, None))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_with_batch_one_and_positional_shapes(arch) -> None:
    """A Hugging Face GPT-2 / Llama from config, batch-1 example (the usual LLM case), shapes by position."""
    transformers = pytest.importorskip("transformers")
    from torch.export import Dim

    torch.manual_seed(0)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2,
                                                                      n_positions=64)).eval()
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 96, (1, 12))
    q = lowbit.compile(model, (ids,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=64)},), decode=False,
                       config=lowbit.QuantConfig(scheme="w8a16", target_sqnr_db=None, target_ppl_increase=None),
                       progress=False)
    x = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        ref = model(x).logits
    got = q(x)[0]
    assert float((got - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(InputError, match=r"input 'input_ids' holds 96 at position \[0, 0\], outside \[0, 96\)"):
        q(torch.full((1, 4), 96))


# -- durable, reproducible artifacts --------------------------------------------------------------------------
def test_save_fsyncs_every_file_and_directory_before_the_rename(served, tmp_path, monkeypatch) -> None:
    """Every file of the new artifact and its directories are fsynced before the rename that makes the artifact
    visible, and the parent directory after it (so the rename survives a power loss too)."""
    import os

    from lowbit.runtime import artifact

    target, model = served
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, artifact._exchange

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b) -> None:
        events.append(("rename", str(a)))
        real_replace(a, b)

    def exchange(a, b) -> bool:
        events.append(("rename", str(a)))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(artifact, "_exchange", exchange)
    for attempt in range(2):  # a new destination (rename), then over the old one (exchange on Linux)
        events.clear()
        dest = tmp_path / "a"
        model.save(dest)
        first_rename = next(i for i, e in enumerate(events) if e[0] == "rename")
        tmp = events[first_rename][1]
        synced = {p for kind, p in events[:first_rename] if kind == "fsync"}
        files = [p for p in dest.rglob("*") if p.is_file()]
        assert files and all(os.path.join(tmp, str(p.relative_to(dest))) in synced for p in files), attempt
        assert tmp in synced  # the directory's own entries
        assert ("fsync", str(tmp_path)) in events[first_rename:], attempt  # the rename, durable


def test_resident_memory_is_flat_over_repeated_calls(served) -> None:
    """2,000 calls after 200 warm-up calls: resident memory grows < 1% (benchmarks/serving.py runs 10,000)."""
    import resource

    target, model = served
    if target == "torch":
        pytest.skip("the torch reference allocates through PyTorch's caching allocator: measured by the benchmark")
    x = bert_batch(4, 16, 7)
    for _ in range(200):
        model(**x)

    def rss_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024

    before = rss_kb()
    for _ in range(2000):
        model(**x)
    grown = rss_kb() - before
    assert grown < 0.01 * before, f"{target}: resident memory grew {grown} KiB over {before} KiB"
