"""One registry for several machines: two clones of one project share their tags through a bare git remote."""

from __future__ import annotations

import pytest
from registry_helpers import bare_remote_and_two_clones, commit_file, git

from loraline.registry import RegistryError
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.sync import fetch_tags, shared_registry


@pytest.fixture
def machines(repo, tmp_path):
    """(remote, machine A, machine B): A and B clone one bare remote, as two workers of a pool would."""
    commit_file(repo, "dvc.lock", "one\n")
    return bare_remote_and_two_clones(repo, tmp_path)


def test_a_release_on_one_machine_is_seen_on_the_other(machines):
    remote, a, b = machines
    head = git(a, "rev-parse", "HEAD")
    with shared_registry(a, "origin"):
        GtoRegistry(a).register("t1-adapter", head, {"from": "a"})
        GtoRegistry(a).promote("t1-adapter", "v0.0.1")
    assert sorted(git(remote, "tag", "--list").split()) == ["t1-adapter#prod#1", "t1-adapter@v0.0.1"]

    newer = commit_file(b, "dvc.lock", "two\n")
    with shared_registry(b, "origin"):  # B decides against A's registry, then adds its own version
        assert GtoRegistry(b).production("t1-adapter").version == "v0.0.1"
        v = GtoRegistry(b).register("t1-adapter", newer, {"from": "b"})
    assert v.version == "v0.0.2"
    fetch_tags(a, "origin")
    assert [x.version for x in GtoRegistry(a).versions("t1-adapter")] == ["v0.0.1", "v0.0.2"]


def test_two_machines_promoting_at_once_lose_nothing_and_the_second_is_told(machines):
    remote, a, b = machines
    head = git(a, "rev-parse", "HEAD")
    with shared_registry(a, "origin"):
        GtoRegistry(a).register("t1-adapter", head, {})
    fetch_tags(b, "origin")
    # both decide against the same registry (v0.0.1 registered, nothing in production) ...
    with shared_registry(a, "origin"):
        GtoRegistry(a).promote("t1-adapter", "v0.0.1")
    with pytest.raises(
        RegistryError, match=r"changed the registry on 'origin' meanwhile, so t1-adapter#prod#1 were not pushed"
    ):
        with _without_fetch(b):  # B fetched before A promoted, and promotes too
            GtoRegistry(b).promote("t1-adapter", "v0.0.1", message="from b")
    # B's assignment is gone, A's is there, in both clones: one promotion, none lost or doubled
    ours = git(b, "rev-parse", "t1-adapter#prod#1")
    assert ours == git(remote, "rev-parse", "t1-adapter#prod#1") == git(a, "rev-parse", "t1-adapter#prod#1")
    assert "from b" not in GtoRegistry(b).history("t1-adapter")[0].message
    assert len(GtoRegistry(b).history("t1-adapter")) == 1


def _without_fetch(root):
    """shared_registry as it behaves when another machine pushes between our fetch and our push."""
    import contextlib

    from loraline.registry.sync import push_tags, tag_names

    @contextlib.contextmanager
    def block():
        before = tag_names(root)
        yield
        push_tags(root, "origin", sorted(tag_names(root) - before))

    return block()


def test_an_unknown_remote_names_the_setting(repo):
    with pytest.raises(
        RegistryError, match="orchestrate.registry_remote is 'nowhere' but this repository has no git remote"
    ):
        with shared_registry(repo, "nowhere"):
            pass
