"""Random-graph differential testing (issue 7; after NNSmith and PyTorch's random-DAG tests).

Hypothesis draws random valid graphs from the ops lowbit supports (``fuzz_models.py``: conv with
groups/stride/padding (depthwise too), squeeze-excite gating, linear, matmul, batch_norm, layer_norm, relu,
relu6, gelu, hardswish, sigmoid, add, mul, concat, reshape/flatten, pooling, softmax; residual branches and
several outputs) with a fixed seed; ``LOWBIT_FUZZ_EXAMPLES`` of them (default 32, about 100 s on 2 quiet
cores), chosen so every op is compiled, go through every leg (``fuzz_harness.py`` states the oracles: torch
reference vs FP32 SQNR >= 15 dB; ORT, OpenVINO (float ops in f32; why there) and TensorRT's ONNX on ORT
when those exist, within 1 quantization step of the torch reference on >= 99.9% of the elements). Inputs whose FP32
intermediates overflow are rejected up front, not failed.

The examples run to the end, whatever fails, and the figures are printed (``pytest -s``)::

    graphs tried: 32, passed: 32 (100.0%), rejected inputs: 0, fidelity failures: 0, crashes: 0

Every failing spec is saved as JSON, shrunk (``LOWBIT_FUZZ_SHRINK=0`` skips that), and printed with the
line that replays it; a fixed bug's shrunk spec goes to ``tests/fuzz_regressions/<what-it-caught>.json``,
which ``test_fuzz_regressions.py`` replays by name. Failing specs are written under
``LOWBIT_FUZZ_ARTIFACTS`` (default: pytest's tmp dir). Longer local runs:
``LOWBIT_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest -q -s tests/test_fuzz_differential.py``.
The planted-bug tests at the end show that each oracle fails when the compiler is wrong.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

from fuzz_harness import (
    OV_TARGET,
    SQNR_FLOOR_DB,
    TRT_TARGET,
    Outcome,
    fmt_db,
    ov_available,
    percent,
    run_case,
    same_failure,
    shrink,
    trt_available,
)
from fuzz_models import ALL_OPS, describe, fingerprint, graph_specs, save_spec

EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "32"))
SEED = 20240607
DRAWS_PER_EXAMPLE = 50  # Hypothesis draws per compiled graph (1,200 draws take ~3 s)
SHRINK = os.environ.get("LOWBIT_FUZZ_SHRINK", "1") != "0"
SHRINK_AT_MOST = 3  # failures shrunk per run (each shrink recompiles up to 40 graphs); the rest are saved as drawn


def test_random_graphs_compile_faithfully(tmp_path_factory):
    results: list[tuple[dict, Outcome]] = []
    seen: set[str] = set()
    ops = collections.Counter({op: 0 for op in ALL_OPS})

    # Coverage-guided selection from Hypothesis's stream: a graph is compiled only if it holds one of the
    # ops drawn least so far and its structure is new (Hypothesis also mutates the graphs it drew, copying
    # one op's choices over another's), until EXAMPLES graphs ran. Drawing takes milliseconds, compiling
    # seconds; so every op is in the CI sample, not just the common ones.
    @settings(max_examples=DRAWS_PER_EXAMPLE * EXAMPLES, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(SEED)
    @given(graph_specs())
    def explore(spec):
        rarest = {op for op, n in ops.items() if n == min(ops.values())}
        if len(results) >= EXAMPLES or fingerprint(spec) in seen or not rarest & {op["op"] for op in spec["ops"]}:
            return
        seen.add(fingerprint(spec))
        ops.update(op["op"] for op in spec["ops"])
        results.append((spec, run_case(spec)))

    start = time.perf_counter()
    explore()
    seconds = time.perf_counter() - start

    counts = collections.Counter(o.status for _, o in results)
    tried = len(results)
    legs = (["torch", "onnxruntime-int8"] + ([f"{OV_TARGET} (f32 float ops)"] if ov_available() else [])
            + ([f"{TRT_TARGET} (export only)"] if trt_available() else []))
    sqnrs = [db for _, o in results if o.status == "passed" for db in o.sqnr_db]
    steps = collections.defaultdict(list)
    for _, o in results:
        for leg, share in o.within_step.items():
            steps[leg].append(share)
    print(f"\nrandom-graph differential test: seed {SEED}, legs: {', '.join(legs)}, {seconds:.0f} s")
    print(f"graphs tried: {tried}, passed: {counts['passed']} ({percent(counts['passed'], tried)}), "
          f"rejected inputs: {counts['rejected']}, fidelity failures: {counts['fidelity']}, "
          f"crashes: {counts['crash']}")
    if sqnrs:
        print(f"torch reference vs FP32: min SQNR {fmt_db(min(sqnrs))} dB over {len(sqnrs)} outputs "
              f"(floor {SQNR_FLOOR_DB} dB)")
    for leg, shares in steps.items():
        print(f"{leg} vs torch reference: worst share within 1 step {min(shares):.2%} over {len(shares)} graphs")
    timing = collections.defaultdict(list)
    for _, o in results:
        for target, t in o.compile_seconds.items():
            timing[target].append(t)
    print("compile seconds per graph: " + ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in timing.items()))
    print("ops compiled: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    for _, o in results:
        if o.status == "rejected":
            print(f"  rejected: {o.detail}")

    failures = [(spec, o) for spec, o in results if o.status in ("fidelity", "crash")]
    out_dir = Path(os.environ.get("LOWBIT_FUZZ_ARTIFACTS") or tmp_path_factory.mktemp("fuzz_failures"))
    messages = []
    for n, (spec, o) in enumerate(failures):
        path = save_spec(spec, out_dir / f"failure_{n:02d}_{o.status}.json")
        small = shrink(spec, same_failure(o)) if SHRINK and n < SHRINK_AT_MOST else spec
        small_path = save_spec(small, out_dir / f"failure_{n:02d}_{o.status}_shrunk.json")
        messages.append(f"{o.line()}\n    graph: {describe(spec)}\n    shrunk: {describe(small)}\n"
                        f"    saved: {path}, {small_path}\n    replay: fuzz_harness.run_case("
                        f"fuzz_models.load_spec({str(small_path)!r}))")
    for m in messages:
        print("FAILURE " + m)
    assert tried == EXAMPLES, f"Hypothesis ran {tried} of {EXAMPLES} examples"
    assert min(ops.values()) > 0 or EXAMPLES < len(ALL_OPS), f"ops never compiled: {[k for k, v in ops.items() if not v]}"
    assert counts["crash"] == 0 and counts["fidelity"] == 0, "\n".join(messages)
    # the fuzzer must exercise the compiler, not only reject inputs
    assert counts["passed"] >= 0.8 * tried, f"only {counts['passed']} of {tried} graphs were comparable"


# -- the oracle can fail: planted bugs ---------------------------------------------------------------

PLANTED = {"version": 1, "seed": 11, "input": [4, 16], "smoothquant": False,
           "ops": [{"op": "linear", "in": [0], "out_features": 24, "bias": True}, {"op": "relu", "in": [1]},
                   {"op": "linear", "in": [2], "out_features": 16, "bias": True}],
           "outputs": [3]}


def test_planted_bugs_pass_when_not_planted():
    assert run_case(PLANTED).status == "passed"


def test_oracle_catches_clipping_activation_ranges(monkeypatch):
    # a calibration bug: every static activation range a quarter of what was observed
    from lowbit.runtime.observers import MinMaxObserver

    def quarter(self):
        return self.min_val / 4, self.max_val / 4

    monkeypatch.setattr(MinMaxObserver, "select_range", quarter)
    outcome = run_case(PLANTED)
    assert (outcome.status, outcome.leg) == ("fidelity", "torch"), outcome.line()


def test_oracle_catches_an_engine_graph_three_percent_off(monkeypatch):
    # an export bug only the engine sees: every weight DequantizeLinear's scale 3% too large
    import numpy as np
    from onnx import numpy_helper

    import lowbit.backends.onnx.export as export

    rules = export.apply_rules

    def scaled(model):
        model, stats, problems = rules(model)
        inits = {t.name: t for t in model.graph.initializer}
        for i, node in enumerate(model.graph.node):
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                scale = numpy_helper.to_array(inits[node.input[1]]) * np.float32(1.03)
                name = f"{node.input[1]}_planted_{i}"
                model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), name))
                node.input[1] = name
        return model, stats, problems

    monkeypatch.setattr(export, "apply_rules", scaled)
    outcome = run_case(PLANTED, trt=False)
    assert (outcome.status, outcome.leg) == ("fidelity", "onnxruntime-int8"), outcome.line()
    assert "steps" in outcome.detail


def test_overflowing_inputs_are_rejected_up_front():
    x32 = {"version": 1, "seed": 1, "input": [16], "smoothquant": False,
           "ops": [{"op": "mul", "in": [i, i]} for i in range(5)]
           + [{"op": "linear", "in": [5], "out_features": 8, "bias": True}],
           "outputs": [6]}
    outcome = run_case(x32)
    assert outcome.status == "rejected" and "> 10000" in outcome.detail, outcome.line()
    assert outcome.compile_seconds == {}  # nothing was compiled
