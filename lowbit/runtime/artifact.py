"""Artifact directories: written to a temp dir and renamed into place; read back only if every file
matches the SHA-256 recorded in manifest.json, and the manifest matches its own hash.

No pickle: artifacts hold JSON, safetensors and ONNX only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _self_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """safetensors refuses tensors that share storage (e.g. one SmoothQuant scale used by Q, K and V):
    every entry gets its own copy."""
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path))


def write_artifact(directory: str | os.PathLike[str], writer: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
    """Call ``writer(tmpdir)`` to fill a temp dir, hash its files into the manifest, rename into place."""
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        writer(tmp)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        manifest["manifest_sha256"] = _self_hash(manifest)
        write_json(tmp / MANIFEST, manifest)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a verified artifact directory; ArtifactError names the first problem found."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d}: no such artifact directory")
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {d} is not a lowbit artifact (or was not fully written)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: has no 'files' table")
    if manifest.get("manifest_sha256") != _self_hash(manifest):
        raise ArtifactError(f"{path}: was altered after it was written (its self-hash does not match)")
    for name, digest in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: SHA-256 does not match the manifest (the file was altered)")
    return manifest


def load_tensors(directory: str | os.PathLike[str], name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(directory) / name))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ArtifactError(f"{Path(directory) / name}: cannot be read as safetensors ({e})") from e


def load_json(directory: str | os.PathLike[str], name: str) -> Any:
    p = Path(directory) / name
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p}: cannot be read as JSON ({e})") from e
