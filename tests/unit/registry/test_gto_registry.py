from __future__ import annotations

import json
import multiprocessing as mp

import pytest
from registry_helpers import commit_file, git

from loraline.registry import ANY, PromotionConflict, RegistryError
from loraline.registry.gto_registry import GtoRegistry


@pytest.fixture
def two_commits(repo):
    return repo, commit_file(repo, "dvc.lock", "one\n"), commit_file(repo, "dvc.lock", "two\n")


def test_register_bumps_patch_and_tag_carries_lineage(two_commits):
    repo, c1, c2 = two_commits
    reg = GtoRegistry(repo)
    assert (
        reg.latest("t1-adapter") is None and reg.production("t1-adapter") is None and reg.versions("t1-adapter") == []
    )
    v1 = reg.register("t1-adapter", c1, {"outputs": {"adapter": "abc.dir"}})
    v2 = reg.register("t1-adapter", c2, {"outputs": {"adapter": "def.dir"}})
    assert (v1.version, v1.commit, v2.version, v2.commit) == ("v0.0.1", c1, "v0.0.2", c2)
    assert reg.latest("t1-adapter").lineage == {"outputs": {"adapter": "def.dir"}}
    assert reg.register("t1-onnx", c2, {}, version="v0.0.2").version == "v0.0.2"
    assert reg.artifacts() == ["t1-adapter", "t1-onnx"]
    shown = git(repo, "show", "--no-patch", "t1-adapter@v0.0.1")
    assert "Register t1-adapter v0.0.1" in shown and '"adapter": "abc.dir"' in shown
    assert git(repo, "cat-file", "-t", "t1-adapter@v0.0.1") == "tag"  # annotated
    with pytest.raises(RegistryError, match="v0.0.2"):
        reg.register("t1-adapter", c1, {}, version="v0.0.2")


def test_promote_checks_expected_production(two_commits):
    repo, c1, c2 = two_commits
    reg = GtoRegistry(repo)
    reg.register("t1-adapter", c1, {})
    reg.register("t1-adapter", c2, {})
    a = reg.promote("t1-adapter", "v0.0.1", expected_current=None)
    assert (a.version, a.stage, a.number, a.commit) == ("v0.0.1", "prod", 1, c1)
    with pytest.raises(PromotionConflict, match="production is v0.0.1, not nothing"):
        reg.promote("t1-adapter", "v0.0.2", expected_current=None)
    assert reg.promote("t1-adapter", "v0.0.1") == a  # already production: no new tag
    b = reg.promote("t1-adapter", "v0.0.2", expected_current="v0.0.1", message="why: better")
    assert reg.production("t1-adapter").version == "v0.0.2" and b.number == 2 and "why: better" in b.message
    with pytest.raises(RegistryError, match="no version v9.9.9; registered: v0.0.1, v0.0.2"):
        reg.promote("t1-adapter", "v9.9.9")
    assert git(repo, "tag", "-l", "t1-adapter#*").split() == ["t1-adapter#prod#1", "t1-adapter#prod#2"]


def test_rollback_reassigns_the_previous_production(two_commits):
    repo, c1, c2 = two_commits
    reg = GtoRegistry(repo)
    with pytest.raises(RegistryError, match="never been promoted"):
        reg.rollback("t1-adapter")
    reg.register("t1-adapter", c1, {})
    reg.register("t1-adapter", c2, {})
    reg.promote("t1-adapter", "v0.0.1")
    with pytest.raises(RegistryError, match="nothing to roll back to, v0.0.1 is the only version"):
        reg.rollback("t1-adapter")
    reg.promote("t1-adapter", "v0.0.2")
    back = reg.rollback("t1-adapter")
    assert (back.version, back.number) == ("v0.0.1", 3)
    assert reg.production("t1-adapter").version == "v0.0.1"
    assert [a.version for a in reg.history("t1-adapter")] == ["v0.0.1", "v0.0.2", "v0.0.1"]
    from gto import api  # GTO's own reading agrees

    assert api.show(str(repo))["t1-adapter"]["stage"]["prod"] == "v0.0.1"


def _race(root, version, barrier, results):
    reg = GtoRegistry(root)
    barrier.wait()
    try:
        reg.promote("t1-adapter", version, expected_current=None)
        results.put((version, "won"))
    except PromotionConflict as exc:
        results.put((version, f"conflict: {exc.actual}"))


