"""Artifact directories: written to a temp dir and renamed into place; read back only if every file
matches the SHA-256 recorded in manifest.json, and the manifest matches its own hash.

No pickle: artifacts hold JSON, safetensors and ONNX only. An artifact is untrusted input:

- every name it uses (manifest entries, files the loaders open) is a plain relative path inside the
  directory: absolute names, ``..`` and symlinks that resolve outside are refused before anything is
  opened;
- every file is hashed before any parser sees it, so damage is reported as a hash mismatch;
- a save is crash-atomic: a process killed at any point leaves the destination absent, the old
  artifact, or the new one, never a mix (on Linux the new directory is swapped in with one
  ``renameat2(RENAME_EXCHANGE)``; elsewhere there is a short window in which the destination is absent).
  Temp directories a killed save left behind are removed by the next save to the same place.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import ArtifactError, LowbitError

T = TypeVar("T")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


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


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors refuses tensors that share storage (e.g. one SmoothQuant scale used by Q, K and V):
    every entry gets its own copy."""
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


#: manifest entries and files a wrapper adds to the artifact its inner model writes (a causal LM's cache
#: layout and tokenizer around the step graph's artifact, whatever the target)
_EXTRA: contextvars.ContextVar[tuple[dict[str, Any], Callable[[Path], None]] | None] = contextvars.ContextVar(
    "lowbit_artifact_extra", default=None)


@contextlib.contextmanager
def extra_content(manifest: dict[str, Any], writer: Callable[[Path], None]) -> Iterator[None]:
    """Within the block, every ``write_artifact`` also writes ``writer(tmpdir)`` and the ``manifest`` entries."""
    token = _EXTRA.set((manifest, writer))
    try:
        yield
    finally:
        _EXTRA.reset(token)


def write_artifact(directory: str | os.PathLike[str], writer: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
    """Call ``writer(tmpdir)`` to fill a temp dir, hash its files into the manifest (written last), then
    rename it into place, or swap it with what is there in one atomic exchange (Linux)."""
    extra = _EXTRA.get()
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        writer(tmp)
        if extra is not None:
            extra[1](tmp)
            manifest = {**manifest, **extra[0]}
        _split_timings(tmp, manifest)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and p.relative_to(tmp).as_posix() not in UNHASHED:
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        manifest["manifest_sha256"] = _self_hash(manifest)
        write_json(tmp / MANIFEST, manifest)  # last: a directory without a manifest is never loaded
        _fsync_tree(tmp)  # every byte on disk before the rename makes the directory visible
        if target.exists() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            _remove(tmp)  # tmp now holds what was at the target
            return target
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)  # the rename itself survives a power loss
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


#: wall-clock figures of the build (pass seconds): they differ between two builds of the same model, so they live
#: in this file, which the manifest does not hash (and no loader reads), and every hashed file is byte-identical
#: across rebuilds
TIMINGS = "timings.json"


#: the human-readable page of the report (lowbit/runtime/report_html.py): it shows the timings, so it is unhashed too
REPORT_HTML = "report.html"
UNHASHED = (MANIFEST, TIMINGS, REPORT_HTML)


