"""Hostile signature programs: crafted names, expressions and sizes, made the attacker's way
(a real artifact, tampered, every checksum recomputed).

For each position in the program JSON that holds a name, three things are shown:
- torch's own deserializer (what distsave used before) pastes the text into Python source it
  compiles and runs, where torch 2.13 does; for these positions a payload creates a canary file;
- ``saved_model.load`` refuses the program with an ``ArtifactError`` naming the JSON field, and
  nothing runs;
- with distsave's name checks switched off, that refusal is gone (so the check is what stands
  guard) and, for state paths, which distsave's own builder still writes into source, the
  canary is created.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import distsave
from distsave import ArtifactError
from distsave.layers import SavedModelLayer
from distsave.saving import program_schema
from distsave.saving.program import MAX_PROGRAM_NODES
from distsave.training.specs import TensorSpec
from tests.conftest import ROOT, rewrite_manifest, run_python

PROGRAM = "signatures/serving_default.json"
SPEC = TensorSpec((None, 1, 28, 28))


class Scaled(nn.Module):
    """A network with every kind of program state: parameters, buffers and a tensor constant."""

    def __init__(self, with_constant: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, 10))
        self.scale = torch.linspace(0.5, 1.5, 10) if with_constant else None

    def forward(self, x):
        return self.net(x) if self.scale is None else self.net(x) * self.scale


@pytest.fixture(scope="module")
def clean_artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clean") / "sm"
    distsave.saved_model.save(Scaled().eval(), path, input_spec=SPEC)
    return path


@pytest.fixture
def artifact(clean_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(clean_artifact, tmp_path / "sm"))


def shell_payload(canary: Path) -> str:
    """Python that creates ``canary``, written without dots (state paths are split on them)."""
    path = ",".join(str(b) for b in str(canary).encode())
    return f"getattr(__import__('os'),'system')('touch '+str(bytes([{path}]),'utf8'))"


def rename(value, old: str, new: str):
    """Every string (and key) equal to ``old`` replaced, as an attacker renames a value."""
    if isinstance(value, dict):
        return {(new if k == old else k): rename(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [rename(v, old, new) for v in value]
    return new if value == old else value


def state_path_injection(path: str, canary: Path) -> str:
    """A state path whose last part closes torch.fx's ``getattr(owner, "...")`` and runs code."""
    return f'{path}") if {shell_payload(canary)} else getattr(self, "x'


@dataclass(frozen=True)
class Position:
    """A name position: how to plant ``text`` there, the field the refusal must name, and
    whether torch 2.13's deserializer puts that text into source it compiles."""
    plant: Callable[[dict, dict, str], dict]
    field: str
    torch_compiles_it: bool
    payload: Callable[[Path], str] = lambda canary: f"x=__import__('os').system('touch {canary}')"


def _spec(program: dict, kind: str) -> dict:
    return next(s[kind] for s in program["graph_module"]["signature"]["input_specs"] if kind in s)


def _plant_state(kind: str, key: str, original: str, manifest_key: str):
    def plant(program: dict, manifest: dict, text: str) -> dict:
        spec = next(s[kind] for s in program["graph_module"]["signature"]["input_specs"]
                    if kind in s and s[kind][key] == original)
        spec[key] = text
        table = manifest["signatures"]["serving_default"][manifest_key]
        table[text] = table.pop(original)
        return program
    return plant


def _set(*keys):
    def plant(program: dict, manifest: dict, text: str) -> dict:
        target = program
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = [text] if keys[-1] == "forward_arg_names" else text
        return program
    return plant