def test_concurrent_promotions_cannot_both_win(two_commits):
    repo, c1, c2 = two_commits
    reg = GtoRegistry(repo)
    reg.register("t1-adapter", c1, {})
    reg.register("t1-adapter", c2, {})
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(repo, v, barrier, results)) for v in ("v0.0.1", "v0.0.2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcome = dict(results.get(timeout=5) for _ in procs)
    winners = [v for v, r in outcome.items() if r == "won"]
    assert len(winners) == 1, outcome
    loser = ({"v0.0.1", "v0.0.2"} - set(winners)).pop()
    assert outcome[loser] == f"conflict: {winners[0]}"
    assert git(repo, "tag", "-l", "t1-adapter#*").split() == ["t1-adapter#prod#1"]
    assert reg.production("t1-adapter").version == winners[0]


def test_any_skips_the_check(two_commits):
    repo, c1, _ = two_commits
    reg = GtoRegistry(repo)
    reg.register("a", c1, {"k": 1})
    assert reg.promote("a", "v0.0.1", expected_current=ANY).version == "v0.0.1"
    assert json.loads(json.dumps(reg.production("a").lineage)) == {"k": 1}


def _count_reads(monkeypatch) -> list[str | None]:
    """The artifacts each registry read was asked for (None: every artifact, gto_poll), whether gto_tags or GTO
    answers it."""
    from loraline.registry import gto_poll, gto_tags

    asked: list[str | None] = []
    real, real_whole = gto_tags.read_registry, gto_poll.read_whole

    def counted(root, artifact=None):
        asked.append(artifact)
        return real(root, artifact)

    def counted_whole(root):
        asked.append(None)
        return real_whole(root)

    monkeypatch.setattr(gto_tags, "read_registry", counted)
    monkeypatch.setattr(gto_poll, "read_whole", counted_whole)
    return asked


def test_reading_answers_every_artifact_from_one_read_and_sees_its_own_writes(two_commits, monkeypatch):
    repo, c1, c2 = two_commits
    reg = GtoRegistry(repo)
    for tenant in ("t1", "t2", "t3"):
        for name in (f"{tenant}-adapter", f"{tenant}-onnx"):
            reg.register(name, c1, {"tenant": tenant})
            reg.register(name, c2, {"tenant": tenant})
    reg.promote("t1-adapter", "v0.0.1")
    reg.promote("t1-adapter", "v0.0.2")
    reg.promote("t2-onnx", "v0.0.1")
    names = [f"{t}-{k}" for t in ("t1", "t2", "t3", "t9") for k in ("adapter", "onnx")]  # t9: never registered

    def everything():
        return [(reg.versions(n), reg.history(n), reg.production(n), reg.latest(n)) for n in names]

    asked = _count_reads(monkeypatch)
    apart = everything()
    assert len(asked) == 4 * len(names) + 2  # per name: versions, history, production, latest; +1 per production
    asked.clear()
    with reg.reading():
        together = everything()
        assert asked == [None]  # one read of the whole registry
        reg.promote("t3-adapter", "v0.0.2")  # a write inside: the next read sees it
        assert reg.production("t3-adapter").version == "v0.0.2"
    assert together == apart
    assert [a.version for a in reg.history("t3-adapter")] == ["v0.0.2"]
    assert reg._shared is None  # nothing kept after the block


def test_serving_poll_reads_the_registry_once_for_every_tenant(two_commits, monkeypatch):
    from loraline.serve.versions import production_versions

    repo, c1, c2 = two_commits
    reg = GtoRegistry(repo)
    for tenant in ("t1", "t2", "t3"):
        reg.register(f"{tenant}-adapter", c1, {})
        reg.register(f"{tenant}-adapter", c2, {})
        reg.promote(f"{tenant}-adapter", "v0.0.2" if tenant == "t2" else "v0.0.1")
    asked = _count_reads(monkeypatch)
    served = production_versions(repo, ["t1", "t2", "t3", "t4"])
    assert asked == [None]
    assert {t: (p.version, p.commit, p.number) for t, p in served.items()} == {
        "t1": ("v0.0.1", c1, 1),
        "t2": ("v0.0.2", c2, 1),
        "t3": ("v0.0.1", c1, 1),
    }
