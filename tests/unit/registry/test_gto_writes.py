"""gto_writes writes what gto.api writes: the same operations on two repositories with the same commits, one
written by gto_writes (GtoRegistry's writes), one by gto.api, give the same tags (names, targets, messages,
tagger), the same errors, and the same registry to GTO (api.history, api.show, the `gto show` CLI); and
gto_writes never builds GTO's state."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from registry_helpers import commit_file, git

from loraline.registry import RegistryError, gto_tags, gto_writes
from loraline.registry.gto_registry import GtoRegistry, _wait_past

GTO = str(Path(sys.executable).with_name("gto"))
FIXED = {"GIT_AUTHOR_DATE": "1700000000 +0000", "GIT_COMMITTER_DATE": "1700000000 +0000"}


def _repo(root: Path) -> list[str]:
    """Three commits, the same shas in every repository made here (fixed identity and dates)."""
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    commits = []
    for i in range(3):
        (root / "dvc.lock").write_text(f"{i}\n")
        git(root, "add", "dvc.lock")
        subprocess.run(["git", "commit", "-q", "-m", f"c{i}"], cwd=root, check=True, env=_env(FIXED))
        commits.append(git(root, "rev-parse", "HEAD"))
    return commits


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


def _by_gto(root: Path, op: str, *args) -> str:
    """The write as GtoRegistry made it through gto.api before gto_writes."""
    from gto import api

    if op == "register":
        name, commit, version, message = args
        return api.register(str(root), name, commit, version=version, message=message).tag
    name, stage, version, message = args
    return api.assign(str(root), name, stage, version=version, message=message, force=True).tag


def _by_writes(root: Path, op: str, *args) -> str:
    return getattr(gto_writes, op)(root, *args)


def _run(root: Path, write, c: list[str]) -> list[str]:
    """The operations, in order; each one's outcome (the tag, or the error's class and message)."""
    from gto import api
    from gto.exceptions import GTOException

    ops = [
        ("register", "t1-adapter", c[0], "v0.0.1", 'Register t1-adapter v0.0.1\n\n{\n  "a": 1\n}\n'),
        ("register", "t1-adapter", c[1], "v0.0.2", "second"),
        ("assign", "t1-adapter", "prod", "v0.0.1", "Promote"),
        ("assign", "t1-adapter", "prod", "v0.0.2", "Promote again"),
        ("assign", "t1-adapter", "prod", "v0.0.1", "Roll back"),
        ("register", "t1-adapter", c[2], "v0.0.2", "a version at another commit"),
        ("register", "t1-adapter", c[0], "v0.0.9", "a commit with a version"),
        ("register", "t1-adapter", c[2], "v1", "not semver"),
        ("assign", "t1-adapter", "prod", "v0.0.7", "not registered"),
        ("assign", "t1-adapter", "bad stage", "v0.0.1", "a stage GTO refuses"),
        ("register", "bad name!", c[0], "v0.0.1", "a name GTO refuses"),
        ("register", "models:clf", c[0], "v1.0.0-rc.1", "a name with a path"),
        ("assign", "models:clf", "qa/eu", "v1.0.0-rc.1", "a stage with a slash"),
        ("deregister", "t1-adapter", "v0.0.2"),
        ("register", "t1-adapter", c[1], "v0.0.3", "a deregistered version's commit, another version"),
        ("register", "t1-adapter", c[1], "v0.0.2", "the deregistered version again: its tag exists"),
        ("assign", "t1-adapter", "prod", "v0.0.2", "a deregistered version is still found"),
        ("lightweight", "t1-adapter#staging#7", c[0]),
        ("assign", "t1-adapter", "staging", "v0.0.1", "counted past a lightweight tag of another stage"),
        ("lightweight", "t1-onnx@v0.0.1", c[2]),
        ("register", "t1-onnx", c[2], "v0.0.1", "the name of a lightweight tag"),
        ("register", "t1-onnx", c[2], "v0.0.2", "a commit with no registered version"),
    ]
    out = []
    for op, *args in ops:
        if op == "deregister":  # GTO's own, in both repositories
            api.deregister(str(root), args[0], version=args[1])
            continue
        if op == "lightweight":
            git(root, "tag", *args)
            continue
        try:
            out.append(write(root, op, *args))
        except GTOException as exc:
            out.append(f"{type(exc).__name__}: {exc}")
        if op == "assign":
            _wait_past(_newest_tag_time(root))  # GTO orders assignments by tag time (seconds)
    return out


def _newest_tag_time(root: Path):
    from datetime import datetime, timezone

    stamps = git(root, "for-each-ref", "--format=%(taggerdate:unix)", "refs/tags").split()
    return datetime.fromtimestamp(max(int(s) for s in stamps if s), tz=timezone.utc)


def _tags(root: Path) -> dict[str, str]:
    """Every tag's object with its time left out (two runs cannot share a second)."""
    names = git(root, "tag", "-l").split("\n")
    return {n: re.sub(r"> \d+ [+-]\d{4}\n", "> T\n", git(root, "cat-file", "-p", n)) for n in names}


