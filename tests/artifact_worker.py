"""A persistent artifact loader for the hostile-artifact tests (tests/test_reliability_artifacts.py).

Started as ``python tests/artifact_worker.py``; after importing lowbit it writes ``{"ready": true}``,
then reads one JSON request per line from stdin, ``{"path": DIR, "model": "cnn" | null}``, calls
``lowbit.load(DIR)`` (with ``model=`` the test CNN for target="torch" recipes), runs the loaded model
once on zero inputs, and answers one JSON line: ``{"ok": true}`` or
``{"ok": false, "error_type": "ArtifactError", "msg": "..."}``.

The protocol runs on a private copy of the original stdout: fd 1 is pointed at stderr, so whatever a
library prints cannot corrupt the answers. A crash (signal) or a hang is seen by the parent, which
kills and restarts the worker.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import SmallResNet, randomize_bn  # noqa: E402


def cnn() -> torch.nn.Module:
    """The CNN the artifact tests compile; rebuilt identically here for target="torch" recipes."""
    torch.manual_seed(0)
    return randomize_bn(SmallResNet(width=8))


def handle(request: dict[str, Any], models: dict[str, torch.nn.Module]) -> dict[str, Any]:
    import lowbit

    name = request.get("model")
    kwargs: dict[str, Any] = {}
    if name:
        if name not in models:
            models[name] = {"cnn": cnn}[name]()
        kwargs["model"] = models[name]
    try:
        compiled = lowbit.load(request["path"], **kwargs)
    except Exception as e:  # the test counts the type: anything but ArtifactError is a failure
        return {"ok": False, "error_type": type(e).__name__, "msg": str(e)[:2000]}
    try:
        compiled(*compiled.signature.example_tensors())
    except Exception as e:
        return {"ok": True, "ran": False, "error_type": type(e).__name__, "msg": str(e)[:2000]}
    return {"ok": True, "ran": True}


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import lowbit  # noqa: F401  import before "ready": the parent's per-mutant clock starts after it

    models: dict[str, torch.nn.Module] = {}
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        out.write(json.dumps(handle(json.loads(line), models)) + "\n")


if __name__ == "__main__":
    main()