POSITIONS = {
    "user input name": Position(lambda p, m, t: rename(p, "x", t),
                                r"graph_module\.graph\.inputs\[10\]\.as_tensor\.name", True),
    "parameter value name": Position(lambda p, m, t: rename(p, "p_net_1_weight", t),
                                     r"graph_module\.graph\.inputs\[0\]\.as_tensor\.name", True),
    "parameter path": Position(_plant_state("parameter", "parameter_name", "net.1.weight", "state"),
                               r"input_specs\[0\]\.parameter\.parameter_name", True,
                               lambda canary: state_path_injection("net.1.weight", canary)),
    "buffer path": Position(_plant_state("buffer", "buffer_name", "net.2.running_mean", "state"),
                            r"input_specs\[7\]\.buffer\.buffer_name", True,
                            lambda canary: state_path_injection("net.2.running_mean", canary)),
    "tensor constant path": Position(_plant_state("tensor_constant", "tensor_constant_name", "scale",
                                                  "constants"),
                                     r"input_specs\[6\]\.tensor_constant\.tensor_constant_name", True,
                                     lambda canary: state_path_injection("scale", canary)),
    "forward argument name": Position(_set("graph_module", "module_call_graph", 0, "signature",
                                           "forward_arg_names"),
                                      r"module_call_graph\[0\]\.signature\.forward_arg_names\[0\]", True),
    "node output value name": Position(lambda p, m, t: rename(p, "relu", t),
                                       r"graph_module\.graph\.nodes\[5\]\.outputs\[0\]\.as_tensor\.name",
                                       False),
    "graph output name": Position(lambda p, m, t: rename(p, "mul_15", t),
                                  r"graph_module\.graph\.outputs\[0\]\.as_tensor\.name", False),
    "symbolic value name": Position(lambda p, m, t: rename(p, "sym_size_int_1", t),
                                    r"graph_module\.graph\.nodes\[0\]\.outputs\[0\]\.as_sym_int\.as_name",
                                    False),
    "node name": Position(_set("graph_module", "graph", "nodes", 5, "name"),
                          r"graph_module\.graph\.nodes\[5\]\.name", False),
    "argument name": Position(_set("graph_module", "graph", "nodes", 5, "inputs", 0, "name"),
                              r"graph_module\.graph\.nodes\[5\]\.inputs\[0\]\.name", False),
    "module path in the call graph": Position(_set("graph_module", "module_call_graph", 1, "fqn"),
                                              r"graph_module\.module_call_graph\[1\]\.fqn", False),
}


def tamper(artifact: Path, edit: Callable[[dict, dict], dict]) -> None:
    """Edit the program (and the manifest's tables) and recompute every checksum."""
    program = json.loads((artifact / PROGRAM).read_text())
    manifest = json.loads((artifact / "manifest.json").read_text())
    program = edit(program, manifest)
    (artifact / PROGRAM).write_text(json.dumps(program))
    rewrite_manifest(artifact, lambda m: m["signatures"].update(manifest["signatures"]))


def plant(artifact: Path, position: Position, canary: Path) -> str:
    text = position.payload(canary)
    tamper(artifact, lambda program, manifest: position.plant(program, manifest, text))
    return text


def torch_deserializer_runs(artifact: Path) -> list[str]:
    """Build the program as distsave did before (torch's deserializer, then one call); return
    the Python sources torch.fx compiled on the way."""
    from torch._export.serde import serialize as serde
    from torch.fx import graph_module

    program = json.loads((artifact / PROGRAM).read_text())
    entry = json.loads((artifact / "manifest.json").read_text())["signatures"]["serving_default"]
    weights = load_file(artifact / "model.safetensors")
    stored = load_file(artifact / "constants.safetensors")
    parameters = {s["parameter"]["parameter_name"]
                  for s in program["graph_module"]["signature"]["input_specs"] if "parameter" in s}
    state = {target: nn.Parameter(weights[var], requires_grad=False) if target in parameters
             else weights[var] for target, var in entry["state"].items()}
    constants = {name: stored[key] for name, key in entry["constants"].items()}
    sources, compile_source = [], graph_module._exec_with_source

    def spy(source, *args, **kwargs):
        sources.append(source)
        return compile_source(source, *args, **kwargs)

    graph_module._exec_with_source = spy
    try:
        artifact_bytes = serde.SerializedArtifact(json.dumps(program).encode(), state, constants, b"")
        serde.deserialize(artifact_bytes).module()(torch.rand(2, 1, 28, 28))
    except Exception:  # a payload may break the source after it ran; what ran is what counts
        pass
    finally:
        graph_module._exec_with_source = compile_source
    return sources


