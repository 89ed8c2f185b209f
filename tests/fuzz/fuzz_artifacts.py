"""Fuzz every artifact parser the way an attacker would: mutate, recompute every checksum, load.

    python tests/fuzz/fuzz_artifacts.py --seconds 600 --seed 1 [--report out.json]

Each round copies a valid artifact (a model directory, a two-signature saved model, a sharded
one), mutates one thing — a manifest field, a safetensors header, a program's JSON (names
included), or raw bytes — reseals the manifest so the mutation reaches the parsers, then loads
it with `load_model`, `saved_model.load` (calling its signatures), `distsave inspect` and
`distsave verify`. The only acceptable outcomes are success or `ArtifactError`; any other
exception is a finding, and so is the canary file appearing (a payload ran). A round that takes
longer than ``--round-timeout`` seconds aborts the run with every thread's stack (a hang).
The suite runs it for a short, seeded time (tests/fuzz/test_fuzz.py); release checks run it long.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import json
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import distsave  # noqa: E402
from distsave import ArtifactError  # noqa: E402
from distsave.cli import main as cli_main  # noqa: E402
from distsave.saved_model import Signature  # noqa: E402
from distsave.saving.format import MANIFEST  # noqa: E402
from distsave.saving.manifest import seal_manifest  # noqa: E402
from distsave.saving.tensor_io import chunk_digests  # noqa: E402


def payloads(canary: Path) -> list[Any]:
    """Values an attacker would try in any JSON position."""
    code = f"__import__('os').system('touch {canary}')"
    return [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1.5, float("inf"), "",
            "x", "../x", "/etc/passwd", "/dev/zero", "a" * 5000, code, f"x; {code}", f"x\n{code}",
            f"x = {code}  #", "__class__", "0", "1e309", [], {}, [[[[[]]]]], {"class": code},
            {"tuple": [1, code]}, {"module": {"class": code}}, [None] * 50]


def build_sources(workdir: Path) -> list[Path]:
    """Valid artifacts to start every round from."""
    torch.manual_seed(0)
    spec = distsave.TensorSpec((None, 1, 8, 8))
    model = distsave.Sequential([nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 4)], input_spec=spec)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model.fit(torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,)), epochs=1, verbose=0)
    model.save(workdir / "model")
    model.save(workdir / "sharded", max_shard_size=200)

    def features(x):
        return model.layers[2](model.layers[1](model.layers[0](x)))

    distsave.saved_model.save(model, workdir / "saved", signatures={
        "serving_default": model, "features": Signature(features, output_names=["features"])})
    return [workdir / "model", workdir / "sharded", workdir / "saved"]


def reseal(artifact: Path, edit=None) -> None:
    """Recompute every file's checksums, apply ``edit`` to the manifest, and seal it."""
    try:
        manifest = json.loads((artifact / MANIFEST).read_bytes())
    except ValueError:
        return  # the manifest itself was damaged: nothing to reseal
    if not isinstance(manifest, dict):
        return
    manifest["files"] = {p.relative_to(artifact).as_posix(): chunk_digests(p.read_bytes()).to_json()
                         for p in sorted(artifact.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = edit(manifest) if edit is not None else manifest
    if isinstance(manifest, dict):
        manifest = seal_manifest(manifest)
    (artifact / MANIFEST).write_text(json.dumps(manifest, default=str))


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position (as a key path) inside a JSON value."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += json_paths(item, prefix + (index,))
    return found


def mutate_json(value: Any, rng: random.Random, pool: list[Any]) -> Any:
    """Replace, delete or rename one position of ``value`` (returns the new root)."""
    paths = json_paths(value)
    path = rng.choice(paths)
    if not path:
        return rng.choice(pool)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = rng.random()
    if action < 0.6:
        parent[key] = rng.choice(pool)
    elif action < 0.8:
        del parent[key]
    elif isinstance(parent, dict):
        parent[str(rng.choice(pool))] = parent.pop(key)
    else:
        parent.insert(key, rng.choice(pool))
    return value


def mutate(artifact: Path, rng: random.Random, pool: list[Any]) -> str:
    """Apply one mutation to ``artifact``; returns a description."""
    files = sorted(p for p in artifact.rglob("*") if p.is_file())
    target = rng.choice(files)
    name = target.relative_to(artifact).as_posix()
    kind = rng.random()
    if name == MANIFEST and kind < 0.8:
        reseal(artifact, lambda manifest: mutate_json(manifest, rng, pool))
        return "manifest field"
    data = bytearray(target.read_bytes())
    if name.endswith(".safetensors") and kind < 0.6 and len(data) >= 8:
        length = struct.unpack("<Q", data[:8])[0]
        try:
            header = json.loads(data[8:8 + length])
            header = mutate_json(header, rng, pool)
            text = json.dumps(header).encode()
        except (ValueError, TypeError):
            text = bytes(data[8:8 + length])
        prefix = struct.pack("<Q", len(text) if rng.random() < 0.8 else rng.choice([0, 7, 2**40, len(text) + 1]))
        target.write_bytes(prefix + text + bytes(data[8 + length:]))
        reseal(artifact)
        return f"header of {name}"
    if name.endswith(".json") and kind < 0.8:
        try:
            content = mutate_json(json.loads(data), rng, pool)
            target.write_text(json.dumps(content, default=str))
        except (ValueError, TypeError):
            pass
        reseal(artifact)
        return f"JSON of {name}"
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)]
    target.write_bytes(bytes(data))
    if rng.random() < 0.9:
        reseal(artifact)
    return f"bytes of {name}"


