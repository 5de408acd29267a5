"""The capture cache (lowbit/compiler/capture.py): one torch.export per model state, never a stale program.

Counts torch.export calls: a second compile of the same model in the same state exports nothing and gives the
same model as a fresh capture (bit for bit on the example); any change the program depends on (a weight updated in
place, a submodule replaced, a plain attribute, another input shape) exports again, and the compiled model follows
the change (SQNR >= 30 dB against the changed float model); a dropped model leaves the cache.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compiler import capture as cap
from lowbit.runtime.qparams import sqnr


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.gain = 1.0  # a plain attribute the program bakes in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)) * self.gain)


@pytest.fixture
def exports(monkeypatch):
    calls = []
    real = torch.export.export

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def _compile(model, x):
    return lowbit.compile(model, (x,), calibration=[(x,)], progress=False,
                          config=lowbit.QuantConfig(target_sqnr_db=None))


def test_same_model_same_state_is_captured_once_and_compiles_the_same(exports, monkeypatch):
    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(8, 16)
    first = _compile(model, x)
    again = _compile(model, x)
    assert len(exports) == 1
    monkeypatch.setenv("LOWBIT_CAPTURE_CACHE", "0")
    fresh = _compile(model, x)
    assert len(exports) == 2
    assert torch.equal(again(x), first(x)) and torch.equal(fresh(x), first(x))


@pytest.mark.parametrize("change", ["weight in place", "submodule", "attribute", "input shape"])
def test_any_change_the_program_depends_on_captures_again(exports, change):
    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(8, 16)
    _compile(model, x)
    if change == "weight in place":
        with torch.no_grad():
            model.fc.weight.mul_(-1)
    elif change == "submodule":
        model.head = nn.Linear(16, 4)
    elif change == "attribute":
        model.gain = 3.0
    else:
        x = torch.randn(8, 2, 16)
    q = _compile(model, x)
    assert len(exports) == 2
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= 30.0


def test_a_dropped_model_leaves_the_cache():
    model = Scaled().eval()
    cap.capture(model, (torch.randn(8, 16),))
    assert any(key[0] == id(model) for key in cap._CACHE)
    ident = id(model)
    del model
    gc.collect()
    assert not any(key[0] == ident for key in cap._CACHE)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_a_causal_lm_and_its_step_graph_are_captured_once(exports):
    """A Hugging Face model: torch.export swaps some of its dicts for equal copies (by identity every capture
    missed), and its KV-cache step graph is a wrapper module kept beside the model, so a second compile (here:
    another target's reference) exports neither graph again and decodes the same tokens."""
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    before = set(cap._CACHE)
    config = lowbit.QuantConfig(target_sqnr_db=None, target_ppl_increase=None, scheme="w8a16")
    first = lowbit.compile(model, (ids,), calibration=[(ids,)], config=config, progress=False)
    assert len(exports) == 2  # the whole-sequence graph and the step graph
    again = lowbit.compile(model, (ids,), calibration=[(ids,)], config=config, progress=False)
    assert len(exports) == 2
    assert torch.equal(again.generate(ids, max_new_tokens=6, eos_token_id=[]),
                       first.generate(ids, max_new_tokens=6, eos_token_id=[]))
    kept = set(cap._CACHE) - before
    assert len(kept) == 2
    del model, first, again
    gc.collect()
    assert not kept & set(cap._CACHE)  # the step module does not keep its model alive, nor the cache either