def name_checks_off(monkeypatch) -> None:
    monkeypatch.setattr(distsave.saving.format, "is_identifier_path", lambda value, dotted=True: True)
    monkeypatch.setattr(distsave.saving.tensor_io, "MAX_NAME_LENGTH", 2**20)  # tensor names in headers
    monkeypatch.setattr(program_schema, "name_problem", lambda value: None)
    monkeypatch.setattr(program_schema, "path_problem", lambda value, root_allowed=False: None)
    monkeypatch.setattr(program_schema, "_argument_name_problem", lambda value: None)
    monkeypatch.setattr(program_schema, "module_path_problem", lambda value: None)


def load_and_call(artifact: Path) -> None:
    signature = distsave.saved_model.load(artifact).signatures["serving_default"]
    signature(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("name", [n for n, p in POSITIONS.items() if p.torch_compiles_it])
def test_text_at_this_position_reaches_source_that_torchs_deserializer_compiles(artifact, tmp_path, name):
    canary = tmp_path / "pwned"
    text = plant(artifact, POSITIONS[name], canary)
    sources = torch_deserializer_runs(artifact)
    pasted = text.rsplit(".", 1)[-1] if name.endswith(" path") else text  # paths: per part
    assert any(pasted in source for source in sources)
    if name in ("user input name", "parameter path", "buffer path", "tensor constant path"):
        assert canary.exists()  # and these payloads run


@pytest.mark.parametrize("name", POSITIONS)
def test_load_refuses_a_crafted_name_and_names_its_field(artifact, tmp_path, name):
    canary = tmp_path / "pwned"
    plant(artifact, POSITIONS[name], canary)
    manifest_field = r"field 'signatures\.serving_default\.(state|constants)'"  # paths are checked twice
    with pytest.raises(ArtifactError, match=f"{manifest_field}|{POSITIONS[name].field}") as error:
        load_and_call(artifact)
    assert PROGRAM in str(error.value) or re.search(manifest_field, str(error.value))
    assert not canary.exists()


@pytest.mark.parametrize("name", POSITIONS)
def test_without_the_name_checks_the_crafted_name_is_not_refused(artifact, tmp_path, monkeypatch, name):
    canary = tmp_path / "pwned"
    plant(artifact, POSITIONS[name], canary)
    name_checks_off(monkeypatch)
    try:
        load_and_call(artifact)
    except ArtifactError as error:
        assert not re.search(POSITIONS[name].field, str(error))
    except Exception:  # what an unchecked program does is not ours to predict
        pass
    if name.endswith(" path") and name != "module path in the call graph":
        assert canary.exists()  # our builder writes state paths into source: the check is the guard


@pytest.mark.parametrize("text", ["x\n", "x\n__import__('os')", "if", "x" * 257, "net.1.weight"])
def test_only_whole_identifiers_pass_as_names(artifact, text):
    tamper(artifact, lambda program, manifest: rename(program, "x", text))
    with pytest.raises(ArtifactError, match=r"graph_module\.graph\.inputs\[10\]\.as_tensor\.name"):
        load_and_call(artifact)


def test_code_in_a_symbolic_expression_runs_in_torchs_deserializer_and_is_refused(artifact, tmp_path):
    canary = tmp_path / "pwned"
    expression = f"__import__('os').system('touch {canary}')"

    def plant_expression(program, manifest):
        program["graph_module"]["graph"]["sym_int_values"]["sym_size_int_1"]["as_expr"]["expr_str"] = expression
        return program

    tamper(artifact, plant_expression)
    torch_deserializer_runs(artifact)
    assert canary.exists()
    canary.unlink()
    with pytest.raises(ArtifactError, match=r"sym_int_values\.sym_size_int_1\.as_expr\.expr_str: "
                                            r"symbolic expression .* is not plain shape arithmetic"):
        load_and_call(artifact)
    assert not canary.exists()


@pytest.mark.parametrize("entry, field", [
    ({"as_operator": "torch.ops.aten.relu.default"}, r"nodes\[5\]\.inputs\[0\]\.arg: unsupported entry as_operator"),
    ({"as_custom_obj": {"name": "obj", "class_fqn": "os.system"}}, r"unsupported entry as_custom_obj"),
    ({"as_graph": {"name": "g", "graph": {}}}, r"unsupported entry as_graph"),
])
def test_arguments_that_carry_code_or_objects_are_refused(artifact, entry, field):
    def plant_argument(program, manifest):
        program["graph_module"]["graph"]["nodes"][5]["inputs"][0]["arg"] = entry
        return program

    tamper(artifact, plant_argument)
    with pytest.raises(ArtifactError, match=field):
        load_and_call(artifact)


def test_unknown_keys_are_refused_wherever_they_are(artifact):
    def plant_keys(program, manifest):
        program["graph_module"]["graph"]["nodes"][2]["code"] = "print(1)"
        program["graph_module"]["signature"]["input_specs"][0]["parameter"]["extra"] = 1
        return program

    tamper(artifact, plant_keys)
    with pytest.raises(ArtifactError) as error:
        load_and_call(artifact)
    assert "graph_module.graph.nodes[2]: unknown keys ['code']" in str(error.value)
    assert "input_specs[0].parameter: unknown keys ['extra']" in str(error.value)


def test_a_program_of_the_wrong_types_is_refused_not_crashed(artifact):
    def plant_types(program, manifest):
        program["graph_module"]["graph"]["nodes"][1]["inputs"] = {"self": 1}
        program["graph_module"]["graph"]["nodes"][2]["outputs"][0] = {"as_tensor": {"name": 7}}
        program["graph_module"]["graph"]["nodes"][3]["inputs"][1]["arg"] = {"as_int": True}
        return program

    tamper(artifact, plant_types)
    with pytest.raises(ArtifactError) as error:
        load_and_call(artifact)
    message = str(error.value)
    assert "nodes[1].inputs: expected a list, received dict" in message
    assert "nodes[2].outputs[0].as_tensor.name: expected a name (string), received int" in message
    assert "nodes[3].inputs[1].arg.as_int: expected a 64-bit integer, received True" in message


def test_a_name_used_before_it_is_defined_is_refused_with_its_field(artifact):
    def swap(program, manifest):
        nodes = program["graph_module"]["graph"]["nodes"]
        nodes[0], nodes[1] = nodes[1], nodes[0]  # the view now comes before the size it uses
        return program

    tamper(artifact, swap)
    with pytest.raises(ArtifactError, match=r"nodes\[0\]\.inputs\[1\]\.arg\.as_sym_ints: refers to "
                                            r"value 'sym_size_int_1' before it is defined"):
        load_and_call(artifact)


# --- SavedModelLayer: a program inside an architecture entry, loaded by load_model ---------------

@pytest.fixture
def model_with_layer(tmp_path) -> Path:
    """A model whose first layer is a SavedModelLayer (of a program without constants, which a
    layer cannot carry into an architecture)."""
    torch.manual_seed(0)
    distsave.saved_model.save(Scaled(with_constant=False).eval(), tmp_path / "sm", input_spec=SPEC)
    layer = SavedModelLayer(distsave.saved_model.load(tmp_path / "sm"))
    model = distsave.Sequential([layer], input_spec=SPEC)
    model.compile(loss="mse", optimizer="sgd")
    model.save(tmp_path / "model")
    return tmp_path / "model"


def tamper_layer(path: Path, edit: Callable[[dict], None], rename_weight: tuple[str, str] | None = None) -> None:
    if rename_weight:
        weights = load_file(path / "model.safetensors")
        weights[rename_weight[1]] = weights.pop(rename_weight[0])
        save_file(weights, path / "model.safetensors")
    rewrite_manifest(path, lambda manifest: edit(manifest["architecture"]["layers"][0]))


def plant_layer_path(entry: dict, text: str) -> None:
    spec = entry["program"]["graph_module"]["signature"]["input_specs"][0]["parameter"]
    entry["state"][text] = entry["state"].pop(spec["parameter_name"])
    spec["parameter_name"] = text


def test_load_model_refuses_a_crafted_state_path_in_a_saved_model_layer(model_with_layer, tmp_path):
    canary = tmp_path / "pwned"
    text = state_path_injection("net.1.weight", canary)
    tamper_layer(model_with_layer, lambda entry: plant_layer_path(entry, text),
                 ("0.program.net.1.weight", f"0.program.{text}"))
    with pytest.raises(ArtifactError, match=r"SavedModelLayer 'serving_default': graph_module\.signature"
                                            r"\.input_specs\[0\]\.parameter\.parameter_name"):
        distsave.load_model(model_with_layer).predict(torch.rand(2, 1, 28, 28))
    assert not canary.exists()


def test_without_the_path_check_the_layer_path_runs_code_in_load_model(model_with_layer, tmp_path, monkeypatch):
    canary = tmp_path / "pwned"
    text = state_path_injection("net.1.weight", canary)
    tamper_layer(model_with_layer, lambda entry: plant_layer_path(entry, text),
                 ("0.program.net.1.weight", f"0.program.{text}"))
    name_checks_off(monkeypatch)
    model = distsave.load_model(model_with_layer, compile=False)  # the optimizer names the old path
    with pytest.raises(AttributeError):  # the payload runs, then the fetch it hides in fails
        model.predict(torch.rand(2, 1, 28, 28))
    assert canary.exists()


def test_load_model_refuses_a_crafted_input_name_in_a_saved_model_layer(model_with_layer, tmp_path):
    canary = tmp_path / "pwned"
    text = f"x=__import__('os').system('touch {canary}')"
    tamper_layer(model_with_layer, lambda entry: entry.update(program=rename(entry["program"], "x", text)))
    with pytest.raises(ArtifactError, match=r"graph_module\.graph\.inputs\[9\]\.as_tensor\.name"):
        distsave.load_model(model_with_layer)
    assert not canary.exists()


# --- size: a program at the caps loads in seconds; one over them is refused at once --------------

def test_a_program_at_the_node_cap_loads_and_one_over_it_is_refused():
    script = str(ROOT / "benchmarks" / "program_load.py")
    at_cap = run_python([script, "chain", "fanout", "long_lists"], timeout=300).stdout.splitlines()
    assert [json.loads(line).get("check_and_build_s") is not None for line in at_cap] == [True] * 3
    over = run_python([script, "chain", "--nodes", str(MAX_PROGRAM_NODES)], timeout=120).stdout
    assert re.search(rf"more than (the limit of )?{MAX_PROGRAM_NODES}", json.loads(over)["refused"])


def test_more_calls_than_the_cap_are_refused_before_anything_is_built(artifact):
    def grow(program, manifest):
        nodes = program["graph_module"]["graph"]["nodes"]
        nodes.extend(copy.deepcopy(nodes[5]) for _ in range(MAX_PROGRAM_NODES))
        return program

    tamper(artifact, grow)
    with pytest.raises(ArtifactError, match=rf"graph_module\.graph\.nodes: {MAX_PROGRAM_NODES + 9} "
                                            rf"entries, more than the limit of {MAX_PROGRAM_NODES}"):
        load_and_call(artifact)

