"""A commit that holds the files a version's lineage needs, without touching the user's git state.

A registered version must point at the dvc.lock, params.yaml, code and raw data it came from, but a
release runs right after `dvc repro`, before anyone commits. Committing on the user's branch or
staging their files would be a surprise, so the commit is built through a throw-away index and
left dangling; the version tag that points at it is what keeps it reachable. The tag is shared
(`git push --tags`, orchestrate.registry_remote), so what goes in is decided file by file:

- every file HEAD tracks, as it is in the working tree now (`git add -u`: modified files with their
  new content, deleted files gone). Files the user staged but HEAD does not track are not taken.
- untracked files only inside the lineage paths: dvc.yaml, dvc.lock, pipelines/tenant.yaml, the
  version's tenant's pipelines/<tenant>/dvc.yaml and dvc.lock (every tenant's without a tenant),
  params.yaml (and any other params file those locks name), .dvc/config, .dvcignore, every
  dependency path those locks record
  (the raw data folders, the code the stages run) with its `.dvc` pointer file, and the paths the
  caller adds (a release adds every tenant's raw_dir from params.yaml). Any other untracked file
  (a `.env`, notes, scratch files) never goes in; neither does anything git ignores (DVC outputs,
  .dvc/config.local with the remote's credentials).
- a file whose name looks like a secret (SECRET_PATTERNS: .env, *.pem, id_rsa, config.local, ...)
  is never taken from the working tree: tracked, it keeps HEAD's content; untracked, it stays out.
  Inside a lineage path that is an error instead, since the pipeline hashed that path with the
  file in it: leaving it out would pin other data than dvc.lock's, and putting it in would publish it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import yaml

from loraline.dvcfiles import lock_paths
from loraline.layout import PIPELINES_DIR, TENANT_TEMPLATE, tenant_dvc_file
from loraline.registry.base import RegistryError

# File names (matched case-insensitively, on the name alone) that hold credentials often enough
# that a snapshot never takes them from the working tree.
SECRET_PATTERNS = (
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".netrc",
    "_netrc",
    ".pypirc",
    ".npmrc",
    ".git-credentials",
    "config.local",
    "credentials",
    "credentials.*",
    "secrets.*",
    "*.secret",
    "*.secrets",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
)
LINEAGE_FILES = ("dvc.yaml", "dvc.lock", TENANT_TEMPLATE, "params.yaml", ".dvc/config", ".dvcignore")


def snapshot_commit(root: str | Path, message: str, extra: Iterable[str] = (), tenant: str | None = None) -> str:
    """HEAD when the snapshot (see the module docstring) equals HEAD's tree, else a new dangling commit on top.
    `tenant`: the version's tenant, whose dvc.yaml and dvc.lock (and what they record) it takes; None: every
    tenant's."""
    root = Path(root)
    head = head_commit(root)
    lineage = lineage_paths(root, extra, tenant)
    with _scratch_index(root, head) as env:
        _add(root, env, _tracked_changes(root, env, lineage), "-u")
        _add(root, env, _untracked_lineage_files(root, env, lineage))
        tree = git(root, "write-tree", env=env)
        if head is not None and tree == git(root, "rev-parse", f"{head}^{{tree}}"):
            return head
        parents = ["-p", head] if head else []
        return git(root, "commit-tree", tree, *parents, "-m", message, env=env)


def lineage_paths(root: str | Path, extra: Iterable[str] = (), tenant: str | None = None) -> list[str]:
    """The paths (relative, posix) whose untracked files a snapshot takes: see the module docstring."""
    locks = lock_paths(root, None if tenant is None else [tenant])
    lock = {name: entry for path in locks for name, entry in (_read_yaml(path).get("stages") or {}).items()}
    own = [PIPELINES_DIR] if tenant is None else [tenant_dvc_file(tenant), tenant_dvc_file(tenant, "dvc.lock")]
    paths = set(LINEAGE_FILES) | set(own) | {str(p) for p in extra}
    for stage in lock.values():
        paths |= set(stage.get("params") or {})
        for dep in stage.get("deps") or []:
            paths |= {dep["path"], f"{dep['path']}.dvc"}
    return sorted(p for p in paths if _inside(p))


def looks_secret(path: str) -> bool:
    name = PurePosixPath(path).name.lower()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_PATTERNS)


def _inside(path: str) -> bool:
    """A path in the repository (not a URL, not absolute, not above the root)."""
    p = PurePosixPath(path)
    return "://" not in path and not p.is_absolute() and ".." not in p.parts and path not in ("", ".")


