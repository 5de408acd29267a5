"""Issue 7, part 3: hostile and corrupted artifacts.

For each artifact kind (the target="torch" recipe, onnxruntime-int8, the tensorrt-int8 export, and the
triton graph artifact) a seeded generator makes 200+ mutants of one good artifact: bit flips,
truncations at random offsets, zero-length files, a Git LFS pointer in place of a file, bad JSON, bad
safetensors headers, deleted files -- first as plain damage (the hashes no longer match), then *forged*:
the attacker recomputed every SHA-256 and the manifest's self-hash, so the deeper parsers (safetensors,
JSON schemas, manifest fields, ONNX protobuf, the engine, the recipe's re-capture) are reached. Each
mutant is loaded in a subprocess (a pool of persistent workers, tests/artifact_worker.py). Pass: every
mutant is refused with ArtifactError -- plain damage by the hash check, before any parser --, no worker
dies by a signal, none takes 10 s (the harness's own crash and hang detection is tested too).

Loaded but not counted: forged bit flips, which may be valid models (a flipped weight byte is still a
model), and forged damage to a file no loader parses (tensorrt's conformance.json, a report for
people). They must load or give ArtifactError, never another exception, a crash or a hang.

Path attacks in the manifest and in ONNX external-data locations (``../``, ``a/../../``, absolute
paths, symlinks out of the directory) are refused before anything outside the directory is opened: a
canary file next to the artifact keeps its bytes, mtime and atime, and no ``open`` of it is audited.

A static scan of lowbit/ finds no pickle.load, no torch.load without weights_only=True and no
torch.export.load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from artifact_worker import cnn
from onnx import numpy_helper

import lowbit
from lowbit.backends.registry import TARGETS
from lowbit.runtime.artifact import MANIFEST, _self_hash, sha256_file

from helpers import one_torch_thread

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "artifact_worker.py"
TIMEOUT_S = 10.0
WORKERS = 2
MIN_MUTANTS = 200
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 123456\n")
#: what the manifest check says; a plain (unforged) mutant must be refused with one of these
HASH_CHECK = re.compile(r"SHA-256 does not match|listed in the manifest but missing|self-hash|manifest.json: not "
                        r"valid JSON|has no 'files' table|is not a lowbit artifact|Git LFS pointer")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def cal(n: int = 2, batch: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 1, 16, 16, generator=g),) for _ in range(n)]


# -- artifact builders, one per kind --------------------------------------------------------------------


def build_torch(model: torch.nn.Module, directory: Path) -> Path:
    return lowbit.compile(model, cal(1)[0], calibration=cal(), progress=False).save(directory)


def build_onnxruntime(model: torch.nn.Module, directory: Path) -> Path:
    return lowbit.compile(model, cal(1)[0], target="onnxruntime-int8", calibration=cal(), progress=False).save(directory)


def build_triton(model: torch.nn.Module, directory: Path) -> Path:
    return lowbit.compile(model, cal(1)[0], target="triton", calibration=cal(), progress=False).save(directory)


def build_tensorrt(model: torch.nn.Module, directory: Path) -> Path:
    q = lowbit.compile(model, cal(1)[0], target="tensorrt-int8", calibration=cal(), export_only=True, progress=False)
    return q.save(directory)


#: kind -> (builder, the model= the loader needs or None, files the loader never reads)
KINDS: dict[str, tuple[Callable[[torch.nn.Module, Path], Any], str | None, frozenset[str]]] = {
    "torch": (build_torch, "cnn", frozenset()),
    "onnxruntime-int8": (build_onnxruntime, None, frozenset()),
}
if importlib.util.find_spec("triton") is not None:  # the graph artifact: FX graph as JSON + safetensors
    KINDS["triton"] = (build_triton, None, frozenset())
if "tensorrt-int8" in TARGETS:
    # conformance.json is a report for people: the loader does not parse it, so a forged one loads
    KINDS["tensorrt-int8"] = (build_tensorrt, None, frozenset({"conformance.json"}))


# -- mutants ------------------------------------------------------------------------------------------------


@dataclass
class Mutant:
    label: str
    forged: bool  # hashes recomputed after the damage
    apply: Callable[[Path], None]
    must_reject: bool = True


def read_manifest_json(d: Path) -> dict[str, Any]:
    return json.loads((d / MANIFEST).read_text())


def write_manifest_json(d: Path, m: dict[str, Any]) -> None:
    (d / MANIFEST).write_text(json.dumps(m, indent=2))


def forge(d: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> None:
    """What an attacker does after editing files: recompute every listed file's hash and the self-hash."""
    m = read_manifest_json(d)
    if edit is not None:
        edit(m)
    if isinstance(m.get("files"), dict):  # only plain files inside: an attack's own names keep their hashes
        plain = {n for n in m["files"] if ".." not in n and not os.path.isabs(n) and (d / n).is_file()
                 and not (d / n).is_symlink()}
        m["files"] = {n: sha256_file(d / n) if n in plain else h for n, h in m["files"].items()}
    m["manifest_sha256"] = _self_hash(m)
    write_manifest_json(d, m)


