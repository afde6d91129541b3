"""loraline.flows.orchestrate against real DVC projects: stage order, skip/run, failures and timeouts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from dvc_layout import write_dvc_files

from loraline.dvcfiles import read_lock
from loraline.flows.orchestrate import StageFailed, StageTimeout, plan_stages, run_stage
from loraline.tools import tool, tool_env

REPO = Path(__file__).resolve().parents[3]


def test_plan_follows_dvc_graph_of_the_repository():
    plan = plan_stages(REPO, ["globex-it"])
    # the base is built from data/documents: a run for one tenant refreshes that tenant's documents, not every one's
    assert plan.shared == ["documents@globex-it", "base"]
    assert plan.per_tenant == {
        "globex-it": [
            f"{s}@globex-it" for s in ("synthesize", "prepare", "train", "merge", "export", "evaluate", "gate")
        ]
    }
    both = plan_stages(REPO, ["acme-shop", "globex-it"])
    assert both.all.index("base") < both.all.index("prepare@acme-shop")
    assert not any("globex" in s for s in both.per_tenant["acme-shop"])


def _dvc_graph_plan(root: Path, tenants: list[str]) -> tuple[set[str], dict[str, list[str]], set[tuple[str, str]]]:
    """From DVC's graph of the whole repository: (the shared stages: what the tenants' stages need that is not
    theirs, and what that needs), each tenant's own stages in a dependency order, and every (stage, stage it
    depends on) edge among them."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        by_name = {stage.name: stage for stage in graph.nodes}
        order = [s.name for s in nx.lexicographical_topological_sort(graph.reverse(), key=lambda s: s.name)]
        owner = {n: n.partition("@")[2] or None for n in by_name}
        wanted = {n for n in by_name if owner[n] in tenants}
        needed = set(wanted).union(*({s.name for s in nx.descendants(graph, by_name[n])} for n in wanted))
        shared = needed - wanted
        shared |= set().union(*({s.name for s in nx.descendants(graph, by_name[n])} for n in list(shared)))
        edges = {(a.name, b.name) for a, b in graph.edges}
    per_tenant = {t: [n for n in order if n in wanted - shared and owner[n] == t] for t in tenants}
    return shared, per_tenant, edges


@pytest.mark.parametrize("tenants", [["acme-shop"], ["globex-it", "acme-shop"]])
def test_plan_is_what_dvcs_graph_gives(tenants):
    """plan_stages plans from the stage names (DVC's graph would parse every tenant's dvc.yaml): the same stages,
    and every stage after the stages it depends on."""
    plan = plan_stages(REPO, tenants)
    shared, per_tenant, edges = _dvc_graph_plan(REPO, tenants)
    # DVC's graph: the base needs every tenant's documents; the plan refreshes the chosen tenants' only
    assert set(plan.shared) == {s for s in shared if s.partition("@")[2] in ("", *tenants)}
    assert list(plan.per_tenant) == tenants
    assert {t: set(stages) for t, stages in plan.per_tenant.items()} == {t: set(s) for t, s in per_tenant.items()}
    position = {name: i for i, name in enumerate(plan.all)}
    for stage, dependency in edges:
        if stage in position and dependency in position:
            assert position[dependency] < position[stage], (stage, dependency)


def test_plan_rejects_unknown_tenant():
    with pytest.raises(ValueError, match="no stages for tenant.*nobody"):
        plan_stages(REPO, ["nobody"])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([tool("dvc"), "init", "-q"], cwd=tmp_path, env=tool_env(), check=True)
    (tmp_path / "in.txt").write_text("hello\n")
    # `name@t1` addresses come from foreach, as in the real dvc.yaml
    stages = {
        "copy": {
            "cmd": "python -c \"import shutil; shutil.copy('in.txt', 'out.txt')\"",
            "deps": ["in.txt"],
            "outs": ["out.txt"],
        },
        "fail": {
            "cmd": "python -c \"import sys; print('line one'); "
            "print('bad row 7: field x', file=sys.stderr); sys.exit(3)\"",
            "deps": ["out.txt"],
            "outs": ["never.txt"],
        },
        "slow": {
            "cmd": "python -c \"import time; print('started', flush=True); time.sleep(60)\"",
            "outs": ["slow.txt"],
        },
    }
    stages = {name: {"foreach": ["t1"], "do": body} for name, body in stages.items()}
    write_dvc_files(tmp_path, {"stages": stages})
    return tmp_path


