"""The artifact format in one place: file names, kinds, versions, limits and the manifest schema.

Every other module asks this one what a file may be called, how big it may be and what a
manifest may hold; nothing else in `saving/` spells a file name or a limit.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from .checksum import SHA256, for_version
from .errors import ArtifactError, SaveError

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST", "WEIGHTS", "OPTIMIZER",
    "CONSTANTS", "TRAINING_STATE", "SIGNATURES_DIR", "KIND_MODEL", "KIND_SAVED_MODEL",
    "KIND_TRAINING_STATE", "HASH_CHUNK_BYTES", "TENSOR_ALIGNMENT",
    "DEFAULT_MAX_SHARD_BYTES", "MAX_MANIFEST_BYTES", "MAX_PROGRAM_BYTES", "MAX_INDEX_BYTES",
    "MAX_SAFETENSORS_HEADER_BYTES", "MAX_JSON_DEPTH", "MAX_INPUT_ELEMENTS", "MAX_NAME_LENGTH",
    "is_known_file", "check_format", "signature_file", "check_signature_name", "shard_file", "single_file",
    "index_file", "is_identifier_path", "validate_manifest", "chunk_starts",
]

FORMAT_NAME = "distsave"
# 1: one sha256 per file. 2: one sha256 per HASH_CHUNK_BYTES of each file (parallel hashing).
# 3: a file may list where its hashed chunks start ("chunk_starts"), so that several processes
#    writing disjoint byte ranges of one file (a sharded model's slices) each hash their own.
# 4: chunks checked with XXH3-128 instead of sha256 (`checksum`: hashing never limits I/O).
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
WEIGHTS = "model"
OPTIMIZER = "optimizer"
CONSTANTS = "constants"
TRAINING_STATE = "training_state"  # per-replica RNG states and metric sums, for exact resume
SIGNATURES_DIR = "signatures"
KIND_MODEL = "model"
KIND_SAVED_MODEL = "saved_model"
KIND_TRAINING_STATE = "training_state"  # where a fit stopped; a checkpoint pairs it with a model

HASH_CHUNK_BYTES = 16 * 2**20
# Where tensors start in the safetensors files distsave writes: torch's CPU allocator's
# alignment, so a CPU load maps them in place (`mapped`). Files aligned otherwise (other
# writers, older distsave) load all the same: their unaligned tensors are copied.
TENSOR_ALIGNMENT = 64
# Files stay below 4 GiB: under old 32-bit offset tools and single-PUT object-store limits;
# writers and readers work in parallel inside a file, so nothing is gained by smaller shards.
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
MAX_MANIFEST_BYTES = 16 * 2**20
# Export writes ~0.5-1.5 kB a node (with each value's metadata), so a program at the node cap (program_schema.py)
# fits; the cap also bounds the JSON parse and schema walk (benchmarks/program_load.py).
MAX_PROGRAM_BYTES = 32 * 2**20
MAX_INDEX_BYTES = 16 * 2**20
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
MAX_JSON_DEPTH = 128
MAX_INPUT_ELEMENTS = 2**31  # per example, for input specs read from a file
MAX_NAME_LENGTH = 256

_STEMS = f"({WEIGHTS}|{OPTIMIZER}|{CONSTANTS}|{TRAINING_STATE})"
_SIGNATURE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_KNOWN_FILE = re.compile(rf"^({_STEMS}(-\d{{5}}-of-\d{{5}})?\.safetensors"
                         rf"|{_STEMS}\.safetensors\.index\.json"
                         rf"|{SIGNATURES_DIR}/[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}\.json)$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_known_file(name: str) -> bool:
    """Whether ``name`` (relative, POSIX) is a file distsave writes into an artifact."""
    return bool(_KNOWN_FILE.match(name))


def check_signature_name(name: Any, error: type[Exception] = SaveError) -> str:
    """A signature name usable as a file name: letters, digits, ``_``, ``.``, ``-``."""
    if not isinstance(name, str) or not _SIGNATURE_NAME.match(name):
        raise error(f"Expected a signature name of letters, digits, '_', '.' or '-' (at most 128, "
                    f"not starting with '.' or '-'). Received: {name!r}. Rename the signature.")
    return name


def signature_file(name: str) -> str:
    """Where signature ``name`` (already checked by `check_signature_name`) keeps its program."""
    return f"{SIGNATURES_DIR}/{name}.json"


def single_file(stem: str) -> str:
    return f"{stem}.safetensors"


def shard_file(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


def index_file(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def is_identifier_path(name: Any, *, dotted: bool = True) -> bool:
    """A Python identifier, or (``dotted``) a module attribute path such as ``layers.0.weight``
    whose parts are identifiers or child indices; bounded in length."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        return False
    if not dotted:
        return bool(_IDENTIFIER.match(name)) and not keyword.iskeyword(name)
    return all((_IDENTIFIER.match(p) and not keyword.iskeyword(p)) or p.isascii() and p.isdigit()
               for p in name.split("."))


