from __future__ import annotations

from loraline.registry.snapshot import snapshot_commit

from registry_helpers import commit_file, git


def _state(root):
    return git(root, "rev-parse", "HEAD"), git(root, "status", "--porcelain"), git(root, "diff", "--cached", "--name-only")


def test_clean_tree_is_head(repo):
    head = commit_file(repo, "dvc.lock", "a\n")
    (repo / ".gitignore").write_text("models/\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-qm", "ignore")
    (repo / "models").mkdir()
    (repo / "models" / "big.bin").write_text("ignored output")
    assert snapshot_commit(repo, "snap") == git(repo, "rev-parse", "HEAD") != head


def test_dirty_tree_gets_a_commit_without_moving_the_branch_or_index(repo):
    head = commit_file(repo, "dvc.lock", "a\n")
    commit_file(repo, "params.yaml", "p: 1\n")
    head = git(repo, "rev-parse", "HEAD")
    (repo / "dvc.lock").write_text("b\n")  # modified, unstaged
    (repo / "params.yaml").write_text("p: 2\n")
    git(repo, "add", "params.yaml")  # modified and staged
    (repo / "data").mkdir()
    (repo / "data" / "new.jsonl").write_text("{}\n")  # untracked
    (repo / "gone.txt").write_text("x")
    before = _state(repo)

    sha = snapshot_commit(repo, "loraline snapshot")

    assert _state(repo) == before
    assert sha != head
    assert git(repo, "rev-parse", f"{sha}^") == head
    assert git(repo, "show", f"{sha}:dvc.lock") == "b"
    assert git(repo, "show", f"{sha}:params.yaml") == "p: 2"
    assert git(repo, "show", f"{sha}:data/new.jsonl") == "{}"
    assert git(repo, "log", "-1", "--format=%s", sha) == "loraline snapshot"


def test_deleted_file_is_absent_from_the_snapshot(repo):
    commit_file(repo, "a.txt", "a")
    commit_file(repo, "b.txt", "b")
    (repo / "b.txt").unlink()
    sha = snapshot_commit(repo, "snap")
    assert git(repo, "ls-tree", "--name-only", sha).split() == ["a.txt"]


def test_repository_without_commits(repo):
    (repo / "dvc.yaml").write_text("stages: {}\n")
    sha = snapshot_commit(repo, "first")
    assert git(repo, "rev-list", "--count", sha) == "1"
    assert git(repo, "show", f"{sha}:dvc.yaml") == "stages: {}"
    assert git(repo, "status", "--porcelain") == "?? dvc.yaml"


def test_a_machine_without_git_identity_still_gets_snapshots(tmp_path, monkeypatch):
    import subprocess

    from loraline.registry.snapshot import ensure_git_identity, snapshot_commit

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    for role in ("AUTHOR", "COMMITTER"):
        for key in ("NAME", "EMAIL"):
            # set, then delete: monkeypatch then restores the original state, whatever the fallback sets
            monkeypatch.setenv(f"GIT_{role}_{key}", "placeholder")
            monkeypatch.delenv(f"GIT_{role}_{key}")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "f.txt").write_text("x\n")
    ensure_git_identity(repo)
    sha = snapshot_commit(repo, "snapshot")
    author = subprocess.run(["git", "log", "-1", "--format=%an <%ae>", sha], cwd=repo, capture_output=True, text=True).stdout
    assert author.strip() == "loraline <loraline@localhost>"
