"""gto_poll answers every read of the whole registry exactly as a full read by gto_tags does, through tags added,
moved, deleted, broken and mended, and parses only the tags that changed: a poll with nothing changed parses
none, and the next poll after a promotion sees it."""

from __future__ import annotations

import time

import pytest
from registry_helpers import commit_file, git

from loraline.registry import gto_poll, gto_tags
from loraline.registry.gto_registry import GtoRegistry


def _answer(read, root):
    """A read's answer (events, active) or its NotCovered's message."""
    try:
        got = read(root)
    except gto_tags.NotCovered as why:
        return f"not covered: {why}"
    return got.events, got.active


@pytest.fixture
def parses(monkeypatch):
    """How many tags gto_tags parsed (gto_tag calls) since the last clear."""
    counted: list[str] = []
    real = gto_tags.gto_tag

    def counting(record):
        counted.append(record.name)
        return real(record)

    monkeypatch.setattr(gto_tags, "gto_tag", counting)
    return counted


def _tag(root, name, rev="HEAD", message="m"):
    git(root, "tag", "-a", name, rev, "-m", message)


def test_every_answer_equals_a_full_read_through_changes(repo, monkeypatch):
    reg = GtoRegistry(repo)
    c1, c2 = commit_file(repo, "f", "1\n"), commit_file(repo, "f", "2\n")
    steps = {
        "registered": lambda: [reg.register(n, c, {}) for n in ("a", "team/b") for c in (c1, c2)],
        "promoted": lambda: [reg.promote("a", "v0.0.1"), reg.promote("team/b", "v0.0.2")],
        "not GTO's and lightweight": lambda: [git(repo, "tag", "release-1"), git(repo, "tag", "a#prod#9", c2)],
        "deleted": lambda: git(repo, "tag", "-d", "a#prod#1"),
        "moved": lambda: git(repo, "tag", "-f", "-a", "team/b@v0.0.2", c1, "-m", "moved"),
        "broken": lambda: git(repo, "tag", "c@created"),
        "mended": lambda: git(repo, "tag", "-d", "c@created"),
        "unregistered commit": lambda: _tag(repo, "a#prod#7", commit_file(repo, "g", "x\n")),
        "its version": lambda: reg.register("a", "HEAD", {}),
        "deprecated": lambda: _tag(repo, "team/b@deprecated"),
        "index at HEAD": lambda: commit_file(repo, "artifacts.yaml", "a: {}\n"),
        "index gone": lambda: (git(repo, "rm", "-q", "artifacts.yaml"), git(repo, "commit", "-qm", "rm")),
        "packed": lambda: git(repo, "pack-refs", "--all"),
        "many at once": lambda: [_tag(repo, f"d@v0.0.{i}", commit_file(repo, "h", f"{i}\n")) for i in (1, 2, 3)],
        "all gone": lambda: [git(repo, "tag", "-d", t) for t in git(repo, "tag", "-l").split()],
    }
    monkeypatch.setattr(gto_poll, "MANY", 2)  # "many at once" re-reads every tag
    seen = []
    for step, change in steps.items():
        change()
        polled = _answer(gto_poll.read_whole, repo)
        assert polled == _answer(gto_tags.read_registry, repo), step
        seen.append(polled if isinstance(polled, str) else sorted(polled[0]))
    assert seen[1] == ["a", "team/b"] and "@created" in seen[5] and "0 registered versions" in seen[7]
    assert "artifacts.yaml" in seen[10] and seen[-1] == []


def test_a_poll_with_nothing_changed_parses_nothing_and_the_next_promotion_is_seen(repo, parses, monkeypatch):
    from loraline.serve.versions import production_versions

    reg = GtoRegistry(repo)
    c1, c2 = commit_file(repo, "f", "1\n"), commit_file(repo, "f", "2\n")
    for tenant in ("t1", "t2"):
        reg.register(f"{tenant}-adapter", c1, {})
        reg.promote(f"{tenant}-adapter", "v0.0.1")
    parses.clear()
    assert production_versions(repo, ["t1", "t2"])["t1"].version == "v0.0.1"
    assert len(parses) == 4  # a new process's first poll reads every tag
    parses.clear()
    assert production_versions(repo, ["t1", "t2"])["t1"].version == "v0.0.1"
    assert parses == []
    reg.register("t1-adapter", c2, {})
    parses.clear()  # the write read its own artifact's tags
    reg.promote("t1-adapter", "v0.0.2")
    parses.clear()
    served = production_versions(repo, ["t1", "t2"])
    assert (served["t1"].version, served["t1"].number, served["t2"].version) == ("v0.0.2", 2, "v0.0.1")
    assert sorted(parses) == ["t1-adapter#prod#2", "t1-adapter@v0.0.2"]


def test_trusted_stats_spare_the_listing_and_still_see_a_new_tag(repo, parses, monkeypatch):
    reg = GtoRegistry(repo)
    reg.register("a", commit_file(repo, "f", "1\n"), {})
    monkeypatch.setattr(gto_poll, "TRUST_S", 0.05)
    gto_poll.read_whole(repo)
    time.sleep(0.1)
    gto_poll.read_whole(repo)  # the refs store's stats are now older than TRUST_S: trusted
    listings = []
    real = gto_poll._Snapshot._listing
    monkeypatch.setattr(gto_poll._Snapshot, "_listing", lambda self: listings.append(1) or real(self))
    parses.clear()
    assert gto_poll.read_whole(repo).active == ["a"] and listings == [] and parses == []
    time.sleep(0.1)
    _tag(repo, "b@v0.0.1")  # a new loose ref: its directory's stats change
    assert gto_poll.read_whole(repo).active == ["a", "b"] and listings == [1] and parses == ["b@v0.0.1"]


def test_a_stamp_of_recent_changes_is_not_trusted(repo):
    GtoRegistry(repo).register("a", commit_file(repo, "f", "1\n"), {})
    gto_poll.forget(repo)
    gto_poll.read_whole(repo)
    snapshot = gto_poll._SNAPSHOTS[repo]
    assert snapshot.stamp is None  # the tag was written under TRUST_S ago: the next read lists the refs
