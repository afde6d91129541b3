"""DVC outputs do not double the disk: the project's cache links a workspace output to its cache
file (a reflink where the filesystem has them, else a hard link) instead of copying it. At 8B a
merged model is 16 GB or more; copied, the workspace and the cache would hold it twice."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import yaml

from loraline.tools import tool, tool_env

ROOT = Path(__file__).resolve().parents[2]
# The stage writes its output by rename, as every loraline stage does (loraline.io): a linked
# workspace file is replaced, never written through, so the cache file behind it stays intact.
WRITE = (
    "python -c \"import os, pathlib; p = pathlib.Path('model'); p.mkdir(exist_ok=True); "
    "(p / 'w.tmp').write_bytes(os.urandom(1 << 20)); os.replace(p / 'w.tmp', p / 'weights.bin')\""
)


def project_cache_types() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    return [t.strip() for t in config.get("cache", "type", fallback="").strip('"').split(",") if t.strip()]


def test_the_project_links_outputs_before_it_copies_them():
    types = project_cache_types()
    assert "hardlink" in types and types[-1] == "copy", types  # copy only as the last resort (another filesystem)
    assert "symlink" not in types  # a symlinked output is a path outside the workspace to every tool reading it


def test_an_output_and_its_cache_file_share_their_bytes(tmp_path: Path):
    run = dict(cwd=tmp_path, env=tool_env(), check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run([tool("dvc"), "init", "-q"], **run)
    subprocess.run([tool("dvc"), "config", "cache.type", ",".join(project_cache_types())], **run)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"cmd": WRITE, "outs": ["model"]}}}))
    subprocess.run([tool("dvc"), "repro", "-q"], **run)

    out = tmp_path / "model" / "weights.bin"
    cache_files = [p for p in (tmp_path / ".dvc" / "cache").rglob("*") if p.is_file() and p.stat().st_size == 1 << 20]
    assert len(cache_files) == 1
    same_inode = os.stat(out).st_ino == os.stat(cache_files[0]).st_ino
    # a hard link: one inode, two names; a reflink (btrfs, xfs) is its own inode sharing the blocks
    assert same_inode or out.stat().st_nlink == 1 and os.stat(out).st_dev == os.stat(cache_files[0]).st_dev
    if same_inode:
        assert out.stat().st_nlink == 2
        assert not os.access(out, os.W_OK) or os.geteuid() == 0  # DVC protects a linked output (read-only)
        assert not out.stat().st_mode & 0o222  # read-only for everyone: an editor cannot write through to the cache