def _split_timings(tmp: Path, manifest: Mapping[str, Any]) -> None:
    """report.json's pass timings -> timings.json; report.html from both."""
    report = tmp / "report.json"
    if not report.is_file():
        return
    from lowbit.runtime import report_html

    data = json.loads(report.read_text())
    timings = {"passes": [{"pass": p.get("pass"), "seconds": p.pop("seconds")} for p in data.get("passes", [])
                          if isinstance(p, dict) and "seconds" in p]}
    if timings["passes"]:
        write_json(report, data)
        write_json(tmp / TIMINGS, timings)
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file() and f.name not in UNHASHED)
    meta = {"kind": manifest.get("kind"), "lowbit": manifest.get("lowbit_version"),
            "checkpoint format": manifest.get("checkpoint_format"), "artifact_bytes": size}
    (tmp / REPORT_HTML).write_text(report_html.render(data, timings=timings, meta=meta,
                                                      title=f"lowbit report: {manifest.get('target') or tmp.name}"))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up (a file's directory entry is data of its directory)."""
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda x: -len(x.parts)):
        _fsync_dir(d)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the filesystem cannot exchange: fall back to two renames
    raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _remove_leftovers(target: Path) -> None:
    """Remove the temp / old directories of earlier saves to ``target`` whose process is gone (killed)."""
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    for p in target.parent.iterdir():
        prefix = next((x for x in prefixes if p.name.startswith(x)), None)
        if prefix is None:
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def inside(directory: str | os.PathLike[str], name: str, what: str = "file") -> Path:
    """``directory / name``, refused (ArtifactError) when ``name`` could reach outside the directory.

    Refused before anything is opened: an absolute name, a ``..`` component, a backslash, and a path
    that resolves outside the directory (a symlink, or a symlinked parent, pointing out).
    """
    d = Path(directory)
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ArtifactError(f"{d}: {what} name {name!r} is not a plain relative path; paths outside the artifact "
                            "directory are refused")
    pure = PurePosixPath(name)
    if pure.is_absolute() or os.path.isabs(name):
        raise ArtifactError(f"{d}: {what} name {name!r} is an absolute path; paths outside the artifact "
                            "directory are refused")
    if ".." in pure.parts:
        raise ArtifactError(f"{d}: {what} name {name!r} contains '..'; paths outside the artifact directory "
                            "are refused")
    path = d / name
    real, root = path.resolve(), d.resolve()
    if real != root and root not in real.parents:
        raise ArtifactError(f"{path}: is a symlink (or under one) resolving to {real}, outside the artifact "
                            f"directory {root}: refused")
    return path


def is_lfs_pointer(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a verified artifact directory; ArtifactError names the first problem found.

    Every listed name is checked (relative, no ``..``, no symlink out) before any file is opened, then
    every file is hashed: nothing is parsed before the whole directory matches its manifest.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d}: no such artifact directory")
    path = inside(d, MANIFEST)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {d} is not a lowbit artifact (or was not fully written)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        lfs = " (it is a Git LFS pointer: run `git lfs pull`)" if is_lfs_pointer(path) else ""
        raise ArtifactError(f"{path}: not valid JSON{lfs} ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: has no 'files' table")
    if manifest.get("manifest_sha256") != _self_hash(manifest):
        raise ArtifactError(f"{path}: was altered after it was written (its self-hash does not match)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r}; this lowbit reads "
                            f"version {FORMAT_VERSION}")
    files = {inside(d, name, "manifest file"): digest for name, digest in manifest["files"].items()}
    for f, digest in files.items():
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing")
        if sha256_file(f) != digest:
            lfs = " (it is a Git LFS pointer, not the file: run `git lfs pull`)" if is_lfs_pointer(f) else ""
            raise ArtifactError(f"{f}: SHA-256 does not match the manifest (the file was altered){lfs}")
    return manifest


def load_tensors(directory: str | os.PathLike[str], name: str) -> dict[str, torch.Tensor]:
    p = inside(directory, name)
    if not p.is_file():
        raise ArtifactError(f"{p}: missing (or not a regular file)")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ArtifactError(f"{p}: cannot be read as safetensors ({e})") from e


def load_json(directory: str | os.PathLike[str], name: str) -> Any:
    p = inside(directory, name)
    if not p.is_file():
        raise ArtifactError(f"{p}: missing (or not a regular file)")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{p}: cannot be read as JSON ({e})") from e


def parse(directory: str | os.PathLike[str], name: str, build: Callable[[Any], T]) -> T:
    """``build(JSON of directory/name)``; a schema error (a missing key, a wrong type, a bad plan entry)
    becomes an ArtifactError naming the file."""
    obj = load_json(directory, name)
    try:
        return build(obj)
    except ArtifactError:
        raise
    except (LowbitError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ArtifactError(f"{Path(directory) / name}: not a valid {name} ({type(e).__name__}: {e})") from e
