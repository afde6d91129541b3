"""gto_tags reads GTO's tags as GTO does: every artifact's events and answers equal GTO's own, and GTO's state is
never built where every tag is in a format gto_tags covers.

One registry is built through the real gto API and CLI (registrations, promotions, a rollback, deprecate,
deregister, unassign, an artifact name with a path, a stage with a slash) plus GTO-format tags written by
`git tag` at fixed times: several of the same second (also written at another UTC offset) whose order only GTO's
own sorting decides, a deprecation tied with a registration, a non-GTO tag and lightweight tags.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from registry_helpers import commit_file, git

from loraline.registry import RegistryError, gto_poll, gto_tags
from loraline.registry.gto_registry import GtoRegistry, _wait_past

IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}
GTO = str(Path(sys.executable).with_name("gto"))


def _gto_cli(root: Path, *args: str) -> None:
    subprocess.run([GTO, *args, "--repo", str(root)], cwd=root, check=True, capture_output=True, text=True)


def _tag_at(root: Path, name: str, rev: str, when: str, message: str) -> None:
    """An annotated GTO-format tag at a fixed time (`when`: 'unix-seconds +hhmm'), as another writer makes one."""
    subprocess.run(
        ["git", "tag", "-a", name, rev, "-m", message],
        cwd=root,
        check=True,
        env={**IDENTITY, "PATH": "/usr/bin:/bin", "GIT_COMMITTER_DATE": when},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(root, every artifact name) of the registry described in the module docstring."""
    from gto import api

    with pytest.MonkeyPatch.context() as mp:
        for k, v in IDENTITY.items():
            mp.setenv(k, v)
        root = tmp_path_factory.mktemp("gto") / "repo"
        root.mkdir()
        git(root, "init", "-q", "-b", "main")
        c1, c2, c3 = (commit_file(root, "dvc.lock", f"{i}\n") for i in (1, 2, 3))
        reg = GtoRegistry(root)
        for commit in (c1, c2, c3):  # loraline's writes: lineage messages, promotions, a rollback
            reg.register("t1-adapter", commit, {"outputs": {"adapter": commit[:8]}, "note": "two\nlines"})
        for version in ("v0.0.1", "v0.0.2", "v0.0.3"):
            reg.promote("t1-adapter", version)
        reg.rollback("t1-adapter")
        api.register(str(root), "models:clf", c1, message="first")  # a name with a path: `models=clf@...`
        api.register(str(root), "models:clf", c2, version="v1.0.0-rc.1")
        api.assign(str(root), "models:clf", "qa/eu", version="v0.0.1")  # a stage with a slash
        api.assign(str(root), "models:clf", "qa/eu", version="v1.0.0-rc.1")
        api.unassign(str(root), "models:clf", stage="qa/eu", version="v0.0.1")
        _gto_cli(root, "deprecate", "models:clf", "v0.0.1")  # the CLI deregisters a version
        api.register(str(root), "team/old", c1)
        _wait_past(datetime.now(timezone.utc))  # deprecated a second later: not active (of the same second it is)
        _gto_cli(root, "deprecate", "team/old")
        t = int(git(root, "log", "-1", "--format=%ct")) + 1000  # after every commit's time
        for name, rev, when in [
            ("ties@v0.0.1", c1, f"{t} +0000"),
            ("ties@v0.0.2", c2, f"{t} +0000"),
            ("ties@v0.0.3", c3, f"{t + 7200} +0200"),  # the same instant as the next ones, another offset
            ("ties#prod#1", c1, f"{t + 5} +0000"),
            ("ties#prod#2", c2, f"{t + 5} +0000"),
            ("ties#prod", c1, f"{t + 5} +0000"),  # GTO's old assignment format, no counter
            ("ties#prod#3", c3, f"{t + 5} +0000"),
            ("ties#staging#4", c2, f"{t + 5} +0000"),
            ("ties#prod!#5", c3, f"{t + 5} +0000"),
            ("ties@v0.0.2!", c2, f"{t + 5} +0000"),
            ("tied@v0.0.1", c1, f"{t} +0000"),
            ("tied@deprecated", c1, f"{t} +0000"),  # tied with a version's event: GTO keeps it active
            ("gone@v0.0.1", c1, f"{t} +0000"),
            ("gone@deprecated#1", c1, f"{t + 1} -0130"),
            ("release-2024", c1, f"{t} +0000"),  # not GTO's
        ]:
            _tag_at(root, name, rev, when, f"{name}\n\nbody line\n  indented\n")
        git(root, "tag", "v1.0")  # lightweight, not GTO's
        git(root, "tag", "t1-adapter@v9.9.9", c1)  # lightweight in GTO's format: GTO skips it
        git(root, "tag", "ties#prod#9", c1)
        names = ["t1-adapter", "models:clf", "team/old", "ties", "tied", "gone", "never-registered"]
        yield root, names


def _by_gto(root: Path, name: str | None) -> dict[str, list[dict]]:
    from gto import api

    grouped: dict[str, list[dict]] = {}
    for event in api.history(str(root), name, ascending=True):
        grouped.setdefault(event["artifact"], []).append(dict(event))
    return grouped


