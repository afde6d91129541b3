"""Canary decisions as registry tags: first decision wins, on one machine and between machines, and a
rollback is the same tags `loraline registry rollback` makes (real git, real GTO)."""

from __future__ import annotations

import pytest
from registry_helpers import bare_remote_and_two_clones, commit_file, git

from loraline.registry import RegistryError
from loraline.registry.canary import decision_tag, provisional, read_decision, record_decision
from loraline.registry.gto_registry import GtoRegistry
from loraline.registry.sync import fetch_tags, shared_registry
from loraline.serve.versions import production_versions

ARTIFACTS = ("t1-adapter", "t1-onnx")


@pytest.fixture
def machines(repo, tmp_path):
    """(remote, A, B): two serving replicas' clones of one registry, where t1 v0.0.1 was production and
    v0.0.2 was then promoted on canary (t1-adapter#prod#2)."""
    first = commit_file(repo, "dvc.lock", "one\n")
    second = commit_file(repo, "dvc.lock", "two\n")
    registry = GtoRegistry(repo)
    for name in ARTIFACTS:
        registry.register(name, first, {})
        registry.register(name, second, {})
        registry.promote(name, "v0.0.1")
        registry.promote(name, "v0.0.2", message=provisional(f"Promote {name} v0.0.2"))
    return bare_remote_and_two_clones(repo, tmp_path)


def _number(root) -> int:
    return GtoRegistry(root).history("t1-adapter")[-1].number


def test_a_promotion_on_canary_names_the_version_it_is_measured_against_until_decided(machines):
    _, a, _ = machines
    [production] = production_versions(a, ["t1"], canary=True).values()
    assert (production.version, production.stable[0]) == ("v0.0.2", "v0.0.1")
    assert production.stable[1] == GtoRegistry(a).version("t1-adapter", "v0.0.1").commit
    assert production_versions(a, ["t1"], canary=False)["t1"].stable is None  # serve.canary off: served wholly
    record_decision(
        a, "origin", "t1", production.number, "v0.0.2", kept=True, reason="fine", facts={"n": 1}, by="replica a"
    )
    after = production_versions(a, ["t1"], canary=True)["t1"]
    assert (after.version, after.stable) == ("v0.0.2", None)  # kept: the whole tenant, on every replica that reads it


def test_a_rollback_decision_moves_both_artifacts_back_with_the_reason_and_first_decision_wins(machines):
    remote, a, b = machines
    number = _number(a)
    made = record_decision(
        a,
        "origin",
        "t1",
        number,
        "v0.0.2",
        kept=False,
        reason="error rate 0.50 above 0.02",
        facts={"canary": {"answers": 4}},
        by="replica a",
    )
    assert made is not None and not made.kept
    for name in ARTIFACTS:  # on the remote, for every replica
        fetch_tags(b, "origin")
        history = GtoRegistry(b).history(name)
        assert history[-1].version == "v0.0.1"
        assert (
            "Roll back" in history[-1].message
            and "replica a" in history[-1].message
            and "error rate 0.50 above 0.02" in history[-1].message
        )
    tag = git(remote, "tag", "--list", decision_tag("t1-adapter", number), "-n1")
    assert "Roll back t1-adapter v0.0.2 after its canary" in tag
    # B reaches its own verdict later: the standing decision is A's, and nothing more is written
    tags_before = git(remote, "tag", "--list")
    standing = record_decision(
        b, "origin", "t1", number, "v0.0.2", kept=True, reason="fine here", facts={}, by="replica b"
    )
    assert (standing.kept, standing.by, standing.facts) == (False, "replica a", {"canary": {"answers": 4}})
    assert git(remote, "tag", "--list") == tags_before
    assert read_decision(b, "t1-adapter", number) == standing
    assert GtoRegistry(b).production("t1-adapter").version == "v0.0.1"  # GTO reads past the decision tag


def test_two_replicas_deciding_at_once_one_push_wins_and_the_other_takes_it(machines, monkeypatch):
    remote, a, b = machines
    number = _number(a)
    fetch_tags(b, "origin")
    record_decision(a, "origin", "t1", number, "v0.0.2", kept=True, reason="fine", facts={}, by="replica a")

    import contextlib

    from loraline.registry import canary
    from loraline.registry.sync import push_tags, tag_names

    @contextlib.contextmanager
    def fetched_before_a_decided(root, remote_name):  # B's fetch happened before A's push
        before = tag_names(root)
        yield
        push_tags(root, remote_name, sorted(tag_names(root) - before))

    monkeypatch.setattr(canary, "shared_registry", fetched_before_a_decided)
    with pytest.raises(RegistryError, match="changed the registry on 'origin' meanwhile"):
        record_decision(b, "origin", "t1", number, "v0.0.2", kept=False, reason="slow here", facts={}, by="replica b")
    # B's rollback and decision were refused as a whole and dropped: B now holds A's decision, production stands
    assert read_decision(b, "t1-adapter", number).by == "replica a"
    assert GtoRegistry(b).production("t1-adapter").version == GtoRegistry(b).production("t1-onnx").version == "v0.0.2"
    assert git(remote, "tag", "--list", "t1-adapter#prod#*").split() == [
        "t1-adapter#prod#1",
        "t1-adapter#prod#2",
    ]  # no rollback


def test_nothing_is_decided_once_production_has_moved_on(machines):
    _, a, _ = machines
    number = _number(a)
    with shared_registry(a, "origin"):
        GtoRegistry(a).rollback("t1-adapter", message="by hand")
    assert (
        record_decision(a, "origin", "t1", number, "v0.0.2", kept=False, reason="late", facts={}, by="replica a")
        is None
    )
    assert read_decision(a, "t1-adapter", number) is None
    assert GtoRegistry(a).production("t1-onnx").version == "v0.0.2"  # no second rollback of anything