# -- manifest schema ------------------------------------------------------------------------

class _Schema:
    """Type checks that raise `ArtifactError` naming the manifest field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, value: Any) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ArtifactError(f"{self.where}: field '{field}' should be {expected}; found {shown}. "
                            "The manifest is damaged or was not written by distsave.")

    def dict(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def list(self, value: Any, field: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(field, "a list", value)
        return value

    def str(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            self.fail(field, "a string", value)
        return value

    def count(self, value: Any, field: str, *, positive: bool = False) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
            self.fail(field, "a positive integer" if positive else "a non-negative integer", value)
        return value

    def spec(self, value: Any, field: str) -> None:
        spec = self.dict(value, field)
        shape = self.list(spec.get("shape"), f"{field}.shape")
        limit = f"at most 16 dimensions and {MAX_INPUT_ELEMENTS} elements"
        if len(shape) > 16:
            self.fail(f"{field}.shape", limit, shape)
        elements = 1
        for i, d in enumerate(shape):
            if d is not None:
                elements *= min(self.count(d, f"{field}.shape[{i}]"), MAX_INPUT_ELEMENTS + 1)
        if elements > MAX_INPUT_ELEMENTS:
            self.fail(f"{field}.shape", limit, shape)
        if not isinstance(spec.get("dtype"), str) or spec["dtype"] not in _SPEC_DTYPES:
            self.fail(f"{field}.dtype", f"one of {sorted(_SPEC_DTYPES)}", spec.get("dtype"))
        if not is_identifier_path(spec.get("name", "x"), dotted=False):
            self.fail(f"{field}.name", "an identifier", spec.get("name"))


_SPEC_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                          "int8", "uint8", "bool", "complex64", "complex128"})


def check_format(manifest: Any, where: str) -> dict[str, Any]:
    """The checks that come before the manifest's checksum: a distsave manifest of a version
    this code reads, carrying a checksum."""
    s = _Schema(where)
    m = s.dict(manifest, "(top level)")
    if m.get("format") != FORMAT_NAME:
        s.fail("format", f"{FORMAT_NAME!r} (this is not a distsave artifact)", m.get("format"))
    version = s.count(m.get("format_version"), "format_version", positive=True)
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{where} has format_version {version}; this distsave reads versions "
                            f"{list(READABLE_VERSIONS)}. Upgrade distsave to load it.")
    if not SHA256.is_digest(m.get("manifest_sha256")):
        s.fail("manifest_sha256", "a sha256 hex digest", m.get("manifest_sha256"))
    return m


_DEFAULTS = {"signatures": dict, "uninitialized": list, "tied_parameters": list, "optimizer_state": dict, "variables": dict,
             "training_state": dict, "written_by": dict}


def validate_manifest(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a sealed manifest's structure, types and ranges (see DESIGN.md §3), and fill the
    optional fields' defaults so readers need no guesswork.

    Raises:
        ArtifactError: naming the first field that is missing, of the wrong type or out of range.
    """
    s = _Schema(where)
    m = check_format(manifest, where)
    version = m["format_version"]
    for key, default in _DEFAULTS.items():
        if m.get(key) is None:
            m[key] = default()
    for key, value in s.dict(m["written_by"], "written_by").items():
        s.str(value, f"written_by.{key}")
    if m.get("kind") not in (KIND_MODEL, KIND_SAVED_MODEL, KIND_TRAINING_STATE):
        s.fail("kind", f"{KIND_MODEL!r}, {KIND_SAVED_MODEL!r} or {KIND_TRAINING_STATE!r}", m.get("kind"))
    _validate_files(s, m.get("files"), version)
    if m.get("input_spec") is not None:
        for i, spec in enumerate(s.list(m["input_spec"], "input_spec")):
            s.spec(spec, f"input_spec[{i}]")
    if m.get("architecture") is not None:
        s.dict(m["architecture"], "architecture")
    s.count(m.get("parameter_count", 0), "parameter_count")
    for i, name in enumerate(s.list(m["uninitialized"], "uninitialized")):
        s.str(name, f"uninitialized[{i}]")
    for i, group in enumerate(s.list(m["tied_parameters"], "tied_parameters")):
        for j, name in enumerate(s.list(group, f"tied_parameters[{i}]")):
            if not is_identifier_path(name):
                s.fail(f"tied_parameters[{i}][{j}]", "a parameter path", name)
    _validate_signatures(s, m["signatures"])
    _validate_training_fields(s, m)
    if m["kind"] == KIND_MODEL:
        s.dict(m.get("architecture"), "architecture")
        s.list(m.get("input_spec"), "input_spec")
    elif m["kind"] == KIND_TRAINING_STATE:
        _validate_resume_state(s, m.get("resume_state"))
    else:
        for name, entry in s.dict(m["variables"], "variables").items():
            s.dict(entry, f"variables.{name}")
            for i, d in enumerate(s.list(entry.get("shape"), f"variables.{name}.shape")):
                s.count(d, f"variables.{name}.shape[{i}]")
            s.str(entry.get("dtype"), f"variables.{name}.dtype")
    return m


