"""snapshot_commit in real git repositories: what goes into a version's snapshot, and what never does."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from registry_helpers import commit_file, git

from loraline.registry import RegistryError
from loraline.registry.snapshot import lineage_paths, snapshot_commit

LOCK = yaml.safe_dump(
    {
        "schema": "2.0",
        "stages": {
            "prepare@t1": {
                "deps": [{"path": "data/raw/t1", "md5": "r.dir"}, {"path": "src/code", "md5": "c.dir"}],
                "params": {"params.yaml": {"seed": 1}},
            }
        },
    }
)


def _state(root):
    return (
        git(root, "rev-parse", "HEAD"),
        git(root, "status", "--porcelain"),
        git(root, "diff", "--cached", "--name-only"),
    )


def _files(root, sha):
    return git(root, "ls-tree", "-r", "--name-only", sha).split()


def _in_commit(root, sha, path):
    return subprocess.run(["git", "cat-file", "-e", f"{sha}:{path}"], cwd=root).returncode == 0


@pytest.fixture
def project(repo):
    """A committed project whose dvc.lock names data/raw/t1 and src/code as dependencies."""
    commit_file(repo, "data/raw/t1/a.jsonl", "{}\n")
    commit_file(repo, "src/code/m.py", "x = 1\n")
    commit_file(repo, "params.yaml", "seed: 1\n")
    commit_file(repo, "dvc.lock", LOCK)
    return repo


def test_clean_tree_is_head(repo):
    head = commit_file(repo, "dvc.lock", "a\n")
    (repo / ".gitignore").write_text("models/\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-qm", "ignore")
    (repo / "models").mkdir()
    (repo / "models" / "big.bin").write_text("ignored output")
    assert snapshot_commit(repo, "snap") == git(repo, "rev-parse", "HEAD") != head


def test_lineage_changes_go_in_and_other_untracked_files_never_do(project):
    head = git(project, "rev-parse", "HEAD")
    (project / "dvc.lock").write_text(LOCK + "# rebuilt\n")  # modified, unstaged
    (project / "params.yaml").write_text("seed: 2\n")
    git(project, "add", "params.yaml")  # modified and staged
    (project / "data/raw/t1/new.jsonl").write_text('{"n": 1}\n')  # untracked, in the tenant's raw data
    (project / "src/code/helper.py").write_text("y = 2\n")  # untracked, in code a stage depends on
    (project / "dvc.yaml").write_text("stages: {}\n")  # untracked lineage file
    (project / ".env").write_text("OPENAI_API_KEY=sk-live-123\n")  # untracked secret
    (project / "notes.txt").write_text("scratch\n")  # untracked, not lineage
    (project / "src/other.py").write_text("z = 3\n")  # untracked, outside every dependency
    before = _state(project)

    sha = snapshot_commit(project, "loraline snapshot")

    assert _state(project) == before  # the user's HEAD, index and working tree as they were
    assert git(project, "rev-parse", f"{sha}^") == head and sha != head
    assert git(project, "show", f"{sha}:dvc.lock").endswith("# rebuilt")
    assert git(project, "show", f"{sha}:params.yaml") == "seed: 2"
    assert git(project, "show", f"{sha}:data/raw/t1/new.jsonl") == '{"n": 1}'
    assert git(project, "show", f"{sha}:src/code/helper.py") == "y = 2"
    assert git(project, "show", f"{sha}:dvc.yaml") == "stages: {}"
    with pytest.raises(subprocess.CalledProcessError):
        git(project, "show", f"{sha}:.env")
    assert not _in_commit(project, sha, "notes.txt") and not _in_commit(project, sha, "src/other.py")
    assert git(project, "log", "-1", "--format=%s", sha) == "loraline snapshot"


def test_a_staged_new_file_is_not_taken(project):
    (project / ".env").write_text("KEY=secret\n")
    (project / "draft.md").write_text("draft\n")
    git(project, "add", ".env", "draft.md")
    (project / "params.yaml").write_text("seed: 3\n")
    sha = snapshot_commit(project, "snap")
    assert not _in_commit(project, sha, ".env") and not _in_commit(project, sha, "draft.md")
    assert git(project, "diff", "--cached", "--name-only").split() == [".env", "draft.md"]  # still staged


def test_a_tracked_secret_keeps_heads_content(project):
    commit_file(project, "deploy/.env", "OPENAI_API_KEY=\n")
    commit_file(project, "deploy/server.pem", "placeholder\n")
    (project / "deploy/.env").write_text("OPENAI_API_KEY=sk-live-123\n")
    (project / "deploy/server.pem").unlink()
    (project / "params.yaml").write_text("seed: 4\n")
    sha = snapshot_commit(project, "snap")
    assert git(project, "show", f"{sha}:deploy/.env") == "OPENAI_API_KEY="
    assert git(project, "show", f"{sha}:deploy/server.pem") == "placeholder"
    assert git(project, "show", f"{sha}:params.yaml") == "seed: 4"


def test_a_secret_inside_a_path_the_pipeline_reads_is_refused(project):
    (project / "data/raw/t1/.env").write_text("TOKEN=abc\n")
    with pytest.raises(
        RegistryError, match=r"data/raw/t1/\.env looks like a secret and is untracked inside a path the pipeline reads"
    ):
        snapshot_commit(project, "snap")


def test_dvc_local_config_never_goes_in(project):
    (project / ".dvc").mkdir()
    (project / ".dvc/config").write_text("[core]\n    remote = local\n")
    (project / ".dvc/config.local").write_text("['remote \"s3\"']\n    secret_access_key = abc\n")
    sha = snapshot_commit(project, "snap")
    assert _in_commit(project, sha, ".dvc/config") and not _in_commit(project, sha, ".dvc/config.local")


def test_extra_paths_and_pointer_files(project):
    (project / "data/raw/t2").mkdir(parents=True)
    (project / "data/raw/t2/rows.jsonl").write_text("{}\n")
    (project / "data/raw/t1.dvc").write_text("outs: []\n")
    assert {"data/raw/t1", "data/raw/t1.dvc", "src/code", "params.yaml", "dvc.lock"} <= set(lineage_paths(project))
    sha = snapshot_commit(project, "snap", extra=["data/raw/t2", "/elsewhere", "../up"])
    assert _in_commit(project, sha, "data/raw/t2/rows.jsonl") and _in_commit(project, sha, "data/raw/t1.dvc")


def test_deleted_file_is_absent_from_the_snapshot(repo):
    commit_file(repo, "a.txt", "a")
    commit_file(repo, "b.txt", "b")
    (repo / "b.txt").unlink()
    sha = snapshot_commit(repo, "snap")
    assert _files(repo, sha) == ["a.txt"]


def test_repository_without_commits(repo):
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "notes.txt").write_text("x\n")
    sha = snapshot_commit(repo, "first")
    assert git(repo, "rev-list", "--count", sha) == "1"
    assert _files(repo, sha) == ["dvc.yaml"]
    assert git(repo, "status", "--porcelain").split("\n") == ["?? dvc.yaml", "?? notes.txt"]


def test_a_machine_without_git_identity_still_gets_snapshots(tmp_path, monkeypatch):
    from loraline.registry.snapshot import ensure_git_identity

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
    (repo / "dvc.yaml").write_text("stages: {}\n")
    ensure_git_identity(repo)
    sha = snapshot_commit(repo, "snapshot")
    author = subprocess.run(
        ["git", "log", "-1", "--format=%an <%ae>", sha], cwd=repo, capture_output=True, text=True
    ).stdout
    assert author.strip() == "loraline <loraline@localhost>"
