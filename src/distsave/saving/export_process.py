"""A serving program exported in a helper process, so that a background save does not pause
training for it.

``torch.export`` patches process-wide state while it traces (``nn.Module.__call__`` among
it), so it cannot run in a thread beside a training step; in the caller's thread a process's
first export costs 1-2 s (torch's imports on first use, tracing, decomposition to core ATen).
A model whose architecture a fresh process can rebuild — built-in layers, and registered
classes defined in importable modules — is exported there instead: the helper rebuilds it on
the ``meta`` device from the recorded architecture (the very rebuild the caller exports
otherwise) and sends the program back as JSON, which is checked like any program read from a
file. Like DCP's process-based async checkpointer, the helper only ever sees JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from .architecture import has_special_builder
from .errors import SaveError
from .format import check_signature_name, signature_file
from .program import check_program
from .registry import registered
from .signatures import ExportedSignatures

__all__ = ["HelperExport", "helper_modules", "main", "programs_from_reply"]

_BUILT_IN = ("distsave.Sequential", "distsave.Model")
_HELPER = f"from {__name__} import main; main()"


def helper_modules(architecture: dict[str, Any]) -> list[str] | None:
    """The modules a helper process must import to rebuild ``architecture`` (those defining its
    registered classes), or None when a fresh process cannot rebuild it: a class defined in
    ``__main__`` or in another module it cannot import, or a layer rebuilt from an artifact
    (SavedModelLayer)."""
    modules, stack = set(), [architecture]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
            name = item.get("class")
            if not isinstance(name, str) or name in _BUILT_IN or name.startswith("torch.nn."):
                continue
            if has_special_builder(name):
                return None
            cls = registered(name)
            where = getattr(sys.modules.get(getattr(cls, "__module__", "")), "__spec__", None)
            if where is None or cls.__module__ == "__main__":
                return None
            modules.add(cls.__module__)
    return sorted(modules)


def programs_from_reply(reply: Any, source: str, fix: str = "export again") -> ExportedSignatures:
    """The programs a reply holds (``{"programs": {name: [program, entry]}}``, as a helper sends
    them and the program cache keeps them), each checked as a program read from a file would be.

    Raises:
        SaveError: the reply is malformed, names a program file other than its signature's, or
            holds a program that `check_program` refuses (the message names ``source``).
    """
    try:
        sent = {name: (program, entry) for name, (program, entry) in reply["programs"].items()}
    except (TypeError, ValueError, KeyError, AttributeError):
        raise SaveError(f"Refusing the programs from {source}: the reply is malformed; {fix}.") from None
    for name, (program, entry) in sent.items():
        if not isinstance(entry, dict) or entry.get("program") != signature_file(check_signature_name(name)):
            raise SaveError(f"Refusing the programs from {source}: it named its file "
                            f"{entry.get('program') if isinstance(entry, dict) else entry!r:.80}, "
                            f"not {signature_file(name)!r}; {fix}.")
        problems = check_program(program, f"signature {name!r} from {source}")
        if problems:
            raise SaveError("The exported program could not be loaded safely again: " + "; ".join(problems))
    return ExportedSignatures({name: (program, entry, {}) for name, (program, entry) in sent.items()})


class HelperExport:
    """The serving program being exported by a helper process; `write` waits for it, and
    ``arrived`` is told of it once (to reuse it in later saves)."""

    def __init__(self, architecture: dict[str, Any], input_spec: list[dict[str, Any]], modules: list[str],
                 where: str, arrived: Callable[[ExportedSignatures], None] = lambda exported: None):
        self.where, self._arrived = where, arrived
        request = json.dumps({"architecture": architecture, "input_spec": input_spec, "modules": modules})
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        self._process = subprocess.Popen([sys.executable, "-c", _HELPER],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env)
        self._request = request.encode()
        self._exported: ExportedSignatures | None = None

    def result(self) -> ExportedSignatures:
        """The exported signatures, checked as a program read from a file would be.

        Raises:
            SaveError: the helper could not export the model (its message), or died.
        """
        if self._exported is None:
            out, err = self._process.communicate(self._request)
            try:
                reply = json.loads(out)
            except ValueError:
                tail = err.decode(errors="replace").strip().splitlines()[-5:]
                raise SaveError(f"The helper process exporting {self.where}'s serving program exited with "
                                f"code {self._process.returncode} and no program: {' | '.join(tail)}. "
                                "Save again with blocking=True to export in this process.") from None
            if isinstance(reply, dict) and "error" in reply:
                raise SaveError(str(reply["error"]))
            self._exported = programs_from_reply(reply, f"the helper process exporting {self.where}'s serving program",
                                                 "save again with blocking=True")
            self._arrived(self._exported)
        return self._exported

    def write(self, writer: Any) -> dict[str, Any]:
        return self.result().write(writer)


def main() -> None:
    """The helper: read a request (JSON) on stdin, answer with the programs (JSON) on stdout.

    Anything else printed while importing or exporting goes to stderr; the helper runs at a
    lower priority than the training it stands in for."""
    os.nice(10)
    reply_to = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request = json.load(sys.stdin)
    try:
        for module in request["modules"]:
            importlib.import_module(module)
        from ..training.specs import TensorSpec
        from .model_format import rebuild_on_meta
        from .signatures import export_signatures

        specs = [TensorSpec.from_json(s) for s in request["input_spec"]]
        exported = export_signatures(rebuild_on_meta(request["architecture"], specs), None, specs)
        if exported.constants:
            raise SaveError("the program holds tensor constants, which a helper process cannot send")
        reply: dict[str, Any] = {"programs": {name: [program, entry]
                                              for name, (program, entry, _) in exported.programs.items()}}
    except SaveError as error:
        reply = {"error": str(error)}
    json.dump(reply, reply_to)
    reply_to.close()

