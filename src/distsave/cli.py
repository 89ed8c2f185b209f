"""The ``distsave`` command: ``demo``, ``inspect``, ``run`` and ``verify``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _architecture_lines(spec: Any, indent: str = "  ") -> list[str]:
    if not isinstance(spec, dict):
        return [f"{indent}{spec!r}"]
    name = spec.get("class", "?")
    if "layers" in spec:
        lines = [f"{indent}{name}"]
        for i, layer in enumerate(spec["layers"]):
            sub = _architecture_lines(layer, indent + "  ")
            lines += [f"{indent}  ({i}) {sub[0].strip()}", *sub[1:]]
        return lines
    if "network" in spec:
        return [f"{indent}{name}", *_architecture_lines(spec["network"], indent + "  ")]
    if "children" in spec:
        lines = [f"{indent}{name}"]
        for key, child in spec["children"].items():
            sub = _architecture_lines(child, indent + "  ")
            lines += [f"{indent}  ({key}) {sub[0].strip()}", *sub[1:]]
        return lines
    config = spec.get("config", {})
    args = ", ".join(f"{k}={_show(v)}" for k, v in config.items())
    return [f"{indent}{name}({args})"]


def _show(value: Any) -> str:
    """A recorded constructor argument, written as Python would show it."""
    if isinstance(value, dict) and set(value) == {"tuple"}:
        items = [_show(v) for v in value["tuple"]]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, dict) and set(value) == {"module"}:
        return f"{value['module'].get('class', '?')}(...)"
    if isinstance(value, dict) and set(value) == {"dict"}:
        return "{" + ", ".join(f"{k!r}: {_show(v)}" for k, v in value["dict"].items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _tensor_table(root: Path) -> list[dict[str, Any]]:
    from safetensors import safe_open

    rows = []
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shape, dtype = piece.get_shape(), piece.get_dtype()
                count = 1
                for d in shape:
                    count *= d
                rows.append({"file": file.name, "name": key, "shape": shape, "dtype": dtype,
                             "bytes": count * _DTYPE_BYTES.get(dtype, 4)})
    return rows


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}


def _inspect(args: argparse.Namespace) -> int:
    from .saving.manifest import read_manifest

    root = Path(args.path)
    manifest = read_manifest(root)
    tensors = _tensor_table(root)
    if args.json:
        print(json.dumps({"manifest": manifest, "tensors": tensors}, indent=2))
        return 0
    written = manifest["written_by"]
    print(f"{root}: distsave {manifest['kind']} (format {manifest['format']} v{manifest['format_version']})")
    print("written by: " + ", ".join(f"{k} {v}" for k, v in written.items()))
    if manifest.get("trained_under"):
        print(f"trained under: {manifest['trained_under']}")
    if manifest.get("input_spec"):
        print("inputs: " + ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in manifest["input_spec"]))
    print(f"parameters: {manifest.get('parameter_count', 0):,}")
    if manifest.get("architecture"):
        print("architecture:")
        print("\n".join(_architecture_lines(manifest["architecture"])))
    if manifest.get("compile"):
        c = manifest["compile"]
        loss = c["loss"].get("class") or c["loss"].get("name") or c["loss"].get("spec", {}).get("class")
        print(f"compile: loss={loss} optimizer={c['optimizer']['class']} "
              f"lr={c['optimizer']['param_groups'][0].get('lr')} "
              f"metrics={[m['config'].get('name') + ' (' + m['class'] + ')' for m in c['metrics']]}")
    if manifest.get("training_state"):
        state = manifest["training_state"]
        print(f"training state: epoch {state['epoch']}, step {state['step']}")
    print(f"tensors ({len(tensors)}, {sum(t['bytes'] for t in tensors):,} bytes):")
    for t in tensors:
        print(f"  {t['file']:<24} {t['name']:<40} {t['dtype']:<5} {str(t['shape']):<18} {t['bytes']:>12,}")
    signatures = manifest.get("signatures") or {}
    print(f"signatures ({len(signatures)}):" if signatures else "signatures: none")
    for name, entry in signatures.items():
        ins = ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in entry["inputs"])
        print(f"  {name}({ins}) -> {{{', '.join(entry['outputs'])}}}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .saving.errors import ArtifactError
    from .saving.manifest import read_manifest

    try:
        manifest = read_manifest(args.path)
    except ArtifactError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    print(f"OK: {args.path}: {len(manifest['files'])} files match their sha256 checksums")
    return 0


def _run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .saving.saved_model import load

    loaded = load(args.path)
    if args.signature not in loaded.signatures:
        print(f"Unknown signature {args.signature!r}; available: {sorted(loaded.signatures)}", file=sys.stderr)
        return 2
    positional, named = [], {}
    for item in args.input:
        name, sep, file = item.partition("=")
        tensor = torch.from_numpy(np.load(file if sep else name, allow_pickle=False))
        if sep:
            named[name] = tensor
        else:
            positional.append(tensor)
    with torch.no_grad():
        outputs = loaded.signatures[args.signature](*positional, **named)
    np.set_printoptions(threshold=args.max_values, edgeitems=3)
    for name, tensor in outputs.items():
        print(f"Result for output key {name}:")
        print(tensor.detach().cpu().numpy())
    if args.output:
        np.savez(args.output, **{k: v.detach().cpu().numpy() for k, v in outputs.items()})
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(cpu_replicas=args.cpu_replicas, epochs=args.epochs, workdir=args.workdir,
                    quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distsave", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole workflow on bundled MNIST")
    demo.add_argument("--cpu-replicas", type=int, default=None,
                      help="train on N CPU replicas (default: every GPU, else 2 CPU replicas)")
    demo.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    demo.add_argument("--workdir", default="distsave-demo", help="where artifacts are written")
    demo.add_argument("--quick", action="store_true",
                      help="every step on 200 training steps and 2,000 test images (for CI)")
    demo.set_defaults(handler=_demo)
    inspect = sub.add_parser("inspect", help="summarise an artifact")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(handler=_inspect)
    verify = sub.add_parser("verify", help="check every file's checksum; non-zero exit on failure")
    verify.add_argument("path")
    verify.set_defaults(handler=_verify)
    run = sub.add_parser("run", help="run a signature on .npy inputs, like saved_model_cli run")
    run.add_argument("path")
    run.add_argument("--signature", default="serving_default")
    run.add_argument("--input", action="append", required=True,
                     help="x.npy (positional) or name=x.npy; repeat for several inputs")
    run.add_argument("--output", help="also write the outputs to this .npz file")
    run.add_argument("--max-values", type=int, default=100, help="print at most this many values")
    run.set_defaults(handler=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distsave`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .saving.errors import ArtifactError, SaveError

    try:
        return args.handler(args)
    except (ArtifactError, SaveError, FileNotFoundError) as error:
        print(f"distsave {args.command}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
