"""One registry for several machines: its tags fetched from a git remote before a release and pushed after.

Flow runs on other machines (Prefect work-pool workers, each with its own clone) register and
promote in their own clone. The registry is nothing but tags, and every version tag points at a
snapshot commit that carries the dvc.lock, params and raw data the version came from, so sharing it
needs no commits on anyone's branch: fetch every tag before a release decides, push the tags it
made after. The adapters travel through the DVC remote (the flow pushes before it releases), which
is where `dvc artifacts get` and the release's production evaluation read them from elsewhere.

Two machines releasing the same tenant at once both number their tags from the same registry; git
never moves a tag, so the second push is refused as a whole (`--atomic`). That machine then drops
the tags it made, takes the remote's, and fails naming them, so nothing is lost and a retry (the
flow retries registry I/O) decides again against what the other machine did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from loraline.registry.base import RegistryError
from loraline.registry.snapshot import git


def check_remote(root: str | Path, remote: str) -> None:
    try:
        git(root, "remote", "get-url", remote)
    except RegistryError:
        raise RegistryError(
            f"orchestrate.registry_remote is {remote!r} but this repository has no git remote of that name "
            f"(add it with `git remote add {remote} <url>`, or set registry_remote: null to keep the registry local)"
        ) from None


def tag_names(root: str | Path) -> set[str]:
    return set(git(root, "tag", "--list").split())


def fetch_tags(root: str | Path, remote: str) -> None:
    """Every tag of `remote` into this clone; a local tag of the same name at another commit is an error."""
    check_remote(root, remote)
    try:
        git(root, "fetch", "--quiet", "--no-write-fetch-head", remote, "refs/tags/*:refs/tags/*")
    except RegistryError as exc:
        raise RegistryError(
            f"cannot take the registry from git remote {remote!r}: {exc}. A tag that exists here and there with "
            "different content means this clone registered without sharing; delete the local tag to take the remote's"
        ) from None


def push_tags(root: str | Path, remote: str, tags: list[str]) -> None:
    """Push `tags` all or none; when refused, drop them here, take the remote's and raise."""
    if not tags:
        return
    try:
        git(root, "push", "--quiet", "--atomic", remote, *(f"refs/tags/{t}" for t in tags))
    except RegistryError as exc:
        git(root, "tag", "--delete", *tags)
        fetch_tags(root, remote)
        raise RegistryError(
            f"another machine changed the registry on {remote!r} meanwhile, so {', '.join(tags)} were not pushed "
            f"and are dropped here; the registry is now the remote's: release again to decide against it ({exc})"
        ) from None


@contextlib.contextmanager
def shared_registry(root: str | Path, remote: str | None) -> Iterator[None]:
    """Registry writes inside run against `remote`'s registry: fetched on entry, the new tags
    pushed when the block succeeds (nothing is pushed after an error). No remote: a no-op."""
    if not remote:
        yield
        return
    fetch_tags(root, remote)
    before = tag_names(root)
    yield
    push_tags(root, remote, sorted(tag_names(root) - before))
