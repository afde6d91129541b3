"""A commit that holds exactly the working tree a version was built from, without touching the user's git state.

A registered version must point at the dvc.lock, params.yaml and raw data it came from, but a
release runs right after `dvc repro`, before anyone commits. Committing on the user's branch or
staging their files would be a surprise, so the commit is built through a throw-away index and
left dangling; the version tag that points at it is what keeps it reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from loraline.registry.base import RegistryError


def git(root: str | Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`git <args>` in `root`; its stdout, or RegistryError with git's own message."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RegistryError(f"git {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout.strip()


FALLBACK_IDENTITY = {"name": "loraline", "email": "loraline@localhost"}


def ensure_git_identity(root: str | Path) -> None:
    """Snapshot commits and version tags need an author; a fresh machine often has none configured.

    Only when git has no user.name/user.email (and the environment sets none) does this process
    sign as "loraline <loraline@localhost>"; a configured identity is always used as it is.
    """
    for key in ("name", "email"):
        configured = subprocess.run(["git", "config", f"user.{key}"], cwd=root, capture_output=True, text=True).stdout.strip()
        if configured:
            continue
        for role in ("AUTHOR", "COMMITTER"):
            os.environ.setdefault(f"GIT_{role}_{key.upper()}", FALLBACK_IDENTITY[key])


def head_commit(root: str | Path) -> str | None:
    """HEAD's sha, or None in a repository without commits."""
    done = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD^{commit}"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() or None


def snapshot_commit(root: str | Path, message: str) -> str:
    """HEAD when the working tree (tracked and untracked-not-ignored files) equals it, else a new dangling commit on top."""
    root = Path(root)
    head = head_commit(root)
    git_dir = Path(git(root, "rev-parse", "--absolute-git-dir"))
    with tempfile.TemporaryDirectory(prefix="loraline-snapshot-", dir=git_dir) as tmp:
        index = Path(tmp) / "index"
        # Starting from the user's index reuses its stat cache (only changed files are hashed);
        # `add -A` then makes it match the working tree whatever the user had staged.
        if (git_dir / "index").exists():
            shutil.copyfile(git_dir / "index", index)
        env = {**os.environ, "GIT_INDEX_FILE": str(index)}
        git(root, "add", "-A", env=env)
        tree = git(root, "write-tree", env=env)
        if head is not None and tree == git(root, "rev-parse", f"{head}^{{tree}}"):
            return head
        parents = ["-p", head] if head else []
        return git(root, "commit-tree", tree, *parents, "-m", message, env=env)
