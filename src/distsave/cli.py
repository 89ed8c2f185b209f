"""The ``distsave`` command: ``demo``, ``inspect``, ``run``, ``verify``, ``serve`` and ``export-onnx``."""

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
    """The architecture as an indented tree; anything unexpected is shown as it is."""
    if not isinstance(spec, dict):
        return [f"{indent}{_show(spec)}"]
    name = spec.get("class", "?")
    children = spec.get("layers", spec.get("children"))
    if isinstance(children, list):
        children = dict(enumerate(children))
    if isinstance(children, dict):
        lines = [f"{indent}{name}"]
        for key, child in children.items():
            sub = _architecture_lines(child, indent + "  ")
            lines += [f"{indent}  ({key}) {sub[0].strip()}", *sub[1:]]
        return lines
    if "network" in spec:
        return [f"{indent}{name}", *_architecture_lines(spec["network"], indent + "  ")]
    config = spec.get("config")
    args = ", ".join(f"{k}={_show(v)}" for k, v in config.items()) if isinstance(config, dict) else ""
    return [f"{indent}{name}({args})"]


def _show(value: Any) -> str:
    """A recorded constructor argument, written as Python would show it."""
    if isinstance(value, dict) and set(value) == {"tuple"} and isinstance(value["tuple"], list):
        items = [_show(v) for v in value["tuple"]]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, dict) and set(value) == {"module"} and isinstance(value["module"], dict):
        return f"{value['module'].get('class', '?')}(...)"
    if isinstance(value, dict) and set(value) == {"dict"} and isinstance(value["dict"], dict):
        return "{" + ", ".join(f"{k!r}: {_show(v)}" for k, v in value["dict"].items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor_table(snapshot: Any) -> list[dict[str, Any]]:
    """Every stored tensor, from the checked safetensors headers (no tensor data is read)."""
    from .saving.format import CONSTANTS, OPTIMIZER, WEIGHTS, index_file, single_file
    from .saving.tensor_io import DTYPES

    codes = {dtype: code for code, dtype in DTYPES.items()}
    rows = []
    for stem in (WEIGHTS, OPTIMIZER, CONSTANTS):
        if snapshot.has(single_file(stem)) or snapshot.has(index_file(stem)):
            for name, entry in sorted(snapshot.tensor_files(stem).items()):
                rows.append({"file": snapshot.file_of(stem, name), "name": name, "shape": list(entry.shape),
                             "dtype": codes[entry.dtype], "bytes": entry.nbytes})
    return rows


def _inspect(args: argparse.Namespace) -> int:
    from .saving.snapshot import Snapshot

    root = Path(args.path)
    with Snapshot.open(root) as snapshot, snapshot.damage_first():
        manifest, tensors = snapshot.manifest, _tensor_table(snapshot)
    if args.json:
        print(json.dumps({"manifest": manifest, "tensors": tensors}, indent=2))
        return 0
    written = manifest["written_by"]
    print(f"{root}: distsave {manifest['kind']} (format {manifest['format']} v{manifest['format_version']})")
    print("written by: " + ", ".join(f"{k} {v}" for k, v in written.items()))
    if manifest.get("trained_under"):
        print(f"trained under: {manifest['trained_under']}")
    if manifest.get("input_spec"):
        print("inputs: " + ", ".join(f"{s.get('name', 'x')}: {s['dtype']}{s['shape']}" for s in manifest["input_spec"]))
    print(f"parameters: {manifest.get('parameter_count', 0):,}")
    if manifest.get("uninitialized"):
        print(f"note: the model was saved before it was built: {len(manifest['uninitialized'])} lazy "
              "tensor(s) have no shape yet, so there are no signatures and those weights are not stored")
    if manifest.get("architecture"):
        print("architecture:")
        print("\n".join(_architecture_lines(manifest["architecture"])))
        print(_summary(manifest))
    if manifest.get("compile"):
        print("compile: " + _compile_line(manifest["compile"]))
    if manifest.get("training_state"):
        state = manifest["training_state"]
        print(f"training state: epoch {state.get('epoch', 0)}, step {state.get('step', 0)}")
    print(f"tensors ({len(tensors)}, {sum(t['bytes'] for t in tensors):,} bytes):")
    for t in tensors:
        print(f"  {t['file']:<24} {t['name']:<40} {t['dtype']:<5} {str(t['shape']):<18} {t['bytes']:>12,}")
    signatures = manifest.get("signatures") or {}
    print(f"signatures ({len(signatures)}):" if signatures else "signatures: none")
    for name, entry in signatures.items():
        ins = ", ".join(f"{s.get('name', 'x')}: {s['dtype']}{s['shape']}" for s in entry["inputs"])
        print(f"  {name}({ins}) -> {{{', '.join(entry['outputs'])}}}")
    return 0


def _summary(manifest: dict[str, Any]) -> str:
    """The Keras-style summary of the architecture, built on ``meta`` (nothing allocated)."""
    import torch

    from .saving.architecture import build_module
    from .training.specs import TensorSpec
    from .training.summary import format_summary

    try:
        specs = [TensorSpec.from_json(s) for s in manifest.get("input_spec") or []]
        with torch.device("meta"):
            module = build_module(manifest["architecture"])
            return format_summary(module, specs or None)
    except Exception as error:  # display only: say why, never fail the inspection
        return f"summary: not available here ({type(error).__name__}: {str(error)[:200]})"


def _compile_line(config: dict[str, Any]) -> str:
    """Loss, optimizer, learning rate and metrics, from a schema-checked compile entry."""
    loss = config["loss"]
    spec = loss.get("spec") if isinstance(loss.get("spec"), dict) else {}
    loss_name = loss.get("class") or loss.get("name") or spec.get("class")
    optimizer = config["optimizer"]
    groups = optimizer["param_groups"]
    metrics = [f"{(m.get('config') or {}).get('name', '?')} ({m['class']})" for m in config.get("metrics", [])]
    return (f"loss={loss_name} optimizer={optimizer['class']} "
            f"lr={groups[0].get('lr') if groups else None} metrics={metrics}")


def _verify(args: argparse.Namespace) -> int:
    from .saving.errors import ArtifactError
    from .saving.format import CONSTANTS, OPTIMIZER, WEIGHTS, index_file, single_file
    from .saving.snapshot import Snapshot

    try:
        with Snapshot.open(args.path) as snapshot, snapshot.damage_first():
            for stem in (WEIGHTS, OPTIMIZER, CONSTANTS):
                if snapshot.has(single_file(stem)) or snapshot.has(index_file(stem)):
                    snapshot.tensor_files(stem)
            snapshot.verify_remaining()
            count, checksum = len(snapshot.names()), snapshot.checksum.field
    except ArtifactError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    print(f"OK: {args.path}: {count} files match their {checksum} checksums")
    return 0


def _run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .saving.loaded import load

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


def _missing_extra(args: argparse.Namespace, error: ImportError) -> int:
    print(f"distsave {args.command}: {error}", file=sys.stderr)
    return 1


def _serve(args: argparse.Namespace) -> int:
    try:
        from .serving import ServeConfig, serve
    except ImportError as error:
        return _missing_extra(args, ImportError(f"{error}. Install the server: pip install 'distsave[serve]'."))
    try:
        serve(ServeConfig(path=args.path, name=args.name, host=args.host, port=args.port, device=args.device,
                          max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                          max_body_bytes=args.max_body_bytes, poll_seconds=args.poll_seconds))
    except (OSError, ValueError) as error:  # a port in use, or a setting out of range
        print(f"distsave serve: {error}", file=sys.stderr)
        return 1
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from .export import compare_with_onnxruntime, export_onnx

    try:
        out = export_onnx(args.path, args.out, signature=args.signature, opset_version=args.opset)
    except ImportError as error:
        return _missing_extra(args, error)
    print(f"wrote {out} (signature {args.signature}, {out.stat().st_size:,} bytes)")
    try:
        differences = compare_with_onnxruntime(out, args.path, signature=args.signature)
    except ImportError:
        print("onnxruntime is not installed: outputs not compared")
        return 0
    print("onnxruntime vs signature, max |diff|: "
          + ", ".join(f"{d:.1e} at batch {b}" for b, d in differences.items()))
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
                      help="train on N CPU replicas, N processes sharing the CPU's cores "
                           "(default: every GPU, else one CPU replica, the fastest on a CPU)")
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
    serve = sub.add_parser("serve", help="serve an artifact over TF Serving's REST API")
    serve.add_argument("path", help="an artifact, a folder of numbered versions (1/, 2/, ...), or a URL")
    serve.add_argument("--name", default="default", help="model name in /v1/models/<name> (default: default)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8501, help="TCP port; 0 picks a free one (default 8501)")
    serve.add_argument("--device", default="cpu", help="where signatures run: cpu, cuda:0, ... (default cpu)")
    serve.add_argument("--max-batch-size", type=int, default=0,
                       help="dynamic batching: merge requests up to N rows (default 0: off)")
    serve.add_argument("--batch-timeout-ms", type=float, default=2.0,
                       help="dynamic batching: wait at most T ms for more requests (default 2)")
    serve.add_argument("--max-body-bytes", type=int, default=64 * 2**20,
                       help="refuse larger request bodies with 400 (default 64 MiB)")
    serve.add_argument("--poll-seconds", type=float, default=1.0,
                       help="check for a new version folder this often; 0: never (default 1)")
    serve.set_defaults(handler=_serve)
    onnx = sub.add_parser("export-onnx", help="export a signature as an ONNX model")
    onnx.add_argument("path")
    onnx.add_argument("out", help="the .onnx file to write")
    onnx.add_argument("--signature", default="serving_default")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    onnx.set_defaults(handler=_export_onnx)
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