def flip_bits(data: bytes, rng: random.Random, nbytes: int) -> bytes:
    out = bytearray(data)
    for _ in range(nbytes):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def safetensors_headers(data: bytes) -> dict[str, bytes]:
    """Bad safetensors files derived from a good one: lying header sizes, garbage or inconsistent headers."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + n], data[8 + n:]
    entries = json.loads(header)
    first = next(k for k in entries if k != "__metadata__")

    def with_header(obj: Any, pad_to: int | None = None) -> bytes:
        h = json.dumps(obj).encode()
        if pad_to is not None:
            h = h.ljust(pad_to)
        return struct.pack("<Q", len(h)) + h + body

    huge = dict(entries)
    huge[first] = {**entries[first], "shape": [1 << 40, 1 << 30]}
    beyond = dict(entries)
    beyond[first] = {**entries[first], "data_offsets": [0, len(body) + 4096]}
    unknown = dict(entries)
    unknown[first] = {**entries[first], "dtype": "Q99"}
    overlap = dict(entries)
    overlap[first] = {**entries[first], "data_offsets": [len(body) // 2, len(body) // 2 - 1]}
    return {
        "header length past the end of the file": struct.pack("<Q", len(data) * 10) + data[8:],
        "header length 2**64-1": b"\xff" * 8 + data[8:],
        "header length 0": struct.pack("<Q", 0) + data[8:],
        "garbage header": struct.pack("<Q", n) + bytes(rng_bytes(n)) + body,
        "header that is not an object": with_header([1, 2, 3]),
        "tensor of 2**70 elements": with_header(huge),
        "data offsets past the end": with_header(beyond),
        "unknown dtype": with_header(unknown),
        "inverted data offsets": with_header(overlap),
        "only 5 bytes": data[:5],
    }


def rng_bytes(n: int) -> bytes:
    return random.Random(n).randbytes(n)


JSON_GARBAGE: dict[str, bytes] = {
    "truncated object": b'{"layers": {',
    "empty": b"",
    "null": b"null",
    "a list": b"[]",
    "not UTF-8": b"\xff\xfe\x00{",
    "a number": b"12",
    "NaN": b"NaN",
}


def onnx_special(data: bytes) -> dict[str, bytes]:
    """Protobuf that parses as something, but not as this model."""
    model = onnx.load_from_string(data)
    no_graph = onnx.ModelProto()
    no_graph.CopyFrom(model)
    no_graph.ClearField("graph")
    bad_op = onnx.ModelProto()
    bad_op.CopyFrom(model)
    bad_op.graph.node[0].op_type = "NoSuchOperator"
    dangling = onnx.ModelProto()
    dangling.CopyFrom(model)
    dangling.graph.node[0].input[0] = "no_such_value"
    return {
        "ir_version only": b"\x08\x01",
        "no graph": no_graph.SerializeToString(),
        "an unknown operator": bad_op.SerializeToString(),
        "an undefined input": dangling.SerializeToString(),
        "random bytes": random.Random(7).randbytes(len(data)),
    }


def manifest_forgeries(m: dict[str, Any]) -> dict[str, Callable[[dict[str, Any]], None]]:
    """Manifests with a valid self-hash whose contents are wrong."""
    out: dict[str, Callable[[dict[str, Any]], None]] = {}
    required = ["target", "signature", "format_version"]
    required += ["engine", "opset", "weights", "macs"] if m.get("kind") == "onnx" else []
    required += ["config"] if m.get("kind") == "recipe" else []
    for key in required:
        out[f"no {key!r}"] = lambda m, k=key: m.pop(k, None)

    def setter(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda m: m.__setitem__(key, value)

    out.update({
        "unknown target": setter("target", "tpu-int3"),
        "target of a number": setter("target", 5),
        "format_version from the future": setter("format_version", 99),
        "signature of a number": setter("signature", 5),
        "signature without inputs": lambda m: m["signature"].pop("inputs"),
        "signature inputs of a string": lambda m: m["signature"].__setitem__("inputs", "x"),
        "input of an unknown dtype": lambda m: m["signature"]["inputs"][0].__setitem__("dtype", "float99"),
        "files of a list": setter("files", []),
        "kind of a list": setter("kind", ["onnx"]),
    })
    if m.get("kind") != "graph":  # a graph artifact records no input ranks to check a signature against
        out["input of rank 9"] = lambda m: m["signature"]["inputs"][0].__setitem__("shape", [1] * 9)
    if m.get("kind") == "onnx":
        out.update({
            "unknown engine": setter("engine", "bogus"),
            "weights of a list": setter("weights", [1]),
            "macs of strings": lambda m: m.__setitem__("macs", {k: "many" for k in m["macs"]} or {"x": "many"}),
        })
    if m.get("kind") == "recipe":
        out.update({
            "config of a number": setter("config", 5),
            "config with an unknown scheme": lambda m: m["config"].__setitem__("scheme", "int3"),
            "config with an unknown field": lambda m: m["config"].__setitem__("bogus", 1),
        })
    return out


def plan_forgeries(kind: str) -> dict[str, bytes]:
    out = {
        "plan without layers": b'{"plan": 1}',
        "plan layers of a list": b'{"layers": []}',
        "plan with an unknown scheme": b'{"layers": {"fc": {"scheme": "int3"}}}',
        "plan entry of a number": b'{"layers": {"fc": 5}}',
    }
    if kind == "recipe":  # the recipe is re-applied to the model: a layer it does not have is an error
        out["plan naming a layer the model lacks"] = b'{"layers": {"no.such.layer": {"scheme": "w8a8"}}}'
    return out


def make_mutants(good: Path, seed: int) -> list[Mutant]:
    rng = random.Random(seed)
    manifest = read_manifest_json(good)
    kind = manifest["kind"]
    files = sorted(manifest["files"]) + [MANIFEST]
    mutants: list[Mutant] = []

    def replace(name: str, data: bytes, forged: bool) -> Callable[[Path], None]:
        def apply(d: Path) -> None:
            (d / name).write_bytes(data)
            if forged:
                forge(d)
        return apply

    def delete(name: str, forged: bool) -> Callable[[Path], None]:
        def apply(d: Path) -> None:
            (d / name).unlink()
            if forged:
                forge(d)
        return apply

    for name in files:
        data = (good / name).read_bytes()
        for i in range(16):  # plain damage: the hash check must catch every one
            nbytes = 1 if i < 10 else rng.randint(2, 16)
            mutants.append(Mutant(f"{name}: {nbytes} bit flip(s) #{i}", False, replace(name, flip_bits(data, rng, nbytes), False)))
        for i in range(8):
            at = rng.randrange(len(data))
            mutants.append(Mutant(f"{name}: truncated at {at}/{len(data)} #{i}", False, replace(name, data[:at], False)))
        mutants.append(Mutant(f"{name}: zero-length", False, replace(name, b"", False)))
        mutants.append(Mutant(f"{name}: a Git LFS pointer", False, replace(name, LFS_POINTER, False)))
        mutants.append(Mutant(f"{name}: deleted", False, delete(name, False)))
        if name.endswith(".json"):
            for what, junk in JSON_GARBAGE.items():
                mutants.append(Mutant(f"{name}: bad JSON ({what})", False, replace(name, junk, False)))
        if name.endswith(".safetensors"):
            for what, junk in safetensors_headers(data).items():
                mutants.append(Mutant(f"{name}: bad safetensors ({what})", False, replace(name, junk, False)))
        if name == MANIFEST:
            continue
        # forged: every hash recomputed, so the parsers behind the hash check must refuse the file
        for i in range(4):
            # a cut that removes only trailing whitespace (report.json's final newline) leaves the same document
            at = rng.randrange(1, len(data.rstrip()))
            mutants.append(Mutant(f"forged {name}: truncated at {at}/{len(data)} #{i}", True, replace(name, data[:at], True)))
        mutants.append(Mutant(f"forged {name}: zero-length", True, replace(name, b"", True)))
        mutants.append(Mutant(f"forged {name}: a Git LFS pointer", True, replace(name, LFS_POINTER, True)))
        mutants.append(Mutant(f"forged {name}: deleted", True, delete(name, True)))
        mutants.append(Mutant(f"forged {name}: deleted and unlisted", True, _unlist(name, delete_file=True)))
        if name.endswith(".json"):
            for what, junk in JSON_GARBAGE.items():
                mutants.append(Mutant(f"forged {name}: bad JSON ({what})", True, replace(name, junk, True)))
        if name == "plan.json":
            for what, junk in plan_forgeries(kind).items():
                mutants.append(Mutant(f"forged {name}: {what}", True, replace(name, junk, True)))
        if name == "report.json":
            mutants.append(Mutant("forged report.json: no target", True, replace(name, b'{"layers": []}', True)))
        if name.endswith(".safetensors"):
            for what, junk in safetensors_headers(data).items():
                mutants.append(Mutant(f"forged {name}: bad safetensors ({what})", True, replace(name, junk, True)))
        if name == "example_inputs.safetensors":
            from safetensors.torch import save

            for what, t in {"wrong shape": torch.zeros(2, 3), "wrong dtype": torch.zeros(4, 1, 16, 16, dtype=torch.int64)}.items():
                mutants.append(Mutant(f"forged {name}: example input of the {what}", True,
                                      replace(name, save({"x": t}), True)))
            mutants.append(Mutant(f"forged {name}: no input 'x'", True, replace(name, save({"y": torch.zeros(1)}), True)))
        if name == "qparams.safetensors" and kind == "recipe":
            from safetensors.torch import save

            mutants.append(Mutant(f"forged {name}: no qparams", True, replace(name, save({"y": torch.zeros(1)}), True)))
        if name.endswith(".onnx"):
            for what, junk in onnx_special(data).items():
                mutants.append(Mutant(f"forged {name}: {what}", True, replace(name, junk, True)))
    for what, edit in manifest_forgeries(manifest).items():
        mutants.append(Mutant(f"forged manifest: {what}", True, lambda d, e=edit: forge(d, e)))
    # forged bit flips: possibly still valid models; they must load or be refused, never crash
    for i in range(30):
        name = sorted(manifest["files"])[i % len(manifest["files"])]
        data = (good / name).read_bytes()
        mutants.append(Mutant(f"forged {name}: bit flips #{i}", True, replace(name, flip_bits(data, rng, 1 + i % 4), True),
                              must_reject=False))
    return mutants


def _unlist(name: str, delete_file: bool) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        if delete_file:
            (d / name).unlink()
        forge(d, lambda m: m["files"].pop(name))
    return apply


# -- the worker pool ----------------------------------------------------------------------------------------


class WorkerPool:
    """Persistent loader subprocesses. A worker that dies (crash) or overruns TIMEOUT_S (hang) is replaced."""

    def __init__(self, n: int, log: Path, argv: list[str] | None = None, timeout_s: float = TIMEOUT_S) -> None:
        self.argv = argv or [sys.executable, str(WORKER)]
        self.timeout_s = timeout_s
        self.log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.workers: list[dict[str, Any]] = [self._spawn() for _ in range(n)]
        self.restarts = 0
        self.warmups: list[dict[str, Any]] = []

    def warm(self, job: dict[str, Any]) -> dict[str, Any]:
        """Load a good artifact in every worker (the first torch.export in a process takes seconds), with
        no per-mutant clock; workers started later get the same warm-up. Returns the first answer."""
        self.warmups.append(job)
        answers = [self._warm(w, job) for w in self.workers]
        return answers[0]

    def _warm(self, w: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        w["proc"].stdin.write((json.dumps(job) + "\n").encode())
        w["proc"].stdin.flush()
        line = self._readline(w, time.monotonic() + 300)
        assert line is not None, "a worker died or hung loading the good artifact"
        return json.loads(line)

    def _spawn(self) -> dict[str, Any]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.log, cwd=ROOT, env=env)
        w = {"proc": proc, "buf": b"", "job": None, "t0": 0.0}
        line = self._readline(w, time.monotonic() + 300)
        assert line is not None and json.loads(line) == {"ready": True}, f"worker did not start: {line!r}"
        return w

    @staticmethod
    def _readline(w: dict[str, Any], deadline: float) -> bytes | None:
        fd = w["proc"].stdout.fileno()
        while b"\n" not in w["buf"]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            w["buf"] += chunk
        line, w["buf"] = w["buf"].split(b"\n", 1)
        return line

    def _replace(self, w: dict[str, Any]) -> None:
        if w["proc"].poll() is None:
            w["proc"].kill()
        w["proc"].wait()
        self.restarts += 1
        fresh = self._spawn()
        for job in self.warmups:
            self._warm(fresh, job)
        self.workers[self.workers.index(w)] = fresh

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        while pending or any(w["job"] is not None for w in self.workers):
            for w in self.workers:
                if w["job"] is None and pending:
                    w["job"], w["t0"] = pending.pop(), time.monotonic()
                    try:
                        w["proc"].stdin.write((json.dumps(jobs[w["job"]]) + "\n").encode())
                        w["proc"].stdin.flush()
                    except BrokenPipeError:
                        pass  # it died: seen as EOF below
            busy = {w["proc"].stdout.fileno(): w for w in self.workers if w["job"] is not None}
            deadline = min(w["t0"] for w in busy.values()) + self.timeout_s
            ready, _, _ = select.select(list(busy), [], [], max(0.0, deadline - time.monotonic()))
            for fd in ready:
                w = busy[fd]
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    w["buf"] += chunk
                    if b"\n" in w["buf"]:
                        line, w["buf"] = w["buf"].split(b"\n", 1)
                        results[w["job"]] = {**json.loads(line), "seconds": time.monotonic() - w["t0"]}
                        w["job"] = None
                    continue
                rc = w["proc"].wait()
                results[w["job"]] = {"ok": False, "crash": True, "returncode": rc, "error_type": f"died (rc {rc})"}
                w["job"] = None
                self._replace(w)
            for w in list(self.workers):
                if w["job"] is not None and time.monotonic() - w["t0"] > self.timeout_s:
                    results[w["job"]] = {"ok": False, "hang": True, "error_type": f"hang (> {self.timeout_s:g} s)"}
                    w["job"] = None
                    self._replace(w)
        return [r for r in results if r is not None]

    def close(self) -> None:
        for w in self.workers:  # idle workers hold nothing worth a clean exit (torch's takes seconds)
            w["proc"].kill()
            w["proc"].wait()
            w["proc"].stdin.close()
            w["proc"].stdout.close()
        self.log.close()


FAKE_WORKER = """
import json, os, signal, sys, time
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    what = json.loads(line)["path"]
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == "hang":
        time.sleep(600)
    print(json.dumps({"ok": False, "error_type": "ArtifactError", "msg": what}), flush=True)