def exercise(artifact: Path) -> None:
    """Every loader and command on the artifact; only ArtifactError may come out."""
    for load in (distsave.load_model, distsave.saved_model.load):
        try:
            loaded = load(artifact)
        except ArtifactError:
            continue
        if hasattr(loaded, "signatures"):
            for signature in loaded.signatures.values():
                inputs = [torch.zeros([2 if d is None else min(d, 64) for d in s.shape], dtype=s.torch_dtype)
                          for s in signature.inputs]
                with contextlib.suppress(RuntimeError, ValueError, TypeError, IndexError):
                    signature(*inputs)  # a changed program may compute nonsense; it must not run code
    for command in ("inspect", "verify"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli_main([command, str(artifact)])
        if code not in (0, 1):
            raise AssertionError(f"distsave {command} exited {code}")


def run(seconds: float, seed: int, round_timeout: float) -> dict[str, Any]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="distsave-fuzz-") as tmp:
        workdir = Path(tmp)
        canary = workdir / "CANARY"
        pool = payloads(canary)
        sources = build_sources(workdir / "sources")
        findings: dict[str, dict[str, Any]] = {}
        rounds = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rounds += 1
            artifact = workdir / f"round-{rounds}"
            shutil.copytree(rng.choice(sources), artifact)
            what = mutate(artifact, rng, pool)
            faulthandler.dump_traceback_later(round_timeout, exit=True)
            try:
                exercise(artifact)
            except Exception as error:  # every non-ArtifactError is a finding
                site = traceback.extract_tb(error.__traceback__)[-1]
                key = f"{type(error).__name__} at {Path(site.filename).name}:{site.lineno}"
                findings.setdefault(key, {"mutation": what, "message": str(error)[:300], "count": 0})
                findings[key]["count"] += 1
            finally:
                faulthandler.cancel_dump_traceback_later()
            if canary.exists():
                findings["CANARY"] = {"mutation": what, "message": "a payload ran", "count": 1}
                break
            shutil.rmtree(artifact, ignore_errors=True)
        return {"seed": seed, "rounds": rounds, "findings": findings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-timeout", type=float, default=60)
    parser.add_argument("--report", help="also write the JSON report here")
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    report = run(args.seconds, args.seed, args.round_timeout)
    text = json.dumps(report, indent=1)
    if args.report:
        Path(args.report).write_text(text)
    print(text)
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
