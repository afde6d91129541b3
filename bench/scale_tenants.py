"""How the cost that is not training grows with tenants and registry versions (issue 42, part 4).

Three sections, each a set of JSON lines (one per measurement) and one markdown table printed last.

**Tenants** (`--tenants N`, repeatable): a project folder holding the repository's files (as
tests/e2e/e2e_project.make_tiny_project copies them) with N generated tiny tenants `t0000`, `t0001`, ...:
params.yaml's `tenants` lists each with its own raw folder (a 30-row slice of acme-shop's email export and
one of its .md documents, about 20 KB), dvc.yaml's `artifacts:` declares each tenant's adapter and onnx
artifacts (DVC cannot template that section, so it grows by hand), `loraline pipelines` renders each
tenant's pipelines/<t>/dvc.yaml, and the dvc.lock files are *synthesized*: the repository's committed root
dvc.lock, and acme-shop's (a real run) copied to each tenant's pipelines/<t>/dvc.lock under its name (sizes
exact but for name lengths; hashes are acme-shop's, so DVC finds every tenant's raw data changed, which makes
`dvc status` hash it all, as a real status must). Stages do not run but one: running 8,000 stage processes
on 2 cores is not the point. Measured: the files' sizes; `dvc status`, `dvc stage list -R .` and, as
subprocesses of the kind the Prefect flow starts per stage (8 per tenant), `dvc repro --dry --single-item`
of documents@t0000 and a real run of it (which rewrites its dvc.lock, as every stage run does); and in a
child process each piece of what `loraline run` does before its
first stage (cli/main.py cmd_run: `load_params`, `check_cache(incremental=True)`, `plan_stages`, then
`_every_stage_up_to_date`'s `dvc_status` of the planned stages; `loraline run` has no dry-run flag).

**Registry** (`--tags K`, repeatable): a git repository with K GTO tags written with `git fast-import`
in loraline's format (gto_registry.py): tenants `t0000`... each with 25 versions of `<t>-adapter` and
`<t>-onnx` (annotated `<artifact>@v0.0.J`, message `version_message(...)` with a small lineage), each version
promoted (`<artifact>#prod#J`, message as release.py writes it), one snapshot commit per version number,
tag times one second apart. Tenants = max(1, K / 100), so 100,000 tags are 1,000 tenants x 25 versions.
Each operation runs in a child process (imports excluded from its time) and reports how many times it
read the registry: GTO's whole state (`registry_reads`: `GitRegistry.get_state`, every tag; GTO's writes
make them), and gto_tags' reads of every tag (`tag_reads`) or of one artifact's (`artifact_reads`).
Operations: `gto show` (gto's api.show, one state), `loraline registry list` and `show t0000`
(cli/registry.py), a release of t0000 (release.py's registry calls: latest, next version, register both
artifacts, production, promote together) and the serving poll (serve/versions.py `production_versions`
over every tenant): a process's first (`serving poll`: every tag parsed), one more with nothing changed
(`serving poll again`, after a first one and the watcher's interval), and one after another tenant released a
version (`serving poll after a promotion`: four new tags). fast-import leaves every tag a loose ref, as
`git tag` and GTO do until something packs them; `--pack-refs` packs them after building (rows say `refs`).

**Remote** (`--remote`): one tiny tenant through the real pipeline (make_tiny_project's tiny base and
training, acme-shop alone), `dvc push` to a local remote, then one raw row appended and the pipeline
again: the remote's bytes per tenant version (the first, and what a second version adds), by output.

Each measurement has a time limit (`--timeout`, default 90 s): a measurement past it is a row with
`timeout: true` and the limit as its figure, never a crash; one that timed out at a smaller size is not run at
the larger ones (the same row, with `skipped: true`).

    python bench/scale_tenants.py --tenants 10 --tenants 100 --tenants 1000 \\
        --tags 10 --tags 100 --tags 1000 --tags 10000 --tags 100000 --remote \\
        --out bench/results/scale_tenants-2026-12-07-cpu.jsonl
    python bench/scale_tenants.py --tenants 2 --tags 10          (a few seconds: tests/unit/bench)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))  # loraline from this checkout, as the child processes get it

from loraline.dvcfiles import read_lock, sync_pipelines  # noqa: E402
from loraline.flows.orchestrate import plan_stages  # noqa: E402
from loraline.layout import dvc_target, tenant_dvc_file  # noqa: E402

SAMPLE = "acme-shop"
VERSIONS_PER_ARTIFACT = 25
TAGS_PER_TENANT = 4 * VERSIONS_PER_ARTIFACT  # adapter + onnx, each registered and promoted per version
READ_COUNTS = ("registry_reads", "tag_reads", "artifact_reads", "tag_parses")  # see counting_reads
POLL_OPS = ("serving poll", "serving poll again", "serving poll after a promotion")
T0 = 1_700_000_000  # the tags' times: fixed, so two runs build the same repository


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return child(argv[1:])
    args = parse_args(argv)
    bench = Bench(args)
    try:
        for n in args.tenants or []:
            bench.tenants(n)
        for k in args.tags or []:
            bench.registry(k)
        if args.remote:
            bench.remote()
    finally:
        print(render_table(bench.rows), flush=True)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tenants", type=int, action="append", help="generated tenants in a project, repeatable")
    ap.add_argument("--tags", type=int, action="append", help="GTO tags in a registry, repeatable")
    ap.add_argument("--pack-refs", action="store_true", help="registry: `git pack-refs --all` after building")
    ap.add_argument("--remote", action="store_true", help="also run one tiny tenant for real (a few minutes)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds one measurement may take")
    ap.add_argument("--op", action="append", help="only these measurements (e.g. plan_stages), repeatable")
    ap.add_argument("--root", type=Path, default=Path("/tmp/scale_tenants"), help="working folder")
    ap.add_argument("--out", type=Path, default=None, help="jsonl file the rows are appended to")
    args = ap.parse_args(argv)
    args.root = args.root.resolve()
    return args


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.rows = args, []
        self.run = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.facts = {"commit": _git_commit(), "cpus": os.cpu_count(), "dvc": _version("dvc"), "gto": _version("gto")}
        args.root.mkdir(parents=True, exist_ok=True)

    def record(self, row: dict[str, Any]) -> None:
        row = {"run": self.run, **self.facts, **row}
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("run", *self.facts)}
        print(json.dumps(shown), flush=True)
        if self.args.out:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            with self.args.out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    # -- tenants ----------------------------------------------------------------------------------

    def tenants(self, n: int) -> None:
        project = self.args.root / f"tenants-{n}"
        started = time.perf_counter()
        make_tenant_project(project, n)
        self.record(dict(kind="build", section="tenants", n=n, wall_s=round(time.perf_counter() - started, 2)))
        files = ("params.yaml", "dvc.yaml", "dvc.lock", tenant_dvc_file("t0000"), tenant_dvc_file("t0000", "dvc.lock"))
        sizes = {name: (project / name).stat().st_size for name in files}
        sizes["pipelines/ (every tenant)"] = sum(p.stat().st_size for p in (project / "pipelines").rglob("*"))
        self.record(dict(kind="size", section="tenants", n=n, bytes=sizes, dvc_lock="synthesized"))
        dvc = str(Path(sys.executable).with_name("dvc"))
        # processes of the kind the flow starts per stage (8 per tenant); documents@: its deps exist here
        target = dvc_target("documents@t0000")
        # the flow's shared stages, every tenant's documents and the base, in one process (run_stage_group)
        shared = [dvc_target(s) for s in plan_stages(project, names_of(project)).shared]
        commands = {
            "dvc stage list -R .": [dvc, "stage", "list", "-R", "."],
            "dvc status": [dvc, "status"],
            "dvc repro --dry --single-item documents@t0000": [dvc, "repro", "--dry", "--single-item", target],
            "dvc repro --single-item documents@t0000 (runs, writes its lock)": [dvc, "repro", "--single-item", target],
            "dvc repro --dry --single-item <every documents@, base> (one process)": [
                dvc,
                "repro",
                "--dry",
                "--single-item",
                *shared,
            ],
        }
        for op, cmd in commands.items():
            if not self.skipped("tenants", op, n):
                self.record(dict(kind="op", section="tenants", n=n, op=op, **timed_process(cmd, project, self.limit)))
        for op in PLANNING:
            if not self.skipped("tenants", op, n):
                for row in run_child(["planning", str(project), op], project, self.limit):
                    self.record(dict(kind="op", section="tenants", n=n, **row))

    @property
    def limit(self) -> float:
        return self.args.timeout

    def skipped(self, section: str, op: str, size: int, **facts: Any) -> bool:
        """An operation that timed out at a smaller size is not run again (it only grows): recorded as a timeout.
        One that --op leaves out is not run and not recorded."""
        if self.args.op and op not in self.args.op:
            return True
        key = "n" if section == "tenants" else "tags"
        if not any(r.get("timeout") and r["section"] == section and r.get("op") == op for r in self.rows):
            return False
        row = dict(kind="op", section=section, op=op, wall_s=self.limit, timeout=True, skipped=True, **facts)
        self.record({**row, key: size})
        return True

    # -- registry ---------------------------------------------------------------------------------

    def registry(self, k: int) -> None:
        repo = self.args.root / f"registry-{k}"
        started = time.perf_counter()
        tenants, tags = make_registry(repo, k)
        refs = "packed" if self.args.pack_refs else "loose"  # fast-import leaves every tag a loose ref
        if self.args.pack_refs:
            _sh(["git", "pack-refs", "--all"], repo)
        facts = dict(tags=tags, tenants=tenants, refs=refs)
        self.record(dict(kind="build", section="registry", **facts, wall_s=round(time.perf_counter() - started, 2)))
        for op in ("gto show", "registry list", "registry show", "release+promote", *POLL_OPS):
            if not self.skipped("registry", op, tags, tenants=tenants, refs=refs):
                for row in run_child(["registry", str(repo), op], repo, self.limit):
                    self.record(dict(kind="op", section="registry", **facts, **row))

    # -- remote -----------------------------------------------------------------------------------

    def remote(self) -> None:
        for row in remote_sizes(self.args.root / "remote", self.limit * 4):
            self.record(dict(kind="remote", section="remote", **row))


# ---- the tenants' project ------------------------------------------------------------------------


def make_tenant_project(project: Path, n: int) -> None:
    """The repository's files with `n` generated tiny tenants (see the module docstring); git-committed."""
    if project.exists():
        shutil.rmtree(project)
    for rel in _repo_files():
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/raw/", "bench/", "docs/", "tests/")):
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / rel)
    rows = (REPO / "data/raw" / SAMPLE / "orders_email_2024q1.jsonl").read_bytes().splitlines(keepends=True)[:30]
    document = (REPO / "data/raw" / SAMPLE / "returns_policy.md").read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    names = [f"t{i:04d}" for i in range(n)]
    for name in names:
        raw = project / "data" / "raw" / name
        raw.mkdir(parents=True)
        (raw / "orders.jsonl").write_bytes(b"".join(rows))
        (raw / "policy.md").write_bytes(document)
    params["tenants"] = {name: {"raw_dir": f"data/raw/{name}"} for name in names}
    dvc_yaml["artifacts"] = {
        f"{name}-{kind}": {"path": f"models/{folder}/{name}", "type": "model", "labels": [kind, name]}
        for name in names
        for kind, folder in (("adapter", "adapters"), ("onnx", "onnx"))
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    sync_pipelines(project, names)
    write_synthesized_locks(project, names)
    _sh(["git", "init", "-q"], project)
    _sh(["git", "add", "-A"], project)
    _sh(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "scale fixture"], project)