def _under(path: str, lineage: list[str]) -> bool:
    return any(path == p or path.startswith(f"{p.rstrip('/')}/") for p in lineage)


def _read_yaml(path: Path) -> dict:
    """The mapping in `path`; {} when it is absent or holds no mapping (nothing recorded to take)."""
    try:
        value = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as exc:
        raise RegistryError(
            f"{path} is not valid YAML ({exc}); fix or regenerate it (dvc repro) and release again"
        ) from None
    return value if isinstance(value, dict) else {}


@contextlib.contextmanager
def _scratch_index(root: Path, head: str | None) -> Iterator[dict[str, str]]:
    """An index under .git/ holding HEAD's tree (empty without commits); the environment that selects it."""
    git_dir = Path(git(root, "rev-parse", "--absolute-git-dir"))
    with tempfile.TemporaryDirectory(prefix="loraline-snapshot-", dir=git_dir) as tmp:
        index = Path(tmp) / "index"
        # Starting from a copy of the user's index reuses its stat cache (only changed files are
        # hashed); --reset then makes it HEAD's tree, whatever the user had staged or left unmerged.
        if (git_dir / "index").exists():
            shutil.copyfile(git_dir / "index", index)
        env = {**os.environ, "GIT_INDEX_FILE": str(index)}
        git(root, "read-tree", *(["--reset", head] if head else ["--empty"]), env=env)
        yield env


def _tracked_changes(root: Path, env: dict[str, str], lineage: list[str]) -> list[str]:
    """HEAD's files that the working tree changed or deleted, but none that looks secret."""
    changed = _nul_list(git(root, "diff", "--no-renames", "--name-only", "-z", env=env, strip=False))
    _refuse_secrets_in_lineage(changed, lineage, "changed in the working tree")
    return [p for p in changed if not looks_secret(p)]


def _untracked_lineage_files(root: Path, env: dict[str, str], lineage: list[str]) -> list[str]:
    listed = git(
        root,
        "--literal-pathspecs",
        "ls-files",
        "-z",
        "--others",
        "--exclude-standard",
        "--",
        *lineage,
        env=env,
        strip=False,
    )
    untracked = _nul_list(listed)
    _refuse_secrets_in_lineage(untracked, lineage, "untracked")
    return untracked


def _refuse_secrets_in_lineage(paths: list[str], lineage: list[str], state: str) -> None:
    found = [p for p in paths if looks_secret(p) and _under(p, lineage)]
    if found:
        raise RegistryError(
            f"{', '.join(found)} looks like a secret and is {state} inside a path the pipeline reads "
            f"(a dvc.lock dependency or lineage file), so the version's snapshot can neither leave it out "
            f"(dvc.lock hashed it) nor publish it in a git tag: move it out of the project's data and code "
            f"folders, re-run the pipeline (dvc repro), and release again"
        )


def _add(root: Path, env: dict[str, str], paths: list[str], *flags: str) -> None:
    """`git add` exactly `paths` (never an empty list: `git add -u` without paths means the whole tree)."""
    if paths:
        git(
            root,
            "--literal-pathspecs",
            "add",
            *flags,
            "--pathspec-from-file=-",
            "--pathspec-file-nul",
            env=env,
            stdin="\0".join(paths),
        )


def _nul_list(text: str) -> list[str]:
    return [p for p in text.split("\0") if p]


def git(
    root: str | Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None, strip: bool = True
) -> str:
    """`git <args>` in `root`; its stdout, or RegistryError with git's own message."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env, input=stdin)
    if done.returncode:
        raise RegistryError(f"git {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout.strip() if strip else done.stdout


FALLBACK_IDENTITY = {"name": "loraline", "email": "loraline@localhost"}


def ensure_git_identity(root: str | Path) -> None:
    """Snapshot commits and version tags need an author; a fresh machine often has none configured.

    Only when git has no user.name/user.email (and the environment sets none) does this process
    sign as "loraline <loraline@localhost>"; a configured identity is always used as it is.
    """
    for key in ("name", "email"):
        configured = subprocess.run(
            ["git", "config", f"user.{key}"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        if configured:
            continue
        for role in ("AUTHOR", "COMMITTER"):
            os.environ.setdefault(f"GIT_{role}_{key.upper()}", FALLBACK_IDENTITY[key])


def head_commit(root: str | Path) -> str | None:
    """HEAD's sha, or None in a repository without commits."""
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD^{commit}"], cwd=root, capture_output=True, text=True
    )
    return done.stdout.strip() or None
