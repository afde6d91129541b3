"""Checkpoints on the project's default DVC remote (train.remote): pushed with a completion marker, ignored
without it, resumed from on another clone after a SIGKILL killed the first one, and removed once the adapter is
written; against a local-folder remote and against a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_helpers import THREADS, tiny_train

from loraline.train import remote, train_adapter

HERE = Path(__file__).parent
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def dvc_project(root: Path, remote_lines: str) -> Path:
    """A git + DVC repo at `root` whose default remote is `remote_lines`' (a .dvc/config remote section)."""
    from dvc.repo import Repo

    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True, env=GIT_ENV)
    Repo.init(str(root)).close()
    (root / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n    remote = shared\n['remote \"shared\"']\n{remote_lines}"
    )
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=GIT_ENV)
    subprocess.run(["git", "commit", "-q", "-m", "project"], cwd=root, check=True, env=GIT_ENV)
    return root


def local_remote_project(tmp_path: Path) -> tuple[Path, Path]:
    """(project, the folder its default remote is): a shared folder every clone reaches at the same path."""
    return dvc_project(tmp_path / "project", f"    url = {tmp_path / 'remote'}\n"), tmp_path / "remote"


def remote_steps(remote_dir: Path, tenant: str = "t") -> dict[int, bool]:
    """{step: complete} of the tenant's checkpoints in a local-folder remote."""
    base = remote_dir / remote.PREFIX / tenant
    steps = base.glob("*/step-*") if base.is_dir() else []
    return {int(p.name.split("-")[1]): (p / remote.MARKER).is_file() for p in steps}


def test_pushed_checkpoints_carry_their_marker_and_leave_the_adapter_as_it_was(reference, setup, tmp_path):
    project, remote_dir = local_remote_project(tmp_path)
    target = remote.Target(project, "t")
    res = train_adapter(
        tiny_train(),
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        checkpoint_remote=target,
        **setup.kwargs(),
    )
    assert res.adapter_weights.read_bytes() == reference.result.adapter_weights.read_bytes()
    assert res.record_path.read_bytes() == reference.result.record_path.read_bytes()  # remote or not: same bytes
    assert remote_steps(remote_dir) == {6: True, 9: True}  # save_every 3 over 12 steps, the last KEEP=2 kept
    pushed = remote_dir / remote.PREFIX / "t" / res.record.fingerprint / "step-00000009"
    local = tmp_path / "ck" / "step-00000009"
    assert sorted(p.name for p in pushed.iterdir()) == sorted([remote.MARKER, *(p.name for p in local.iterdir())])
    for f in local.iterdir():
        assert (pushed / f.name).read_bytes() == f.read_bytes()
    marker = json.loads((pushed / remote.MARKER).read_text())
    assert marker["step"] == 9 and marker["fingerprint"] == res.record.fingerprint
    assert set(marker["files"]) == {p.name for p in local.iterdir()}