def chunk_starts(size: int, starts: list[int] | None = None) -> list[int]:
    """Where each hashed chunk of a ``size``-byte file starts: the listed ``starts``, or one chunk
    per `HASH_CHUNK_BYTES` (an empty file is one empty chunk)."""
    return starts if starts is not None else list(range(0, max(size, 1), HASH_CHUNK_BYTES))


def _validate_files(s: _Schema, files: Any, version: int) -> None:
    checksum = for_version(version)
    for name, entry in s.dict(files, "files").items():
        if not is_known_file(name):
            s.fail(f"files.{name}", "a file distsave writes (only safetensors and JSON, by known names)", name)
        entry = s.dict(entry, f"files.{name}")
        size = s.count(entry.get("bytes"), f"files.{name}.bytes")
        digests = entry.get(checksum.field)
        if version == 1:
            digests = [digests]
        starts = entry.get("chunk_starts")
        if starts is not None:
            _validate_chunk_starts(s, starts, size, version, f"files.{name}.chunk_starts")
        if version == 1:
            chunks = 1  # one digest of the whole file
        elif starts is not None:
            chunks = len(starts)
        else:
            chunks = max(1, -(-size // HASH_CHUNK_BYTES))  # no list: a size may be huge
        if not isinstance(digests, list) or len(digests) != chunks or not all(map(checksum.is_digest, digests)):
            s.fail(f"files.{name}.{checksum.field}", f"{chunks} {checksum.field} hex digest(s), one per chunk"
                   if version > 1 else f"a {checksum.field} hex digest", entry.get(checksum.field))


def _validate_chunk_starts(s: _Schema, starts: Any, size: int, version: int, field: str) -> None:
    """Strictly increasing offsets from 0, inside the file, no chunk longer than HASH_CHUNK_BYTES
    (which bounds what a reader holds to check one chunk)."""
    if version < 3:
        s.fail(field, "absent before format version 3", starts)
    starts = s.list(starts, field)
    ends = starts[1:] + [max(size, 1)]
    if (not starts or starts[0] != 0
            or not all(isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int)
                       and 0 < b - a <= HASH_CHUNK_BYTES for a, b in zip(starts, ends))):
        s.fail(field, f"increasing byte offsets from 0 below {size}, at most {HASH_CHUNK_BYTES} apart",
               starts[:8] if isinstance(starts, list) else starts)


def _validate_signatures(s: _Schema, signatures: Any) -> None:
    for name, entry in s.dict(signatures, "signatures").items():
        field = f"signatures.{name}"
        check_signature_name(name, ArtifactError)
        entry = s.dict(entry, field)
        if entry.get("program") != signature_file(name):
            s.fail(f"{field}.program", repr(signature_file(name)), entry.get("program"))
        for i, spec in enumerate(s.list(entry.get("inputs"), f"{field}.inputs")):
            s.spec(spec, f"{field}.inputs[{i}]")
        for i, output in enumerate(s.list(entry.get("outputs"), f"{field}.outputs")):
            if not isinstance(output, str) or not 0 < len(output) <= MAX_NAME_LENGTH:
                s.fail(f"{field}.outputs[{i}]", "a non-empty name", output)
        for table in ("state", "constants"):
            for target, source in s.dict(entry.get(table), f"{field}.{table}").items():
                if not is_identifier_path(target):
                    s.fail(f"{field}.{table}", "dotted identifiers as keys", target)
                s.str(source, f"{field}.{table}.{target}")


def _validate_training_fields(s: _Schema, m: dict[str, Any]) -> None:
    state = s.dict(m["training_state"], "training_state")
    s.count(state.get("epoch", 0), "training_state.epoch")
    s.count(state.get("step", 0), "training_state.step")
    if m.get("compile") is not None:
        config = s.dict(m["compile"], "compile")
        s.dict(config.get("loss"), "compile.loss")
        for i, metric in enumerate(s.list(config.get("metrics", []), "compile.metrics")):
            s.dict(metric, f"compile.metrics[{i}]")
            s.str(metric.get("class"), f"compile.metrics[{i}].class")
            s.dict(metric.get("config", {}), f"compile.metrics[{i}].config")
        optimizer = s.dict(config.get("optimizer"), "compile.optimizer")
        s.str(optimizer.get("class"), "compile.optimizer.class")
        s.dict(optimizer.get("defaults", {}), "compile.optimizer.defaults")
        for i, group in enumerate(s.list(optimizer.get("param_groups"), "compile.optimizer.param_groups")):
            group = s.dict(group, f"compile.optimizer.param_groups[{i}]")
            for j, name in enumerate(s.list(group.get("params"), f"compile.optimizer.param_groups[{i}].params")):
                s.str(name, f"compile.optimizer.param_groups[{i}].params[{j}]")
    for name, values in s.dict(m["optimizer_state"], "optimizer_state").items():
        for key, value in s.dict(values, f"optimizer_state.{name}").items():
            if isinstance(value, (dict, list)):
                s.fail(f"optimizer_state.{name}.{key}", "a number, string, boolean or null", value)


def _validate_resume_state(s: _Schema, state: Any) -> None:
    """The JSON half of a training-state artifact (the tensors are in ``training_state.safetensors``):
    where the fit stopped, the data order of that epoch, and each replica's Python/NumPy RNG."""
    state = s.dict(state, "resume_state")
    for key in ("epoch", "batch", "step"):
        s.count(state.get(key), f"resume_state.{key}")
    s.count(state.get("num_replicas"), "resume_state.num_replicas", positive=True)
    for i, name in enumerate(s.list(state.get("metric_names"), "resume_state.metric_names")):
        s.str(name, f"resume_state.metric_names[{i}]")
    for i, passes in enumerate(s.list(state.get("shuffle_passes"), "resume_state.shuffle_passes")):
        s.count(passes, f"resume_state.shuffle_passes[{i}]")
    _random_state(s, state.get("epoch_random"), "resume_state.epoch_random")
    replicas = s.list(state.get("replicas"), "resume_state.replicas")
    if len(replicas) != state["num_replicas"]:
        s.fail("resume_state.replicas", f"{state['num_replicas']} entries (num_replicas)", replicas)
    for i, replica in enumerate(replicas):
        field = f"resume_state.replicas[{i}]"
        replica = s.dict(replica, field)
        _random_state(s, replica.get("python"), f"{field}.python")
        numpy_state = s.dict(replica.get("numpy"), f"{field}.numpy")
        s.str(numpy_state.get("bit_generator"), f"{field}.numpy.bit_generator")
        for j, word in enumerate(s.list(numpy_state.get("key"), f"{field}.numpy.key")):
            if isinstance(word, bool) or not isinstance(word, int) or not 0 <= word < 2**32:
                s.fail(f"{field}.numpy.key[{j}]", "a 32-bit unsigned integer", word)
        s.count(numpy_state.get("pos"), f"{field}.numpy.pos")
        s.count(numpy_state.get("has_gauss"), f"{field}.numpy.has_gauss")
        if not isinstance(numpy_state.get("cached_gaussian"), (int, float)):
            s.fail(f"{field}.numpy.cached_gaussian", "a number", numpy_state.get("cached_gaussian"))


def _random_state(s: _Schema, state: Any, field: str) -> None:
    """Python's ``random.getstate()`` as JSON: version, 625 32-bit words, the cached gauss."""
    state = s.dict(state, field)
    s.count(state.get("version"), f"{field}.version")
    words = s.list(state.get("internal"), f"{field}.internal")
    if len(words) != 625 or not all(not isinstance(w, bool) and isinstance(w, int) and 0 <= w < 2**32
                                    for w in words):
        s.fail(f"{field}.internal", "625 32-bit unsigned integers", words)
    if state.get("gauss_next") is not None and not isinstance(state["gauss_next"], (int, float)):
        s.fail(f"{field}.gauss_next", "a number or null", state["gauss_next"])