def names_of(project: Path) -> list[str]:
    return list(yaml.safe_load((project / "params.yaml").read_text())["tenants"])


def write_synthesized_locks(project: Path, names: list[str]) -> None:
    """The repository's root dvc.lock, and the sample tenant's dvc.lock once per name under its name."""
    shutil.copy2(REPO / "dvc.lock", project / "dvc.lock")
    sample = (REPO / tenant_dvc_file(SAMPLE, "dvc.lock")).read_text()
    for name in names:
        text = sample.replace(f"/{SAMPLE}", f"/{name}").replace(f"tenants.{SAMPLE}", f"tenants.{name}")
        (project / tenant_dvc_file(name, "dvc.lock")).write_text(text.replace(f"@{SAMPLE}", f"@{name}"))


# ---- the registry --------------------------------------------------------------------------------


def make_registry(repo: Path, k: int) -> tuple[int, int]:
    """A git repository with about `k` GTO tags in loraline's format: (tenants, tags written)."""
    from loraline.registry.gto_registry import version_message

    if repo.exists():
        shutil.rmtree(repo)
    _sh(["git", "init", "-q", str(repo)], repo.parent)
    tenants = max(1, k // TAGS_PER_TENANT)
    versions = max(1, min(VERSIONS_PER_ARTIFACT, k // (4 * tenants)))
    stream, written, when = [], 0, T0 + 10_000
    for j in range(versions):  # one snapshot commit per version number (a version's promotion finds it by commit)
        parent = f"from :{j}\n" if j else ""
        stream.append(
            f"commit refs/heads/main\nmark :{j + 1}\ncommitter b <b@b> {T0 + j} +0000\n{_data(f'snapshot {j}')}"
            f"{parent}M 644 inline README\n{_data(f'version {j + 1}')}"
        )
    for i in range(tenants):
        tenant = f"t{i:04d}"
        for j in range(versions):
            version, lineage = f"v0.0.{j + 1}", {"tenant": tenant, "outputs": {"adapter": f"{i:08x}{j:024x}"}}
            for action in ("register", "promote"):
                for name in (f"{tenant}-adapter", f"{tenant}-onnx"):
                    if action == "register":
                        tag, message = f"{name}@{version}", version_message(name, version, "0" * 40, lineage)
                    else:
                        was = f"v0.0.{j}" if j else "none"
                        tag = f"{name}#prod#{j + 1}"
                        message = f"Promote {name} {version} to prod (loraline release, gate passed; was {was})"
                    stream.append(f"tag {tag}\nfrom :{j + 1}\ntagger b <b@b> {when} +0000\n{_data(message)}")
                    written += 1
                when += 1  # GTO orders by tag time (one-second resolution): promotions never share a second
    subprocess.run(["git", "fast-import", "--quiet"], cwd=repo, input="".join(stream).encode(), check=True)
    _sh(["git", "checkout", "-q", "main"], repo)
    return tenants, written


def _data(text: str) -> str:
    raw = text.encode()
    return f"data {len(raw)}\n{text}\n"


# ---- child processes: one measurement each, imports outside the timed part ----------------------


def run_child(argv: list[str], cwd: Path, limit: float) -> list[dict[str, Any]]:
    """Run `_child argv` in `cwd` (limited to `limit` s); its rows, or one row saying it timed out or failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        rows = [json.loads(line) for line in (exc.stdout or b"").decode().splitlines() if line.startswith("{")]
        return [*rows, dict(op=argv[-1], wall_s=round(limit, 1), timeout=True)]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode:
        rows.append(dict(op=argv[-1], rc=done.returncode, error=done.stderr[-2000:]))
    elif not rows:
        rows.append(dict(op=argv[-1], wall_s=round(time.perf_counter() - started, 2), note="no rows"))
    return rows


def child(argv: list[str]) -> int:
    what, *rest = argv
    {"planning": child_planning, "registry": child_registry}[what](*rest)
    return 0


def _emit(op: str, started: float, **extra: Any) -> None:
    print(json.dumps(dict(op=op, wall_s=round(time.perf_counter() - started, 3), **extra)), flush=True)


# What `loraline run` does before its first stage (cli/main.py cmd_run and _every_stage_up_to_date), one child each.
PLANNING = ("load_params", "check_cache(incremental)", "plan_stages", "plan_stages + dvc_status")


def child_planning(project: str, op: str) -> None:
    from loraline.config import load_params
    from loraline.flows.cache import check_cache
    from loraline.flows.orchestrate import plan_stages
    from loraline.registry.consistency import dvc_status

    root = Path(project)
    params = load_params(root / "params.yaml")
    started = time.perf_counter()
    if op == "load_params":
        load_params(root / "params.yaml")
        _emit(op, started)
    elif op == "check_cache(incremental)":
        check = check_cache(root, incremental=True)
        _emit(op, started, missing=check.missing)
    elif op == "plan_stages":
        _emit(op, started, stages=len(plan_stages(root, params.tenant_names).all))
    else:  # _every_stage_up_to_date: its own plan, then DVC's status of the planned stages
        stale, checked = dvc_status(root, plan_stages(root, params.tenant_names).all)
        _emit(op, started, stale=len(stale), stages=len(checked))


@contextlib.contextmanager
def counting_reads() -> Iterator[dict[str, int]]:
    """Counts, while inside, GTO's whole-registry reads (`registry_reads`: GitRegistry.get_state reads every tag;
    gto.api's writes make them too), loraline's reads of every artifact (`tag_reads`, gto_poll.read_whole) and of
    one artifact's tags (`artifact_reads`, gto_tags.read_artifact: reads and writes), and the tags gto_tags
    parsed (`tag_parses`: gto_poll parses only new or changed ones)."""
    from gto.registry import GitRegistry

    from loraline.registry import gto_poll, gto_tags

    count = dict.fromkeys(READ_COUNTS, 0)
    wrapped = [
        (GitRegistry, "get_state", "registry_reads"),
        (gto_poll, "read_whole", "tag_reads"),
        (gto_tags, "read_artifact", "artifact_reads"),
        (gto_tags, "_parse_tag", "tag_parses"),
    ]
    originals = [getattr(owner, attr) for owner, attr, _ in wrapped]

    def counted(real, key):
        def call(*a, **kw):
            count[key] += 1
            return real(*a, **kw)

        return call

    for (owner, attr, key), real in zip(wrapped, originals, strict=True):
        setattr(owner, attr, counted(real, key))
    try:
        yield count
    finally:
        for (owner, attr, _), real in zip(wrapped, originals, strict=True):
            setattr(owner, attr, real)


def child_registry(repo: str, op: str) -> None:
    import gto.api  # noqa: F401 - imported before the clock starts, as a long-lived process has it

    from loraline.registry.gto_poll import TRUST_S, forget
    from loraline.registry.gto_registry import GtoRegistry
    from loraline.serve.versions import production_versions

    root = Path(repo)
    registry = GtoRegistry(root)
    with counting_reads() as reads, contextlib.redirect_stdout(sys.stderr):
        started = time.perf_counter()
        if op == "gto show":
            extra = {"artifacts": len(gto.api.show(str(root)))}
        elif op in ("registry list", "registry show"):
            extra = _cli_registry(root, ["list"] if op == "registry list" else ["show", "t0000"])
        elif op in ("release+promote", "release t0001"):
            extra = _release_one(registry, "t0000" if op == "release+promote" else "t0001", _snapshot(root))
        else:  # serving's tenants come from params.yaml, not the registry
            tenants = sorted({name.rsplit("-", 1)[0] for name in registry.artifacts()})
            forget()  # that read is not the watcher's: the first poll starts from nothing
            if op != "serving poll":  # a poll before (not timed), as the watcher made one a few seconds ago
                production_versions(root, tenants)
                time.sleep(TRUST_S + 0.5)  # as poll_seconds (5 s) passes: the refs store's stats are trusted
            if op == "serving poll after a promotion":  # meanwhile the flow releases t0001 (its process, not timed)
                subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "_child", "registry", repo, "release t0001"],
                    check=True,
                    capture_output=True,
                )
            reads.update(dict.fromkeys(reads, 0))
            started = time.perf_counter()
            extra = {"served": len(production_versions(root, tenants))}
        seconds = time.perf_counter() - started
    print(json.dumps(dict(op=op, wall_s=round(seconds, 3), **reads, **extra)), flush=True)


def _cli_registry(root: Path, argv: list[str]) -> dict[str, Any]:
    from loraline.cli.main import main as loraline

    cwd = Path.cwd()
    os.chdir(root)
    try:
        return {"rc": loraline(["registry", *argv, "--json"])}
    finally:
        os.chdir(cwd)


def _snapshot(root: Path) -> str:
    """A new dangling commit on HEAD's tree, as release.py's snapshot_commit makes one per version (not timed)."""
    return _sh(
        [
            "git",
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@b",
            "commit-tree",
            "HEAD^{tree}",
            "-p",
            "HEAD",
            "-m",
            "snapshot",
        ],
        root,
    ).strip()


def _release_one(registry: Any, tenant: str, commit: str) -> dict[str, Any]:
    """release.py's registry calls for one tenant's new version, in its order (release_tenant, _register,
    _promote_together), without the DVC checks, snapshot and lineage that are not the registry's."""
    from loraline.config import load_params
    from loraline.release import _next_version, _promote_together

    params = load_params(REPO / "params.yaml")
    names = [f"{tenant}-adapter", f"{tenant}-onnx"]
    with registry.reading():  # as release_tenant reads
        registry.latest(names[0])  # _register: is the latest version this candidate?
        version = _next_version(registry, names)
        for name in names:
            registry.register(name, commit, {"tenant": tenant}, version=version)
        current = {n: registry.production(n) for n in names}  # release_tenant: production before
        was = {n: current[n].version if current[n] else None for n in names}
        _promote_together(params, registry, version, was)
    return {"version": version}


# ---- the remote ----------------------------------------------------------------------------------


def remote_sizes(root: Path, limit: float) -> Iterator[dict[str, Any]]:
    """One tiny tenant's first version and a second one (a raw row appended): the bytes each adds to the remote."""
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from e2e_project import make_tiny_project

    if root.exists():
        shutil.rmtree(root)
    project = make_tiny_project(_mkdir(root / "project"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tenants"] = {SAMPLE: params["tenants"][SAMPLE]}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", "one tenant"], project)
    dvc = str(Path(sys.executable).with_name("dvc"))
    before: set[str] = set()
    for version in (1, 2):
        if version == 2:  # one new email: a new row in the raw file (its other bytes are the sample's, not UTF-8)
            raw = project / "data/raw" / SAMPLE / "orders_email_2024q1.jsonl"
            row = json.loads(raw.read_bytes().splitlines()[0])
            row["input"] += "\n\nP.S. The second version's row."
            raw.write_bytes(raw.read_bytes() + json.dumps(row).encode() + b"\n")
        run = timed_process([dvc, "repro", "--all-pipelines"], project, limit)
        push = timed_process([dvc, "push"], project, limit)
        files = _remote_files(project / ".dvc-remote")  # .dvc/config: url ../.dvc-remote, from .dvc/
        added = {p: s for p, s in files.items() if p not in before}
        yield dict(
            op=f"tenant version {version}",
            repro_s=run.get("wall_s"),
            push_s=push.get("wall_s"),
            timeout=run.get("timeout") or push.get("timeout") or None,
            error=run.get("error") or push.get("error"),
            remote_files_added=len(added),
            remote_bytes_added=sum(added.values()),
            bytes_by_output=_bytes_by_output(project, added),
        )
        before = set(files)


def _bytes_by_output(project: Path, added: dict[str, int]) -> dict[str, int]:
    """The added remote bytes attributed to dvc.lock's outputs (a file shared by two outputs counts once)."""
    lock = read_lock(project)
    remote = project / ".dvc-remote"
    out, seen = {}, set()
    for entry in lock.values():
        for o in entry.get("outs") or []:
            oids = [o["md5"]]
            if o["md5"].endswith(".dir"):
                manifest = remote / "files/md5" / o["md5"][:2] / o["md5"][2:]
                if manifest.is_file():
                    oids += [e["md5"] for e in json.loads(manifest.read_text())]
            total = 0
            for oid in oids:
                rel = f"files/md5/{oid[:2]}/{oid[2:]}"
                if rel in added and rel not in seen:
                    seen.add(rel)
                    total += added[rel]
            if total:
                out[o["path"]] = total
    return out


def _remote_files(remote: Path) -> dict[str, int]:
    if not remote.is_dir():
        return {}
    return {p.relative_to(remote).as_posix(): p.stat().st_size for p in remote.rglob("*") if p.is_file()}


# ---- helpers -------------------------------------------------------------------------------------


def timed_process(cmd: list[str], cwd: Path, limit: float) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return dict(wall_s=round(limit, 1), timeout=True)
    row: dict[str, Any] = dict(wall_s=round(time.perf_counter() - started, 2), rc=done.returncode)
    if done.returncode:
        row["error"] = (done.stdout + done.stderr)[-1500:]
    return row


def _repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True
    )
    return [f for f in out.stdout.decode().split("\0") if f]


def _sh(cmd: list[str], cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git_commit() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- the table -----------------------------------------------------------------------------------


def render_table(rows: list[dict[str, Any]]) -> str:
    """One line per measurement: its figure, and per tenant (tenants section) or per tag (registry)."""
    lines = ["", "| section | size | measurement | wall s | per unit | notes |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        if r["kind"] == "size":
            sizes = ", ".join(f"{k} {_human(v)} ({v / r['n']:.0f} B/tenant)" for k, v in r["bytes"].items())
            lines.append(f"| tenants | N={r['n']} | file sizes | | | {sizes} (dvc.lock {r['dvc_lock']}) |")
        elif r["kind"] == "op":
            size = f"N={r['n']}" if r["section"] == "tenants" else f"{r['tags']} tags, {r['tenants']} tenants"
            units = r["n"] if r["section"] == "tenants" else r["tenants"]
            wall = f">{r['wall_s']:.0f} (timeout)" if r.get("timeout") else f"{r.get('wall_s', float('nan')):.2f}"
            per = "" if r.get("timeout") or "wall_s" not in r else f"{r['wall_s'] / units * 1000:.1f} ms/tenant"
            notes = ", ".join(
                f"{k} {r[k]}" for k in (*READ_COUNTS, "stages", "stale", "served", "version", "rc") if k in r
            )
            notes += f" ERROR {r['error'][-200:]!r}" if r.get("error") else ""
            lines.append(f"| {r['section']} | {size} | {r['op']} | {wall} | {per} | {notes} |")
        elif r["kind"] == "remote":
            outputs = ", ".join(f"{k} {_human(v)}" for k, v in sorted(r["bytes_by_output"].items()))
            lines.append(
                f"| remote | 1 tenant | {r['op']}: {_human(r['remote_bytes_added'])} in {r['remote_files_added']} "
                f"files | {r['repro_s']} | | push {r['push_s']} s; {outputs} |"
            )
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