def test_events_equal_gto_history_for_every_artifact_read_alone_and_together(built):
    root, names = built
    everything = gto_tags.read_registry(root)
    assert everything.events == _by_gto(root, None)
    assert len(everything.events["ties"]) == 10 and len(everything.events["t1-adapter"]) == 7
    for name in names:
        assert gto_tags.read_registry(root, name).events.get(name, []) == _by_gto(root, name).get(name, []), name


def test_artifacts_gto_show_lists(built):
    from gto import api

    root, _ = built
    active = gto_tags.read_registry(root).active
    assert active == sorted(api.show(str(root))) == ["models:clf", "t1-adapter", "tied", "ties"]


def _answers(reg: GtoRegistry, names: list[str]) -> list:
    def answer(call):
        try:
            return call()
        except RegistryError as exc:
            return f"error: {exc}"

    out = [reg.artifacts()]
    for n in names:
        history = {s: [(a, a.message) for a in reg.history(n, s)] for s in ("prod", "staging", "qa/eu")}
        versions = [(v, v.lineage) for v in reg.versions(n)]
        out.append((n, versions, reg.latest(n), history, answer(lambda n=n: reg.production(n))))
    return out


def test_registry_answers_equal_those_from_gto_reads(built, monkeypatch):
    root, names = built
    reg = GtoRegistry(root)
    fast, fast_shared = _answers(reg, names), None
    with reg.reading():
        fast_shared = _answers(reg, names)

    def not_covered(*_):
        raise gto_tags.NotCovered("test: ask GTO")

    monkeypatch.setattr(gto_tags, "read_registry", not_covered)
    monkeypatch.setattr(gto_poll, "read_whole", not_covered)
    assert fast == fast_shared == _answers(reg, names)
    assert fast[1][3]["prod"][-1][0].version == "v0.0.2"  # t1-adapter rolled back


def test_production_and_latest_equal_gto_show_for_loraline_artifacts(built):
    from gto import api

    root, _ = built
    shown, reg = api.show(str(root)), GtoRegistry(root)
    assert (reg.production("t1-adapter").version, reg.latest("t1-adapter").version) == ("v0.0.2", "v0.0.3")
    assert shown["t1-adapter"]["stage"]["prod"] == "v0.0.2" and shown["t1-adapter"]["version"] == "v0.0.3"


def test_reads_never_build_gtos_state(built, monkeypatch):
    from gto.registry import GitRegistry

    from loraline.serve.versions import production_versions

    root, names = built

    def refuse(*_, **__):
        raise AssertionError("GTO's state was built")

    monkeypatch.setattr(GitRegistry, "get_state", refuse)
    reg = GtoRegistry(root)
    _answers(reg, names)
    with reg.reading():
        _answers(reg, names)
    assert production_versions(root, ["t1", "ties"]).keys() == {"t1"}


def _tag(root: Path, name: str, rev: str = "HEAD", message: str = "m") -> None:
    git(root, "tag", "-a", name, rev, "-m", message)


@pytest.mark.parametrize(
    "setup, reason, to_gto",
    [
        (lambda root: (root / ".gto").write_text("stages: [prod]\n"), ".gto configures GTO", ["x", "y"]),
        (lambda root: git(root, "tag", "y@created"), "cannot read an @created tag", ["y"]),
        (lambda root: _tag(root, "x#prod#1", commit_file(root, "f", "new\n")), "0 registered versions of x", ["x"]),
        (lambda root: _tag(root, "y@v0.0.1", message="m\n-----BEGIN PGP SIGNATURE-----\n"), "signed", ["y"]),
        (lambda root: _tag(root, "y@v0.0.1", git(root, "rev-parse", "HEAD^{tree}")), "not a plain", ["y"]),
        (lambda root: _tag(root, "y@v0.0.1", "x@v0.0.1"), "not a plain annotated tag", ["y"]),  # a tag of a tag
        (
            lambda root: commit_file(root, "artifacts.yaml", "x: {}\n"),
            "artifacts.yaml in a commit GTO reads",
            ["x", "y"],
        ),
    ],
    ids=["config", "created", "unregistered-commit", "signed", "tree", "tag-of-tag", "index"],
)
def test_what_gto_tags_does_not_replay_is_read_by_gto(repo, setup, reason, to_gto, monkeypatch):
    """The whole registry's read goes to GTO, and so does that of the artifacts concerned (`to_gto`, of x and y):
    a config or index concerns every artifact, a tag only its own."""
    GtoRegistry(repo).register("x", commit_file(repo, "dvc.lock", "one\n"), {})
    setup(repo)
    with pytest.raises(gto_tags.NotCovered, match=reason):
        gto_tags.read_registry(repo)
    asked = []
    monkeypatch.setattr(
        GtoRegistry, "_read_with_gto", lambda self, name: asked.append(name) or gto_tags.TagRead({}, None)
    )
    reg = GtoRegistry(repo)
    reg.versions("x")
    reg.versions("y")
    assert asked == to_gto


def test_gto_environment_variables_send_reads_to_gto(repo, monkeypatch):
    monkeypatch.setenv("GTO_INDEX", "models.yaml")
    with pytest.raises(gto_tags.NotCovered, match="GTO_INDEX"):
        gto_tags.read_registry(repo)