def test_run_stage_runs_then_skips(project: Path):
    first = run_stage(project, "copy@t1", echo=None)
    assert first.ran and (project / "out.txt").read_text() == "hello\n"
    again = run_stage(project, "copy@t1", echo=None)
    assert not again.ran
    (project / "in.txt").write_text("changed\n")
    assert run_stage(project, "copy@t1", echo=None).ran
    assert (project / "out.txt").read_text() == "changed\n"


def test_failed_stage_names_itself_and_keeps_its_output_tail(project: Path):
    run_stage(project, "copy@t1", echo=None)
    with pytest.raises(StageFailed) as info:
        run_stage(project, "fail@t1", echo=None)
    message = str(info.value)
    assert "stage fail@t1 failed" in message
    assert "bad row 7: field x" in message and "line one" in message
    assert not (project / "never.txt").exists()


def test_timeout_stops_the_stage_process_tree(project: Path):
    started = time.perf_counter()
    with pytest.raises(StageTimeout, match=r"stage slow@t1 timed out after 3s") as info:
        run_stage(project, "slow@t1", timeout_s=3, echo=None)
    assert time.perf_counter() - started < 30
    assert "started" in str(info.value)
    # nothing of the stage survives: a sleeping child would still hold DVC's lock
    assert run_stage(project, "copy@t1", echo=None).ran


# ---- tenants in parallel ----------------------------------------------------------------------


def test_device_slots_share_the_gpus_and_cpu_threads_out(monkeypatch):
    from loraline.flows.orchestrate import device_slots

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert device_slots(2, ["0", "1"], cpus=32) == [{"CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": "16"} for g in "01"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in device_slots(2, ["0", "1", "2", "3"], cpus=8)] == ["0,1", "2,3"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in device_slots(3, ["4", "7"], cpus=8)] == ["4", "7", "4"]  # round-robin
    assert device_slots(2, [], cpus=2) == [{}, {}]  # CPU: nothing pinned, so outputs match a sequential run
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device_slots(2, ["0", "1"], cpus=32)[0] == {"CUDA_VISIBLE_DEVICES": "0"}  # the user's setting stands


