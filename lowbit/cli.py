"""The ``lowbit`` command: quantize, evaluate, generate and benchmark (``lowbit/cli_llm.py``); look into, verify and
run saved artifacts.

    lowbit quantize MODEL --out DIR [--target T] [--scheme S --group-size G --weight-method M]
                                [--calibration FILE] [--samples N --seq-len L] [--export compressed-tensors|gguf]
    lowbit eval DIR [--text FILE] [--seq-len 512] [--model MODEL]
    lowbit generate DIR "prompt" [--max-new-tokens 64] [--temperature 0]
    lowbit bench DIR [--threads 2] [--batch 1 --prompt 128 --new 128]

    lowbit inspect DIR          manifest, plan summary, per-layer report (verifies hashes first)
    lowbit verify DIR           check every file against the manifest's SHA-256; exit 1 on a mismatch
    lowbit run DIR --inputs IN.safetensors [--out OUT.safetensors]
                                run an ONNX artifact on inputs stored as safetensors (names = input names)
    lowbit trt-check MODEL.onnx|DIR [--json]
                                check a QDQ ONNX (or an artifact's model.onnx) against TensorRT's Q/DQ rules;
                                exit 1 on a violation
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from lowbit.errors import ArtifactError, LowbitError
from lowbit.runtime.artifact import load_json, read_manifest


def _inspect(directory: Path) -> int:
    manifest = read_manifest(directory)
    plan = load_json(directory, "plan.json")
    counts = Counter(v["scheme"] for v in plan["layers"].values())
    print(f"{directory}: lowbit {manifest.get('lowbit_version')} artifact, target {manifest['target']!r} "
          f"({manifest.get('kind')}), {len(manifest['files'])} files verified")
    for s in manifest.get("signature", {}).get("inputs", []):
        print(f"  input  {s['name']}: {s['dtype']}[{', '.join(str(d) for d in s['shape'])}]")
    print(f"  plan: {len(plan['layers'])} layers: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if (directory / "report.json").is_file():
        from lowbit.runtime.report import Report

        print(Report.from_json(load_json(directory, "report.json")))
    return 0


def _verify(directory: Path) -> int:
    manifest = read_manifest(directory)
    print(f"ok: {len(manifest['files'])} files match {directory / 'manifest.json'}")
    return 0


def _run(directory: Path, inputs: Path, out: Path | None) -> int:
    from safetensors.torch import load_file, save_file

    import lowbit

    model = lowbit.load(directory)
    tensors = load_file(str(inputs))
    result = model(**tensors) if model.signature.keywords else model(*tensors.values())
    outs = result if isinstance(result, (tuple, list)) else [result]
    named = {f"output_{i}": t.contiguous() for i, t in enumerate(outs)}
    if out is not None:
        save_file(named, str(out))
    for name, t in named.items():
        print(f"{name}: {str(t.dtype).replace('torch.', '')}{list(t.shape)}")
    return 0


def _trt_check(path: Path, as_json: bool) -> int:
    from lowbit.backends.tensorrt.conformance import check_model

    if path.is_dir():
        read_manifest(path)  # an artifact: its files must match their hashes first
        path = path / "model.onnx"
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ONNX file")
    report = check_model(path)
    print(json.dumps(report.to_json(), indent=2) if as_json else report.format())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("inspect", "verify"):
        p = sub.add_parser(name)
        p.add_argument("directory", type=Path)
    p = sub.add_parser("run")
    p.add_argument("directory", type=Path)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p = sub.add_parser("trt-check", help="check a QDQ ONNX against TensorRT's Q/DQ rules")
    p.add_argument("path", type=Path, help="an .onnx file or an artifact directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    from lowbit.cli_llm import COMMANDS, add_commands

    add_commands(sub)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    if args.command in COMMANDS:  # errors: one line naming the problem, exit code 2 (a traceback with --debug)
        try:
            return COMMANDS[args.command](args)
        except (LowbitError, OSError, ValueError) as e:
            if args.debug:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"lowbit {args.command}: {type(e).__name__}: {first}", file=sys.stderr)
            return 2
    try:
        if args.command == "inspect":
            return _inspect(args.directory)
        if args.command == "verify":
            return _verify(args.directory)
        if args.command == "trt-check":
            return _trt_check(args.path, args.json)
        return _run(args.directory, args.inputs, args.out)
    except LowbitError as e:
        print(f"lowbit {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as e:
        print(f"lowbit {args.command}: invalid JSON: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
