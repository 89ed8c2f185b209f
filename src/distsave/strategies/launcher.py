"""Start the other replica processes of a plain ``python script.py`` run, as torchrun would.

The children run the same command with torchrun's environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the strategy they build joins the same group. A
program that cannot be run again this way (a Jupyter kernel, pytest, ``python -c``) forks its
replicas per call instead: see `forked`.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys

from .. import _libc

__all__ = ["launch_replicas", "launched_by_torchrun_or_distsave", "program_can_restart"]

logger = logging.getLogger(__name__)
_children: list[subprocess.Popen] = []


def launched_by_torchrun_or_distsave() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# Programs that host the user's code rather than being it: running them again would start
# another test session or kernel, not the user's training.
_HOSTS = frozenset({"pytest", "_pytest", "py.test", "ipykernel", "ipykernel_launcher", "IPython",
                    "ipython", "ipython3", "jupyter", "jupyter-lab", "jupyter-notebook", "spyder",
                    "pydevd", "xdist"})


def program_can_restart() -> bool:
    """Whether running ``sys.argv`` again starts the user's program (a script or ``-m`` module)."""
    main = sys.modules.get("__main__")
    if main is None or hasattr(sys, "ps1") or "IPython" in sys.modules and _in_ipython():
        return False
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.split(".")[0] not in _HOSTS
    path = getattr(main, "__file__", None)
    if not path or not os.path.exists(path) or not sys.argv or sys.argv[0] in ("", "-c", "-"):
        return False
    return os.path.basename(path).removesuffix(".py") not in _HOSTS


def _in_ipython() -> bool:
    from IPython import get_ipython  # only asked when IPython is already imported

    return get_ipython() is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relaunch_command() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name.removesuffix(".__main__")
        return [sys.executable, "-m", module, *sys.argv[1:]]
    return [sys.executable, *sys.argv]


_prctl = _libc.function("prctl", [ctypes.c_int, ctypes.c_ulong])
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))  # no orphaned replica blocks in a collective


def launch_replicas(world_size: int) -> None:
    """Start replicas 1..world_size-1 and make this process replica 0."""
    command = _relaunch_command()
    shared = {"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for rank in range(1, world_size):
        env = {**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        preexec = _die_with_parent if _prctl is not None else None
        _children.append(subprocess.Popen(command, env=env, preexec_fn=preexec))
    os.environ.update({**shared, "RANK": "0", "LOCAL_RANK": "0"})
    logger.info("Started %d more replica process(es): %s", world_size - 1, command)
    atexit.register(_wait_for_children)
    previous_hook = sys.excepthook

    def kill_children_on_error(*exc_info) -> None:
        for child in _children:
            child.kill()
        previous_hook(*exc_info)

    sys.excepthook = kill_children_on_error


def _wait_for_children() -> None:
    failed = [(c.args, c.wait()) for c in _children]
    failed = [(args, code) for args, code in failed if code != 0]
    if failed:
        for args, code in failed:
            print(f"distsave: replica process {args} exited with code {code}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