@pytest.fixture
def chains_project(tmp_path: Path) -> Path:
    """Two tenants, each a chain of two stages that take a second and report where they ran."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([tool("dvc"), "init", "-q"], cwd=tmp_path, env=tool_env(), check=True)
    for t in ("t1", "t2"):
        (tmp_path / f"in-{t}.txt").write_text(f"{t}\n")
    code = (
        "import os, sys, time; t0 = time.time(); time.sleep(1); src, dst = sys.argv[1:]; "
        "open(dst, 'w').write(open(src).read() + os.environ.get('CUDA_VISIBLE_DEVICES', '-') + '\\n'); "
        "open('spans.log', 'a').write(f'{dst} {t0} {time.time()}\\n')"
    )
    stages = {
        "first": {
            "foreach": ["t1", "t2"],
            "do": {
                "cmd": f'python -c "{code}" in-${{item}}.txt a-${{item}}.txt',
                "deps": ["in-${item}.txt"],
                "outs": ["a-${item}.txt"],
            },
        },
        "second": {
            "foreach": ["t1", "t2"],
            "do": {
                "cmd": f'python -c "{code}" a-${{item}}.txt b-${{item}}.txt',
                "deps": ["a-${item}.txt"],
                "outs": ["b-${item}.txt"],
            },
        },
    }
    write_dvc_files(tmp_path, {"stages": stages})
    return tmp_path


def test_two_tenants_chains_run_at_once_pinned_and_lose_no_lock_update(chains_project: Path, monkeypatch):
    from loraline.flows.orchestrate import run_chains

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    chains = {t: [f"first@{t}", f"second@{t}"] for t in ("t1", "t2")}

    def chain(tenant, stages, env):
        return [run_stage(chains_project, s, env=env, echo=None).ran for s in stages]

    results, failures = run_chains(chains_project, chains, 2, chain)
    assert not failures and results == {"t1": [True, True], "t2": [True, True]}
    assert set(read_lock(chains_project)) == {f"{s}@{t}" for s in ("first", "second") for t in ("t1", "t2")}
    pinned = {(chains_project / f"b-{t}.txt").read_text().split("\n")[1] for t in ("t1", "t2")}
    assert pinned == {"5", "6"}  # each tenant held its own GPU for its whole chain
    status = subprocess.run(
        [tool("dvc"), "status"], cwd=chains_project, env=tool_env(), capture_output=True, text=True
    )
    assert "up to date" in status.stdout, status.stdout
    spans = {}
    for line in (chains_project / "spans.log").read_text().splitlines():
        out, t0, t1 = line.split()
        spans[out] = (float(t0), float(t1))
    t1_spans = [spans[f"{s}-t1.txt"] for s in ("a", "b")]
    t2_spans = [spans[f"{s}-t2.txt"] for s in ("a", "b")]
    assert any(a0 < b1 and b0 < a1 for a0, a1 in t1_spans for b0, b1 in t2_spans), spans  # they overlapped


def test_a_failing_tenant_does_not_stop_the_other(chains_project: Path):
    from loraline.flows.orchestrate import run_chains

    (chains_project / "in-t1.txt").unlink()  # t1's first stage has no input
    results, failures = run_chains(
        chains_project,
        {t: [f"first@{t}", f"second@{t}"] for t in ("t1", "t2")},
        2,
        lambda tenant, stages, env: [run_stage(chains_project, s, env=env, echo=None).ran for s in stages],
    )
    assert set(failures) == {"t1"} and "in-t1.txt" in str(failures["t1"])
    assert results == {"t2": [True, True]}


def test_device_slots_are_shared_with_other_processes(tmp_path: Path):
    """A second run (another process) waits for the slot the first holds, then gets it."""
    import sys

    from loraline.flows.orchestrate import DeviceSlots

    slots = DeviceSlots(tmp_path, [{"CUDA_VISIBLE_DEVICES": "0"}], poll_s=0.05)
    other = (
        "import sys, time; from loraline.flows.orchestrate import DeviceSlots\n"
        f"with DeviceSlots({str(tmp_path)!r}, [{{'CUDA_VISIBLE_DEVICES': '0'}}], poll_s=0.05).slot() as env:\n"
        "    print(time.time(), env['CUDA_VISIBLE_DEVICES'], flush=True)\n"
    )
    with slots.slot() as env:
        assert env == {"CUDA_VISIBLE_DEVICES": "0"}
        proc = subprocess.Popen([sys.executable, "-c", other], stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None  # still waiting for the slot
        released = time.time()
    out, _ = proc.communicate(timeout=30)
    got_at, gpu = out.split()
    assert gpu == "0" and float(got_at) >= released


@pytest.mark.parametrize("parallel", [1, 2])
def test_each_tenant_collects_failures_and_goes_on(parallel: int):
    from loraline.flows.orchestrate import each_tenant

    def work(tenant: str) -> str:
        if tenant == "t1":
            raise ValueError("t1 has no rows")
        return tenant.upper()

    told = []
    results, failures = each_tenant(
        ["t1", "t2", "t3"], work, parallel=parallel, on_failure=lambda t, e: told.append((t, str(e)))
    )
    assert results == {"t2": "T2", "t3": "T3"}
    assert list(failures) == ["t1"] and str(failures["t1"]) == "t1 has no rows"
    assert told == [("t1", "t1 has no rows")]


def test_a_stage_group_runs_in_one_dvc_process_and_reports_each_stage(chains_project: Path):
    """The shared stages (every tenant's documents, the base) run as one `dvc repro --single-item` process: what
    ran is told stage by stage, a second call skips them all, and a change re-runs only its stage."""
    from loraline.flows.orchestrate import run_stage_group

    group = ["first@t1", "first@t2"]
    assert [(r.stage, r.ran) for r in run_stage_group(chains_project, group, echo=None)] == [
        ("first@t1", True),
        ("first@t2", True),
    ]
    assert not any(r.ran for r in run_stage_group(chains_project, group, echo=None))
    (chains_project / "in-t2.txt").write_text("t2 changed\n")
    assert [r.ran for r in run_stage_group(chains_project, group, echo=None)] == [False, True]
    assert set(read_lock(chains_project)) == set(group)


def test_a_failed_stage_group_names_the_stage_dvc_failed_on(project: Path):
    from loraline.flows.orchestrate import run_stage_group

    with pytest.raises(StageFailed, match=r"stage fail@t1 failed") as info:
        run_stage_group(project, ["copy@t1", "fail@t1"], echo=None)
    assert "bad row 7: field x" in str(info.value)
    assert (project / "out.txt").read_text() == "hello\n"  # the stage before it ran and stays done
