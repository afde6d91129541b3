"""GTO's registrations and assignments written without GTO's state: its checks on one artifact's tags, its tag.

`gto.api.register` and `gto.api.assign` build GTO's state of every artifact from every tag several times per
call (GitRegistry.find_artifact, find_commit, _return_event: about 1 ms a tag each). What they decide depends
on the artifact's own versions only, which gto_tags reads from that artifact's tags, so `register` and `assign`
here make GTO's checks on those and then write the tag with GTO's own `gto.tag.create_tag` (dulwich, as
scmrepo's backend): the same tag object, byte for byte, as GTO writes. What GTO 1.10.1 does, for the calls
loraline makes (gto/registry.py, gto/tag.py; GtoRegistry passes a version and a message, never an author):

- Registration, `api.register(repo, name, commit, version=..., message=...)`: simple, so the tag is
  `<name>@<version>` (a name's `:` written `=`), no counter. Checks, in GTO's order: the name
  (assert_fullname_is_valid); the version at that commit (several: ManyVersions): if it is registered and
  active, VersionExistsForCommit, else it must be the version asked for (WrongArgs); SemVer(version); the
  version of that name (several: ManyVersions) must be the one at that commit, or both none
  (VersionAlreadyRegistered). A version is one (version, commit) of the artifact's registration and
  deregistration tags; registered: it has a registration; active: its newest one is a registration (a
  deregistration of the same second is the newer: GTO's stable sort, reversed).
- Assignment, `api.assign(repo, name, stage, version=..., message=..., force=True)`: not simple, so the tag is
  `<name>#<stage>#N`, N = 1 + the highest counter of any tag GTO parses as the artifact's (every stage and
  action, lightweight tags too: gto.tag.name_tag over scm.list_tags). Checks: the name, the stage
  (assert_name_is_valid; no .gto, so no list of stages), the version (SemVer.is_valid, else WrongArgs); the
  version of that name (several: ManyVersions; none: WrongArgs "Version '...' is not registered", a
  deregistered one is found). The tag is at that version's commit. A version is given, so GTO never
  registers one here (it does only when assigning a commit), and force skips "already in this stage".
- The tag (gto.tag.create_tag): annotated, even when the name exists as a lightweight tag (TagExists); the
  message as given plus a newline (dulwich); tagger: git's committer identity as dulwich resolves it
  (GIT_COMMITTER_NAME/EMAIL, else user.name/email in git's config, else a default); time: now, whole seconds,
  at the local offset.

Where gto_tags does not cover the artifact's tags (gto_tags.NotCovered: a .gto config, GTO_* variables, an
artifacts.yaml GTO would read, a tag it does not replay) the caller writes through gto.api instead, as it
reads through GTO there. GTO's state also fails a write when another artifact's tags break it (an `@created`
tag); a write here depends on its own artifact's tags only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraline.registry import gto_tags


def register(root: Path, name: str, commit: str, version: str, message: str) -> str:
    """GTO's registration of `name` `version` at `commit` (a full sha): its checks, then its tag; the tag's name."""
    from gto.constants import assert_fullname_is_valid, name_to_tag
    from gto.exceptions import VersionAlreadyRegistered, VersionExistsForCommit, WrongArgs
    from gto.versions import SemVer

    assert_fullname_is_valid(name)
    versions = _versions(gto_tags.read_artifact(root, name))
    at_commit = _one(name, [v for v in versions if v.commit == commit])
    if at_commit is not None:
        if at_commit.registered and at_commit.active:
            raise VersionExistsForCommit(name, at_commit.version)
        if at_commit.version != version:
            raise WrongArgs(f"For this REF you can only register {at_commit.version}")
    SemVer(version)
    if _one(name, [v for v in versions if v.version == version]) is not at_commit:
        raise VersionAlreadyRegistered(version)
    tag = f"{name_to_tag(name)}@{version}"
    _create_tag(root, tag, commit, message)
    return tag


def assign(root: Path, name: str, stage: str, version: str, message: str) -> str:
    """GTO's forced assignment of `stage` to `name` `version`: its checks, then its `#stage#N` tag; the tag's name."""
    from gto.constants import assert_fullname_is_valid, assert_name_is_valid, name_to_tag
    from gto.exceptions import WrongArgs
    from gto.tag import parse_name
    from gto.versions import SemVer

    assert_fullname_is_valid(name)
    assert_name_is_valid(stage)
    if not SemVer.is_valid(version):
        raise WrongArgs(f"Version '{version}' is not valid. Example of valid version: 'v1.0.0'")
    read = gto_tags.read_artifact(root, name)
    found = _one(name, [v for v in _versions(read) if v.version == version])
    if found is None:
        raise WrongArgs(f"Version '{version}' is not registered")
    counter = max((parse_name(n).get("counter", 0) for n in read.names), default=0)
    tag = f"{name_to_tag(name)}#{stage}#{counter + 1}"
    _create_tag(root, tag, found.commit, message)
    return tag


@dataclass
class _Version:
    """One of GTO's versions of an artifact: a (version, commit) with registration or deregistration tags."""

    version: str
    commit: str
    registered_at: list[int] = field(default_factory=list)
    deregistered_at: list[int] = field(default_factory=list)

    @property
    def registered(self) -> bool:
        return bool(self.registered_at)

    @property
    def active(self) -> bool:
        """GTO's Version.is_active: the newest direct event is a registration (a tie goes to the deregistration)."""
        return self.registered and (not self.deregistered_at or max(self.registered_at) > max(self.deregistered_at))


def _versions(read: gto_tags.ArtifactRead) -> list[_Version]:
    """The artifact's versions in the order GTO's state creates them (its tags in gto.tag.find's order)."""
    found: dict[tuple[str, str], _Version] = {}
    for tag in read.tags:
        if tag.action in ("register", "deregister"):
            v = found.setdefault((tag.version, tag.commit), _Version(tag.version, tag.commit))
            (v.registered_at if tag.action == "register" else v.deregistered_at).append(tag.time)
    return list(found.values())


def _one(name: str, versions: list[_Version]) -> _Version | None:
    """GTO's Artifact.find_version: the one found, None, or ManyVersions."""
    from gto.exceptions import ManyVersions

    if len(versions) > 1:
        raise ManyVersions(name=name, versions=[v.version for v in versions])
    return versions[0] if versions else None


def _create_tag(root: Path, tag: str, commit: str, message: str) -> None:
    """GTO's own tag writer (gto.tag.create_tag through scmrepo, as GTO calls it): TagExists if the name is taken."""
    from gto.tag import create_tag
    from scmrepo.git import Git

    scm = Git(str(root))
    try:
        create_tag(scm, tag, rev=commit, message=message)
    finally:
        scm.close()
