"""Our tools come from the environment loraline is installed in, whatever PATH holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraline import tools
from loraline.tools import TOOLS, bin_dir, tool, tool_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_is_installed_next_to_this_interpreter(name):
    path = Path(tool(name))
    assert path.parent == Path(sys.executable).parent and os.access(path, os.X_OK)


def test_a_tool_missing_from_the_environment_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tools, "bin_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'dvc' is not installed in loraline's environment .*make setup"):
        tool("dvc")


def test_tool_env_puts_this_environment_first_once():
    here = str(bin_dir())
    env = tool_env({"PATH": os.pathsep.join(["/elsewhere/bin", here, "/usr/bin"])})
    assert env["PATH"].split(os.pathsep) == [here, "/elsewhere/bin", "/usr/bin"]
    assert env["DVC_NO_ANALYTICS"] == "1"
    assert tool_env({})["PATH"] == here


def test_a_shell_command_finds_our_dvc_with_an_empty_path():
    """What dvc.yaml's `cmd:` lines rely on: a bare name resolves to this environment's script."""
    env = tool_env({"PATH": "/usr/bin:/bin"})
    out = subprocess.run(
        ["sh", "-c", "command -v dvc; command -v loraline"], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [tool("dvc"), tool("loraline")]


def test_no_test_or_library_code_starts_our_tools_by_bare_name():
    """A command list opening with a bare tool name finds whatever PATH holds (or nothing)."""
    offenders = []
    for folder in ("src", "tests", "flows"):
        for path in REPO.joinpath(folder).rglob("*.py"):
            text = path.read_text().replace(" ", "")
            offenders += [
                f"{path.relative_to(REPO)}: {name}"
                for name in TOOLS
                for quote in "\"'"
                if f"([{quote}{name}{quote}" in text
            ]
    assert offenders == []
