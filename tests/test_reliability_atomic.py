"""Issue 7, part 4: crash-atomic saves.

A forked child saves an artifact (onnxruntime-int8, a model with ~2 MB of int8 weights) and is killed
with SIGKILL after a random delay drawn over the whole length of a save (the forking is done by a
helper process, tests/atomic_saver.py, whose torch is fork-safe). After every kill:

- a fresh destination is absent or complete: lowbit.load() gives the saved model's exact outputs;
- an existing destination being overwritten is the old artifact or the new one, never absent (Linux:
  the new directory is swapped in with renameat2(RENAME_EXCHANGE)) and never a mix;
- a temp directory the killed save left behind never loads as something else: lowbit.load() refuses it
  (no manifest yet) or it is complete; the next save removes it.

50 kills (25 while overwriting) must land while the saving child runs; a kill that comes after the
child finished is not counted (the delays reach 1.5 save lengths, so both outcomes are seen).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import lowbit

from helpers import one_torch_thread
from models import ReluMLP

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

KILLS = 50
OVERWRITE_KILLS = 25


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def compiled_model(seed: int) -> lowbit.CompiledModel:
    torch.manual_seed(seed)
    model = ReluMLP(512, 2048, 512).eval()  # wide: a model file of several MB
    g = torch.Generator().manual_seed(seed)
    cal = [(torch.randn(8, 512, generator=g),) for _ in range(2)]
    cfg = lowbit.QuantConfig(smoothquant=False, target_sqnr_db=None)
    return lowbit.compile(model, cal[0], target="onnxruntime-int8", calibration=cal, config=cfg, progress=False)


@pytest.fixture(scope="module")
def models():
    return compiled_model(0), compiled_model(1)


class Saver:
    """tests/atomic_saver.py: forks children that save, and kills them."""

    def __init__(self, artifacts: dict[str, Path], log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("atomic_saver.py")),
             json.dumps({k: str(v) for k, v in artifacts.items()})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=Path(__file__).parent.parent,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self._answer(300) == {"ready": True}

    def _answer(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            self.proc.kill()
            raise AssertionError(f"the saver gave no answer in {timeout} s")
        line = self.proc.stdout.readline()
        assert line, f"the saver died (rc {self.proc.wait()}); see {self.log.name}"
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return self._answer(60)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def saver(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    new, old = models
    s = Saver({"new": new.save(d / "new"), "old": old.save(d / "old")}, d / "saver.log")
    yield s
    s.close()


def which(d: Path, expected: dict[str, lowbit.CompiledModel], x: torch.Tensor) -> str:
    """'absent', or the name of the artifact d holds (loaded and checked: its outputs are exact)."""
    if not d.exists():
        return "absent"
    loaded = lowbit.load(d)  # a half-written artifact raises here: the test fails
    out = loaded(x)
    names = [name for name, q in expected.items() if torch.equal(out, q(x))]
    assert len(names) == 1, f"{d} loads but computes neither the old nor the new model"
    files = json.loads((d / "manifest.json").read_text())["files"]
    assert set(files) == {"model.onnx", "plan.json", "qparams.safetensors", "report.json"}
    return names[0]


def leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}."))


def check_leftovers(parent: Path, name: str, expected, x, seen: dict[Path, str]) -> None:
    """A killed save's temp directory never loads as something else: it is refused (no manifest yet, or
    a file missing), or it is complete (the old artifact after an exchange) and computes what it should."""
    for p in leftovers(parent, name):
        if p in seen:
            continue
        try:
            seen[p] = "complete (" + which(p, expected, x) + ")"
        except lowbit.ArtifactError:
            seen[p] = "refused"


def delay(rng: random.Random, attempt: int, t_save: float) -> float:
    """Uniform over 1.5 save lengths; every 10th attempt waits 3 (the finished case is checked whatever the
    machine's load does to the timing)."""
    return 3.0 * t_save if attempt % 10 == 0 else rng.uniform(0.0, 1.5 * t_save)


def test_sigkill_during_save_leaves_absent_or_complete(models, saver, tmp_path):
    new, _ = models
    x = torch.randn(3, 512)
    dest = tmp_path / "art"
    t_save = saver.ask(op="time", which="new", dest=str(tmp_path / "timing"))["seconds"]
    rng = random.Random(7)
    counts = {"absent": 0, "new": 0}
    landed = attempts = 0
    seen: dict[Path, str] = {}
    while landed < KILLS and attempts < 4 * KILLS:  # a kill that comes after the save finished does not count
        attempts += 1
        if dest.exists():
            shutil.rmtree(dest)
        hit = saver.ask(op="kill", which="new", dest=str(dest), delay=delay(rng, attempts, t_save))["landed"]
        landed += hit
        state = which(dest, {"new": new}, x)
        counts[state] += 1
        check_leftovers(tmp_path, "art", {"new": new}, x, seen)
    new.save(dest)  # a save that finishes removes what killed ones left
    left = leftovers(tmp_path, "art")
    print(f"\n[atomic save] kills during a save: {landed} ({attempts - landed} more came after the save had finished; "
          f"save {1000 * t_save:.0f} ms incl. fork); after all {attempts}: dest absent: {counts['absent']}, complete: "
          f"{counts['new']}, half-written loaded: 0; "
          f"temp dirs left by kills: {dict(Counter(seen.values()))}, left after the next save: {len(left)}")
    assert landed == KILLS
    assert counts["absent"] >= 1 and counts["new"] >= 1, "the kills did not spread over the save"
    assert left == []


def test_sigkill_while_overwriting_leaves_old_or_new(models, saver, tmp_path):
    new, old = models
    x = torch.randn(3, 512)
    dest = tmp_path / "art"
    old.save(dest)
    t_save = saver.ask(op="time", which="new", dest=str(dest))["seconds"]
    rng = random.Random(8)
    counts = {"absent": 0, "old": 0, "new": 0}
    landed = attempts = 0
    seen: dict[Path, str] = {}
    while landed < OVERWRITE_KILLS and attempts < 4 * OVERWRITE_KILLS:
        attempts += 1
        old.save(dest)
        hit = saver.ask(op="kill", which="new", dest=str(dest), delay=delay(rng, attempts, t_save))["landed"]
        landed += hit
        state = which(dest, {"old": old, "new": new}, x)
        counts[state] += 1
        check_leftovers(tmp_path, "art", {"old": old, "new": new}, x, seen)
    new.save(dest)
    left = leftovers(tmp_path, "art")
    print(f"\n[atomic overwrite] kills during a save: {landed} ({attempts - landed} after); dest old: {counts['old']}, new: "
          f"{counts['new']}, absent: {counts['absent']}, half-written loaded: 0; temp dirs left by kills: "
          f"{dict(Counter(seen.values()))}, left after the next save: {len(left)}")
    assert landed == OVERWRITE_KILLS
    assert counts["old"] >= 1 and counts["new"] >= 1, "the kills did not spread over the save"
    if sys.platform.startswith("linux"):
        assert counts["absent"] == 0  # the exchange leaves no moment without an artifact
    assert left == []