def test_a_step_without_its_marker_or_with_a_bad_file_is_not_resumed_from(reference, setup, tmp_path):
    project, remote_dir = local_remote_project(tmp_path)
    store = remote.open_store(remote.Target(project, "t"))
    fingerprint = reference.result.record.fingerprint
    assert store.push(reference.checkpoint_dir / "step-00000006", fingerprint)
    assert store.push(reference.checkpoint_dir / "step-00000009", fingerprint)
    step9 = remote_dir / remote.PREFIX / "t" / fingerprint / "step-00000009"
    (step9 / remote.MARKER).unlink()  # what a machine that died mid-upload leaves
    shutil.copytree(step9, step9.with_name("step-00000010"))
    (step9.with_name("step-00000010") / remote.MARKER).write_text(
        json.dumps({"step": 10, "fingerprint": fingerprint, "files": {"state.json": "0" * 64}})
    )  # complete-looking, but its file is not what the marker says
    assert remote_steps(remote_dir) == {6: True, 9: False, 10: True}

    res = train_adapter(
        tiny_train(),
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        checkpoint_remote=remote.Target(project, "t"),
        **setup.kwargs(),
    )
    assert res.timing["resumed_from_step"] == 6
    assert res.adapter_weights.read_bytes() == reference.result.adapter_weights.read_bytes()
    assert res.record_path.read_bytes() == reference.result.record_path.read_bytes()
    assert not list((tmp_path / "ck").glob(".step-*"))  # the failed download left nothing behind


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads({threads})
    sys.path.insert(0, {helpers!r})
    import loraline.train.loop as loop
    import loraline.train.stage as stage
    from loraline.config import Params
    from loraline.layout import Layout

    real_step = loop.train_step
    def slow_step(run, planned):  # slow enough for the parent to kill it between two checkpoints
        time.sleep(0.25)
        return real_step(run, planned)
    loop.train_step = slow_step
    stage.run(Params.model_validate_json(Path({params!r}).read_text()), Layout(Path({root!r})), "t",
              base_dir=Path({base!r}))
    """
)


def stage_params(setup, **train_overrides):
    from loraline.config import Params

    train = tiny_train(**train_overrides).model_dump(exclude_defaults=True)
    return Params.model_validate(
        {"base": setup.base_params.model_dump(), "tenants": {"t": {"raw_dir": "data/raw/t", "train": train}}}
    )


def clone(origin: Path, dest: Path, setup) -> Path:
    """Another worker's clone of the project, with the tenant's prepared dataset in place (the same inputs)."""
    from loraline.layout import Layout

    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True, env=GIT_ENV)
    shutil.copytree(setup.dataset_dir, Layout(dest).prepared_dataset_dir("t"))
    return dest


def kill_after_first_push(clone_a: Path, remote_dir: Path, params_path: Path, setup) -> None:
    script = clone_a.parent / "train_script.py"
    script.write_text(
        SCRIPT.format(
            threads=THREADS, helpers=str(HERE), params=str(params_path), root=str(clone_a), base=str(setup.base_dir)
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(remote_steps(remote_dir).values()):
            if proc.poll() is not None:
                pytest.fail(f"training ended before its first push:\n{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint on the remote within 120 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_a_run_whose_machine_died_resumes_on_another_clone_from_the_remote(reference, setup, tmp_path):
    """Clone A trains and is SIGKILLed after its first pushed checkpoint, then deleted with everything in it;
    clone B (same repo, same inputs) resumes from the remote's step and ends with the uninterrupted adapter."""
    import loraline.train.stage as stage
    from loraline.layout import Layout

    origin, remote_dir = local_remote_project(tmp_path)
    params = stage_params(setup)
    params_path = tmp_path / "params.json"
    params_path.write_text(params.model_dump_json())
    clone_a = clone(origin, tmp_path / "machine-a" / "project", setup)
    kill_after_first_push(clone_a, remote_dir, params_path, setup)
    assert not Layout(clone_a).adapter_dir("t").exists()  # it really died before finishing
    pushed = max(step for step, complete in remote_steps(remote_dir).items() if complete)
    assert pushed < 12
    shutil.rmtree(tmp_path / "machine-a")  # the machine is gone, its local checkpoints with it

    clone_b = clone(origin, tmp_path / "machine-b" / "project", setup)
    res = stage.run(params, Layout(clone_b), "t", base_dir=setup.base_dir)
    assert res.timing["resumed_from_step"] == pushed
    timing = json.loads(Layout(clone_b).timing_path("train", "t").read_text())
    assert timing["resumed_from_step"] == pushed
    assert res.adapter_weights.read_bytes() == reference.result.adapter_weights.read_bytes()
    assert res.record.files == reference.result.record.files
    assert remote_steps(remote_dir) == {}  # the adapter is written: the tenant's remote checkpoints are gone
    assert not (remote_dir / remote.PREFIX / "t").exists()
    assert not Layout(clone_b).checkpoint_dir("t").exists()


def test_a_start_removes_the_tenants_remote_checkpoints_of_other_runs(reference, setup, tmp_path):
    project, remote_dir = local_remote_project(tmp_path)
    store = remote.open_store(remote.Target(project, "t"))
    assert store.push(reference.checkpoint_dir / "step-00000009", "0" * 64)  # a run with other params
    other = remote.open_store(remote.Target(project, "other-tenant"))
    assert other.push(reference.checkpoint_dir / "step-00000009", "0" * 64)
    res = train_adapter(
        tiny_train(max_steps=2, save_every=100),
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        checkpoint_remote=remote.Target(project, "t"),
        **setup.kwargs(),
    )
    assert res.timing["resumed_from_step"] is None
    assert not (remote_dir / remote.PREFIX / "t" / ("0" * 64)).exists()
    assert remote_steps(remote_dir, "other-tenant") == {9: True}  # another tenant's run is not this one's business