def _history(root: Path) -> list[dict]:
    from gto import api

    return [{k: v for k, v in e.items() if k != "timestamp"} for e in api.history(str(root), ascending=True)]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(root written by gto_writes, root written by gto.api, outcomes of each)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "T"}.items():
            mp.setenv(k, v)
        mp.setenv("GIT_COMMITTER_EMAIL", "t@e")
        mp.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
        base = tmp_path_factory.mktemp("twins")
        ours, theirs = base / "ours", base / "gto"
        c_ours, c_theirs = _repo(ours), _repo(theirs)
        assert c_ours == c_theirs
        yield ours, theirs, _run(ours, _by_writes, c_ours), _run(theirs, _by_gto, c_theirs)


def test_same_outcomes_and_tags_as_gto_api(twins):
    ours, theirs, done_ours, done_theirs = twins
    assert done_ours == done_theirs
    assert "t1-adapter#staging#8" in done_ours and "models=clf#qa/eu#6" not in done_ours  # counters per artifact
    assert "models=clf#qa/eu#1" in done_ours and "t1-adapter#prod#3" in done_ours
    assert any(o.startswith("VersionAlreadyRegistered: Version 'v0.0.2' already was registered") for o in done_ours)
    assert any(o.startswith("VersionExistsForCommit: 't1-adapter' is already registered") for o in done_ours)
    assert "WrongArgs: Version 'v0.0.7' is not registered" in done_ours
    assert "TagExists: tag 't1-onnx@v0.0.1' already exists" in done_ours
    assert _tags(ours) == _tags(theirs)
    assert git(ours, "cat-file", "-t", "t1-adapter#prod#1") == "tag"  # annotated


def test_gto_reads_them_alike(twins):
    from gto import api

    ours, theirs, _, _ = twins
    assert _history(ours) == _history(theirs)
    assert api.show(str(ours)) == api.show(str(theirs))
    shown = [
        subprocess.run([GTO, "show", "--json", "-r", str(r)], check=True, capture_output=True, text=True).stdout
        for r in (ours, theirs)
    ]
    assert json.loads(shown[0]) == json.loads(shown[1])
    assert json.loads(shown[0])["t1-adapter"]["stage"]["prod"] == "v0.0.1"  # v0.0.2 deregistered: gto show skips it


def test_registry_writes_never_build_gtos_state(repo, monkeypatch):
    from gto import api
    from gto.registry import GitRegistry

    def refuse(*_, **__):
        raise AssertionError("GTO wrote or built its state")

    for target, attr in [(GitRegistry, "get_state"), (api, "register"), (api, "assign")]:
        monkeypatch.setattr(target, attr, refuse)
    reg = GtoRegistry(repo)
    c1, c2 = commit_file(repo, "f", "1\n"), commit_file(repo, "f", "2\n")
    reg.register("t1-adapter", c1, {"a": 1})
    reg.register("t1-adapter", c2, {"a": 2})
    reg.promote("t1-adapter", "v0.0.1")
    reg.promote("t1-adapter", "v0.0.2")
    assert reg.rollback("t1-adapter").version == "v0.0.1"
    assert git(repo, "tag", "-l").split() == [
        "t1-adapter#prod#1",
        "t1-adapter#prod#2",
        "t1-adapter#prod#3",
        "t1-adapter@v0.0.1",
        "t1-adapter@v0.0.2",
    ]


def test_errors_stay_clear(repo):

    reg = GtoRegistry(repo)
    c1, c2 = commit_file(repo, "f", "1\n"), commit_file(repo, "f", "2\n")
    reg.register("t1-adapter", c1, {})
    with pytest.raises(RegistryError, match=r"cannot register t1-adapter v0.0.1 at .*: Version 'v0.0.1' already was"):
        reg.register("t1-adapter", c2, {}, version="v0.0.1")
    with pytest.raises(RegistryError, match="'t1-adapter' is already registered in this commit with version 'v0.0.1'"):
        reg.register("t1-adapter", c1, {}, version="v0.0.5")
    with pytest.raises(RegistryError, match="t1-adapter has no version v0.0.4; registered: v0.0.1"):
        reg.promote("t1-adapter", "v0.0.4")
    with pytest.raises(RegistryError, match="cannot promote t1-adapter v0.0.4: Version 'v0.0.4' is not registered"):
        reg._assign("t1-adapter", "v0.0.4", "past promote's own check")


def test_what_gto_tags_does_not_cover_is_written_by_gto(repo, monkeypatch):
    from gto import api

    reg = GtoRegistry(repo)
    c1 = commit_file(repo, "f", "1\n")
    (repo / ".gto").write_text("stages: [prod, staging]\n")
    with pytest.raises(gto_tags.NotCovered, match=".gto configures GTO"):
        gto_writes.register(repo, "t1-adapter", c1, "v0.0.1", "m")
    wrote = []
    real = api.register
    monkeypatch.setattr(api, "register", lambda *a, **kw: wrote.append(a[1]) or real(*a, **kw))
    assert reg.register("t1-adapter", c1, {}).version == "v0.0.1" and wrote == ["t1-adapter"]