"""


def test_the_pool_counts_crashes_and_hangs_and_goes_on(tmp_path):
    """The harness itself: a worker killed by a signal is a crash, one past the limit a hang; both are
    replaced and the remaining jobs still run (a stand-in worker without torch, 0.5 s limit)."""
    pool = WorkerPool(2, tmp_path / "log", argv=[sys.executable, "-c", FAKE_WORKER], timeout_s=0.5)
    try:
        jobs = ["a", "crash", "b", "hang", "c", "crash", "d"]
        results = pool.run([{"path": j} for j in jobs])
    finally:
        pool.close()
    assert [bool(r.get("crash")) for r in results] == [j == "crash" for j in jobs]
    assert [bool(r.get("hang")) for r in results] == [j == "hang" for j in jobs]
    assert results[1]["returncode"] == -11 and pool.restarts == 3
    assert [r["msg"] for r in results if r.get("ok") is False and "msg" in r] == ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = WorkerPool(WORKERS, tmp_path_factory.mktemp("workers") / "stderr.log")
    yield p
    p.close()


@pytest.fixture(scope="module")
def model():
    return cnn()


# -- the mutant test --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_mutant_is_refused_with_artifact_error(kind, model, pool, tmp_path):
    builder, model_name, unread = KINDS[kind]
    good = builder(model, tmp_path / "good")
    control = pool.warm({"path": str(good), "model": model_name})
    assert control.get("ok") and control.get("ran"), f"the good artifact does not load: {control}"

    mutants = make_mutants(good, seed=sum(map(ord, kind)))
    for m in mutants:  # forged damage to a file nothing parses cannot be seen: robustness only
        if m.forged and m.label.split(":")[0].removeprefix("forged ") in unread:
            m.must_reject = False
    dirs = []
    for i, m in enumerate(mutants):
        d = tmp_path / f"m{i:04d}"
        shutil.copytree(good, d)
        m.apply(d)
        dirs.append(d)
    t0 = time.monotonic()
    results = pool.run([{"path": str(d), "model": model_name} for d in dirs])
    seconds = time.monotonic() - t0

    must = [(m, r) for m, r in zip(mutants, results, strict=True) if m.must_reject]
    rest = [(m, r) for m, r in zip(mutants, results, strict=True) if not m.must_reject]
    rejected = [(m, r) for m, r in must if not r.get("ok") and r.get("error_type") == "ArtifactError"]
    wrong = [(m.label, r) for m, r in must if (m, r) not in rejected]
    by_hash = [(m, r) for m, r in rejected if not m.forged]
    not_hash_first = [(m.label, r["msg"]) for m, r in by_hash if not HASH_CHECK.search(r["msg"])]
    crashes = sum(1 for _, r in zip(mutants, results, strict=True) if r.get("crash"))
    hangs = sum(1 for _, r in zip(mutants, results, strict=True) if r.get("hang"))
    rest_bad = [(m.label, r) for m, r in rest if not r.get("ok") and r.get("error_type") != "ArtifactError"]
    rest_loaded = sum(1 for _, r in rest if r.get("ok"))
    slowest = max(r.get("seconds", TIMEOUT_S) for r in results)
    forged = sum(1 for m, _ in must if m.forged)
    flips = sum(1 for m, _ in rest if "bit flips" in m.label)
    print(f"\n[artifacts {kind}] mutants: {len(must)} ({len(must) - forged} plain, {forged} forged hashes); "
          f"rejected with ArtifactError: {len(rejected)}/{len(must)} ({len(by_hash)} by the hash check); "
          f"crashes: {crashes}; hangs: {hangs}; slowest: {slowest:.2f} s; "
          f"may load (forged bit flips {flips}, forged unread files {len(rest) - flips}): {len(rest)} "
          f"({rest_loaded} loaded, {len(rest) - rest_loaded - len(rest_bad)} "
          f"ArtifactError, {len(rest_bad)} other); {seconds:.1f} s; worker restarts: {pool.restarts}")
    slow = sorted(zip(mutants, results, strict=True), key=lambda mr: -mr[1].get("seconds", TIMEOUT_S))[:3]
    print("  slowest: " + ", ".join(f"{m.label} ({r.get('seconds', TIMEOUT_S):.2f} s)" for m, r in slow))
    print("  refusals by first words: " + ", ".join(
        f"{k} x{v}" for k, v in Counter(_gist(r["msg"]) for _, r in rejected).most_common(8)))
    assert len(must) >= MIN_MUTANTS
    assert crashes == 0 and hangs == 0, [(m.label, r) for m, r in zip(mutants, results, strict=True)
                                         if r.get("crash") or r.get("hang")]
    assert not wrong, [label for label, _ in wrong] + wrong[:3]
    assert not not_hash_first, not_hash_first[:10]
    assert not rest_bad, rest_bad[:10]


def _gist(msg: str) -> str:
    """The kind of refusal, without the paths: 'SHA-256 does not match', 'cannot be read as safetensors'."""
    text = re.sub(r"\S*/\S*", "", msg.split("\n")[0]).strip(" :")
    return " ".join(text.split()[:5])


# -- path attacks ------------------------------------------------------------------------------------------


class Canary:
    """A file outside the artifact directory; proves that nothing opened, read or wrote it.

    Python-level opens are seen by an audit hook. Reads by C++ code (an engine following an external
    data path) are seen by the atime: it is set before the mtime, so under relatime or strictatime any
    read moves it (checked on a probe file first; on a noatime mount only the hook and content count).
    """

    opened: list[str] = []
    active = False
    hooked = False

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(b"secret canary " * 64)
        self.content, self.mtime = path.read_bytes(), path.stat().st_mtime_ns
        self.atime = self._age_atime(path)
        probe = path.with_name("atime-probe")
        probe.write_bytes(b"x")
        before = self._age_atime(probe)
        probe.read_bytes()
        self.atime_works = probe.stat().st_atime_ns != before
        if not Canary.hooked:
            sys.addaudithook(Canary._hook)
            Canary.hooked = True
        Canary.opened.clear()
        Canary.active = True

    @staticmethod
    def _age_atime(path: Path) -> int:
        st = path.stat()
        os.utime(path, ns=(st.st_mtime_ns - 10**10, st.st_mtime_ns))
        return path.stat().st_atime_ns

    @staticmethod
    def _hook(event: str, args: tuple[Any, ...]) -> None:
        if Canary.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            Canary.opened.append(os.fsdecode(args[0]))

    def assert_untouched(self) -> None:
        Canary.active = False
        assert not [p for p in Canary.opened if Path(p).name == self.path.name], Canary.opened
        if self.atime_works:
            assert self.path.stat().st_atime_ns == self.atime, "the canary was read (its atime moved)"
        assert self.path.stat().st_mtime_ns == self.mtime and self.path.read_bytes() == self.content
        PATH_ATTACKS["untouched"] += 1


PATH_ATTACKS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _path_attack_summary():
    yield
    if PATH_ATTACKS:
        print(f"\n[path attacks] refused with ArtifactError before anything outside was read: "
              f"{PATH_ATTACKS['refused']}/{PATH_ATTACKS['tried']} (manifest names {PATH_ATTACKS['manifest']}, "
              f"symlinks {PATH_ATTACKS['symlink']}, ONNX external data {PATH_ATTACKS['onnx']}); canary bytes, mtime "
              f"and {'atime' if PATH_ATTACKS['atime'] else 'audited opens (no atime on this mount)'} unchanged: "
              f"{PATH_ATTACKS['untouched']}/{PATH_ATTACKS['tried']}")


@pytest.fixture
def canary(tmp_path):
    c = Canary(tmp_path / "canary.bin")
    PATH_ATTACKS["tried"] += 1
    PATH_ATTACKS["atime"] = int(c.atime_works)
    yield c
    Canary.active = False


def onnx_with_external(d: Path, location: str, tensor: str | None = None) -> str:
    """Point one initializer of d/model.onnx at external data ``location``; returns the tensor's name."""
    model = onnx.load(str(d / "model.onnx"))
    init = next(t for t in model.graph.initializer if tensor is None or t.name == tensor)
    n = len(numpy_helper.to_array(init).tobytes())
    init.ClearField("raw_data")
    init.ClearField("int32_data")
    init.ClearField("float_data")
    init.ClearField("int64_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
        e = init.external_data.add()
        e.key, e.value = k, v
    (d / "model.onnx").write_bytes(model.SerializeToString())
    return init.name


@pytest.fixture(scope="module")
def good_onnx(model, tmp_path_factory):
    return build_onnxruntime(model, tmp_path_factory.mktemp("good_onnx") / "art")


@pytest.fixture(scope="module")
def good_recipe(model, tmp_path_factory):
    return build_torch(model, tmp_path_factory.mktemp("good_recipe") / "art")


MANIFEST_ATTACKS = {
    "dot-dot": ("../canary.bin", r"'\.\.'"),
    "nested dot-dot": ("a/../../canary.bin", r"'\.\.'"),
    "absolute": (None, "absolute"),
}


@pytest.mark.parametrize("attack", list(MANIFEST_ATTACKS))
def test_manifest_path_attacks_are_refused_before_reading(attack, good_recipe, model, canary, tmp_path):
    d = tmp_path / "art"
    shutil.copytree(good_recipe, d)
    name, match = MANIFEST_ATTACKS[attack]
    name = name or str(canary.path)
    digest = hashlib.sha256(canary.content).hexdigest()  # the attacker knows the canary: the hash would match
    forge(d, lambda m: m["files"].__setitem__(name, digest))
    with pytest.raises(lowbit.ArtifactError, match=match) as e:
        lowbit.load(d, model=model)
    assert "outside the artifact directory" in str(e.value) and name in str(e.value)
    PATH_ATTACKS.update(refused=1, manifest=1)
    canary.assert_untouched()


@pytest.mark.parametrize("which", ["listed file", "manifest.json", "unlisted plan.json"])
def test_symlinks_out_of_the_directory_are_refused(which, good_recipe, model, canary, tmp_path):
    d = tmp_path / "art"
    shutil.copytree(good_recipe, d)
    if which == "listed file":
        (d / "qparams.safetensors").unlink()
        (d / "qparams.safetensors").symlink_to(canary.path)
        forge(d, lambda m: m["files"].__setitem__("qparams.safetensors", hashlib.sha256(canary.content).hexdigest()))
        target = "qparams.safetensors"
    elif which == "manifest.json":
        outside = tmp_path / "evil_manifest.json"
        shutil.move(str(d / MANIFEST), outside)
        (d / MANIFEST).symlink_to(outside)
        target = MANIFEST
    else:
        forge(d, lambda m: m["files"].pop("plan.json"))
        (d / "plan.json").unlink()
        (d / "plan.json").symlink_to(canary.path)
        target = "plan.json"
    with pytest.raises(lowbit.ArtifactError, match="outside the artifact directory") as e:
        lowbit.load(d, model=model)
    assert target in str(e.value) and "symlink" in str(e.value)
    PATH_ATTACKS.update(refused=1, symlink=1)
    canary.assert_untouched()


ONNX_ATTACKS = ["../canary.bin", "sub/../../canary.bin", "ABSOLUTE", "symlink", "unlisted"]


@pytest.mark.parametrize("location", ONNX_ATTACKS)
def test_onnx_external_data_locations_out_of_the_directory_are_refused(location, good_onnx, canary, tmp_path):
    d = tmp_path / "art"
    shutil.copytree(good_onnx, d)
    if location == "ABSOLUTE":
        location = str(canary.path)
    elif location == "symlink":
        (d / "weights.bin").symlink_to(canary.path)
        location = "weights.bin"
    elif location == "unlisted":  # a plain file inside the directory, but not covered by the manifest
        (d / "weights.bin").write_bytes(canary.content)
        location = "weights.bin"
    tensor = onnx_with_external(d, location)
    forge(d, (lambda m: m["files"].__setitem__("weights.bin", hashlib.sha256(canary.content).hexdigest()))
          if location == "weights.bin" and (d / "weights.bin").is_symlink() else None)
    with pytest.raises(lowbit.ArtifactError) as e:
        lowbit.load(d)
    msg = str(e.value)
    if (d / "weights.bin").is_symlink():  # listed, so the manifest check refuses it before the model is read
        assert "weights.bin: is a symlink" in msg and "outside the artifact directory" in msg, msg
    else:
        assert f"tensor {tensor!r} has its data in {location!r}" in msg, msg
        assert re.search(r"outside the artifact directory|not listed in the manifest", msg), msg
    PATH_ATTACKS.update(refused=1, onnx=1)
    canary.assert_untouched()


def test_onnx_external_data_inside_the_directory_still_loads(good_onnx, tmp_path):
    """The >2 GB path: weights in model.onnx.data next to the model, listed in the manifest."""
    d = tmp_path / "art"
    shutil.copytree(good_onnx, d)
    model = onnx.load(str(d / "model.onnx"))
    onnx.save_model(model, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    forge(d, lambda m: m["files"].__setitem__("model.onnx.data", ""))
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(lowbit.load(d)(x), lowbit.load(good_onnx)(x))


# -- static scan ------------------------------------------------------------------------------------------------

UNSAFE = {
    "pickle.load": re.compile(r"\b(c?pickle|dill|joblib)\.loads?\s*\("),
    "torch.load without weights_only=True": re.compile(r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)"),
    "torch.export.load": re.compile(r"\btorch\.export\.load\s*\("),
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
}


def test_static_scan_finds_no_unsafe_deserialisation():
    hits = []
    sources = sorted((ROOT / "lowbit").rglob("*.py"))
    for path in sources:
        text = path.read_text()
        for what, pattern in UNSAFE.items():
            for m in pattern.finditer(text):
                hits.append(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {what}")
    print(f"\n[static scan] {len(sources)} files in lowbit/: unsafe deserialisation calls: {len(hits)}")
    assert len(sources) > 20
    assert hits == []
    # the patterns do fire on what they are meant to find
    assert UNSAFE["torch.load without weights_only=True"].search("torch.load(path, map_location='cpu')")
    assert not UNSAFE["torch.load without weights_only=True"].search("torch.load(path, weights_only=True)")
    assert UNSAFE["pickle.load"].search("x = pickle.load(f)")