def test_checkpoint_remote_off_keeps_checkpoints_local_and_out_of_the_record(setup, tmp_path, monkeypatch):
    import loraline.train.stage as stage
    from loraline.layout import Layout

    origin, remote_dir = local_remote_project(tmp_path)
    project = clone(origin, tmp_path / "machine" / "project", setup)
    params = stage_params(setup, checkpoint_remote=False, max_steps=4, save_every=2)
    handed = []
    real = stage.train_adapter

    def spy(*args, **kwargs):
        handed.append(kwargs["checkpoint_remote"])
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "train_adapter", spy)
    res = stage.run(params, Layout(project), "t", base_dir=setup.base_dir)
    assert handed == [None] and not (remote_dir / remote.PREFIX).exists()
    assert "checkpoint_remote" not in res.record.params and res.record.params["max_steps"] == 4


def test_without_a_dvc_remote_there_is_no_store(tmp_path):
    from dvc.repo import Repo

    assert remote.open_store(remote.Target(tmp_path, "t")) is None  # no DVC repo
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=GIT_ENV)
    Repo.init(str(tmp_path)).close()
    assert remote.open_store(remote.Target(tmp_path, "t")) is None  # a DVC repo without a default remote
    assert tiny_train(checkpoint_remote=False).model_dump(mode="json")["checkpoint_remote"] is False
    assert "checkpoint_remote" not in tiny_train().model_dump(mode="json")  # its default changes no dump


def test_a_failing_push_warns_with_the_remote_and_step_and_training_goes_on(reference, setup, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote's folder would be\n")
    project = dvc_project(tmp_path / "project", f"    url = {blocker / 'remote'}\n")
    with caplog.at_level("WARNING", logger="loraline.train.remote"):
        res = train_adapter(
            tiny_train(),
            out_dir=tmp_path / "out",
            checkpoint_dir=tmp_path / "ck",
            checkpoint_remote=remote.Target(project, "t"),
            **setup.kwargs(),
        )
    assert res.adapter_weights.read_bytes() == reference.result.adapter_weights.read_bytes()
    warnings = [r.getMessage() for r in caplog.records if "was not pushed" in r.getMessage()]
    assert len(warnings) == 3, warnings  # steps 3, 6 and 9
    assert warnings[0].startswith(f"checkpoint step 3 was not pushed to DVC remote shared ({blocker / 'remote'})")


@pytest.fixture
def s3_remote(tmp_path, monkeypatch):
    """(project, boto3 client, bucket): a DVC project whose default remote is s3://<bucket>/project on moto's S3
    server at 127.0.0.1 (a real S3 API over HTTP, reached through dvc-s3 as any S3 remote is)."""
    pytest.importorskip("moto.moto_server.threaded_moto_server", reason="moto[server] is not installed (dev extra)")
    pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed (dev extra): DVC cannot reach S3 remotes")
    import boto3
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="ckpt")
        project = dvc_project(
            tmp_path / "project",
            f"    url = s3://ckpt/project\n    endpointurl = {endpoint}\n    region = us-east-1\n"
            "    access_key_id = testing\n    secret_access_key = testing\n",
        )
        yield project, s3, "ckpt"
    finally:
        server.stop()


def s3_keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_an_s3_remote_gets_the_pushes_gives_the_resume_and_is_cleaned(reference, setup, tmp_path, s3_remote):
    project, s3, bucket = s3_remote
    target = remote.Target(project, "t")
    first = train_adapter(
        tiny_train(),
        out_dir=tmp_path / "a",
        checkpoint_dir=tmp_path / "ck-a",
        checkpoint_remote=target,
        **setup.kwargs(),
    )
    prefix = f"project/{remote.PREFIX}/t/{first.record.fingerprint}"
    keys = s3_keys(s3, bucket)
    assert f"{prefix}/step-00000009/{remote.MARKER}" in keys and f"{prefix}/step-00000006/{remote.MARKER}" in keys
    assert f"{prefix}/step-00000009/optimizer.safetensors" in keys and not any("step-00000003" in k for k in keys)

    resumed = train_adapter(  # another machine: nothing local, the S3 remote's step 9
        tiny_train(),
        out_dir=tmp_path / "b",
        checkpoint_dir=tmp_path / "ck-b",
        checkpoint_remote=target,
        **setup.kwargs(),
    )
    assert resumed.timing["resumed_from_step"] == 9
    assert resumed.adapter_weights.read_bytes() == reference.result.adapter_weights.read_bytes()

    remote.open_store(target).remove_all()  # what the stage does once the adapter is written
    assert s3_keys(s3, bucket) == []
