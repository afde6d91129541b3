"""The command-line tools loraline starts (dvc, prefect, gto, loraline) come from the environment
loraline is installed in, never from whatever PATH happens to hold.

`make setup` installs them into `.venv`, which is usually not activated (`.venv/bin/loraline run`):
a bare `dvc` would then be missing, or worse, a different install elsewhere on the machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TOOLS = ("dvc", "prefect", "gto", "loraline")


def bin_dir() -> Path:
    """The scripts folder of the running interpreter's environment (`.venv/bin`)."""
    # sys.executable, not its resolved target: a venv's python is a link into the base install
    return Path(sys.executable).parent


def tool(name: str) -> str:
    """Absolute path of `name` in this environment; a clear error when it is not installed there."""
    path = bin_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{name!r} is not installed in loraline's environment ({bin_dir()}); "
            f"install the project there (`make setup`, or `pip install -e .`) rather than relying on PATH"
        )
    return str(path)


def tool_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with this environment's scripts first on PATH.

    Subprocesses need it for the commands they start by name themselves: dvc.yaml's `cmd:` lines
    call `loraline`, which DVC runs through a shell.
    """
    env = dict(os.environ if base is None else base)
    folders = env.get("PATH", "").split(os.pathsep)
    here = str(bin_dir())
    env["PATH"] = os.pathsep.join([here, *(f for f in folders if f and f != here)])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def use_tool_env() -> None:
    """Put this environment's scripts first on PATH for this process (in-process `dvc repro`)."""
    os.environ.update(tool_env())
