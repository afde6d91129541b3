"""Real-size run of the whole pipeline (issue 36, item 6): a user's own model folder, one tenant, every stage.

A user's Llama-shaped model folder with random weights (seed 0, bf16, safetensors in 5 GB shards, as
Hub folders come) and a byte-level BPE tokenizer with loraline's chat template, trained on the
tenant's raw text so that it tokenizes that text sensibly; built once per shape on CUDA when present
(else the CPU) and reused by later runs. Its build time is reported on its own row, never in a total.

Per shape, a fresh project folder: the repository's params.yaml with one tenant (acme-shop and its
sample raw data, copied into the project), `base.model` the model folder's absolute path (a local
folder: the base stage records it and never looks at a hub; the stages run with HF_HUB_OFFLINE=1),
and the acme-shop `train` overrides dropped: they are the recipe of the 3.7M built base, which
params.yaml says to drop with a real base.model, so the train section's defaults apply (batch_size
auto) as they would for a user. Every stage is the real stage function, called as `loraline run
--no-dvc` calls it, each in its own process (`real_size.py _stage ...`), in the project folder:

    documents, synthesize (offline generator: no LLM), base, prepare, train    once per shape
    merge, export, evaluate, gate                                             once per targets config

For each stage: wall seconds of the process (imports and CUDA set-up included, as a user waits for
them), peak GPU memory (torch.cuda.max_memory_allocated / max_memory_reserved in that process; 0
without CUDA), the device's peak used memory of all processes (nvidia-smi, when present), peak RSS
(getrusage, the process and its children) and the bytes written: files under the project folder
that are new or changed after the stage (the model folder lies outside the project and is not counted).

Targets configs (--targets, in the order given; default [adapter] first, then [adapter, merged,
onnx]) set tenants.acme-shop.deploy.targets. Training is shared: measured once, and a config's end to
end time is documents + synthesize + base + prepare + train + its own merge, export, evaluate, gate.
The goals of issue 36 (on one H100/H200, llama-8b): [adapter] end to end <= 15 min with train at
least half of it; [adapter, merged, onnx] <= 30 min; the bytes written for the tenant by an
[adapter] run at most twice the adapter folder's size plus the files outside models/ (reports and
prepared data). They are computed for every shape and apply to llama-8b.

    python bench/real_size.py --shape tiny                       (CPU: a few minutes)
    python bench/real_size.py --shape llama-1b --shape llama-8b --out bench/results/real_size.jsonl
    python bench/real_size.py --shape llama-8b --targets adapter --max-steps 200

A device command is limited to 10 minutes: start a long run detached (setsid nohup ... &) and read
its stdout or the jsonl, where each row is appended as soon as it is measured. The per-stage logs are
in <root>/<shape>/logs/. Prints one markdown table at the end, also when a stage failed (a failed
stage ends its config; its row holds the last lines of its stderr).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = REPO.parent / "shared" / "bench" / "peer_qlora.py"
TENANT = "acme-shop"

# The published Llama-3.2-1B / Llama-3.1-8B dims, as ../shared/bench/peer_qlora.py's SHAPES has them
# (read from there when it is readable, so that train_speed.py and this benchmark share one definition).
LLAMA_SHAPES = {
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}
# Small enough that the whole benchmark runs in a few minutes on 2 CPU cores.
TINY = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
)
MAX_POSITIONS = 8192
# The tokenizer learns at most this many tokens from the tenant's ~600 KB of text (more would be
# merges seen once); the model keeps the shape's vocabulary, so the embedding and lm_head cost what they would.
TOKENIZER_VOCAB = 8192

SHARED_STAGES = ("documents", "synthesize", "base", "prepare", "train")
CONFIG_STAGES = ("merge", "export", "evaluate", "gate")
DEFAULT_TARGETS = ("adapter", "adapter,merged,onnx")
GOAL_ADAPTER_S = 15 * 60
GOAL_FULL_S = 30 * 60
GIB = 1024**3
STDERR_TAIL = 15


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        return CHILDREN[argv[0]](argv[1:])
    args = parse_args(argv)
    bench = Bench(args)
    try:
        for name in args.shape or ["tiny"]:
            bench.run_shape(name, last=name == (args.shape or ["tiny"])[-1])
    finally:
        print(render_table(bench.rows, bench.notes()), flush=True)
    return 0 if all(r.get("rc", 0) == 0 for r in bench.rows) else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", action="append", choices=["tiny", *LLAMA_SHAPES], help="repeatable (default: tiny)")
    ap.add_argument(
        "--root", type=Path, default=Path("/tmp/real_size"), help="working folder: model folders, projects, logs"
    )
    ap.add_argument("--out", type=Path, default=None, help="jsonl file the rows are appended to")
    ap.add_argument(
        "--targets",
        action="append",
        help=f"a comma list of deploy targets, repeatable; default: {' and '.join(DEFAULT_TARGETS)}, in that order",
    )
    ap.add_argument(
        "--graphs",
        default="int4",
        help="export.graphs of the onnx target, a comma list (set only where "
        "params.yaml's export section has the key)",
    )
    ap.add_argument("--merge-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--merge-logit-diff",
        type=float,
        default=0.5,
        help="gate.max_merge_logit_diff when --merge-dtype is not float32 (params.yaml's 1e-3 suits float32)",
    )
    ap.add_argument("--max-steps", type=int, default=None, help="train.max_steps (default: params.yaml's epochs)")
    ap.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep each shape's merged, ONNX and checkpoint "
        "folders (default: removed before the next shape starts, to leave disk for it)",
    )
    args = ap.parse_args(argv)
    args.targets = [parse_targets(t) for t in (args.targets or DEFAULT_TARGETS)]
    args.graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    args.root = args.root.resolve()
    return args


def parse_targets(text: str) -> list[str]:
    targets = [t.strip() for t in text.split(",") if t.strip()]
    from loraline.config import DeployParams

    DeployParams(targets=targets)  # a bad name or combination fails now, with the config's own message
    return targets


# -- the benchmark (parent process: never touches CUDA, so it holds no GPU memory) ------------------------


@dataclass
class StageRun:
    """One stage process: what it cost, measured from outside (wall, bytes) and inside (memory)."""

    shape: str
    targets: str  # "shared", or the config's targets joined by commas; "model" for the model folder
    stage: str
    rc: int
    wall_s: float
    bytes_written: int = 0
    bytes_by_area: dict[str, int] = field(default_factory=dict)
    peak_gpu_alloc_gib: float = 0.0
    peak_gpu_reserved_gib: float = 0.0
    device_peak_used_gib: float | None = None  # nvidia-smi: every process on the card
    peak_rss_gib: float = 0.0  # the process itself
    peak_rss_children_gib: float = 0.0  # its largest child (worker processes, torchrun)
    stage_call_s: float | None = None  # the stage function alone, inside the process
    device: str | None = None
    timing: dict[str, Any] | None = None  # the stage's own reports/timing/<stage>@<tenant>.json
    outcome: dict[str, Any] | None = None
    error: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.common = {
            "run": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "gpu": _gpu_name(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "commit": _git_commit(),
        }
        self.graphs_supported = _export_has_graphs()

    def notes(self) -> list[str]:
        a = self.args
        graphs = (
            f"export.graphs {a.graphs}"
            if self.graphs_supported
            else "export.graphs not in params (ExportParams has no such key yet): export's default graphs"
        )
        loose = (
            f", gate.max_merge_logit_diff {a.merge_logit_diff} (params.yaml's 1e-3 is for float32)"
            if a.merge_dtype != "float32"
            else ""
        )
        return [
            "documents, synthesize, base, prepare and train are shared by the configs: measured once, counted in each "
            "config's end to end time; the model folder's build is not",
            f"merge.dtype {a.merge_dtype}{loose}; {graphs}; train: params.yaml's train section (batch_size auto), "
            f"acme-shop's tiny-base recipe dropped" + (f", max_steps {a.max_steps}" if a.max_steps else ""),
            "wall s: the stage's process (imports and CUDA set-up included); peak GPU: max_memory_allocated in it "
            "(in brackets: the card's peak used memory, every process, from nvidia-smi); peak RSS: the process or its "
            "largest child; bytes: files new or changed under the project (the tenant's: every stage but base)",
            f"goals (issue 36, apply to llama-8b): [adapter] <= {GOAL_ADAPTER_S // 60} min with train >= half; full "
            f"<= {GOAL_FULL_S // 60} min; [adapter] bytes <= 2 x adapter folder + bytes outside models/ (checkpoints, "
            "resumable state in models/checkpoints, shown apart)",
        ]

    def record(self, row: dict[str, Any]) -> None:
        row = {**self.common, **row}
        self.rows.append(row)
        if self.args.out:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            with self.args.out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def run_shape(self, name: str, last: bool) -> None:
        dims = shape_dims(name)
        shape_dir = self.args.root / name
        model_dir = shape_dir / "model"
        built = self.ensure_model(name, dims, shape_dir, model_dir)
        if built is not None and built.rc != 0:
            return
        project = shape_dir / "project"
        params = make_project(project, model_dir, self.args, self.graphs_supported)
        shared = self.run_stages(name, "shared", project, shape_dir / "logs", stages_for(params))
        if all(r.rc == 0 for r in shared):
            for targets in self.args.targets:
                set_targets(project, params, targets)
                runs = self.run_stages(name, ",".join(targets), project, shape_dir / "logs", CONFIG_STAGES)
                self.record({"kind": "config", **config_summary(name, targets, shared, runs, project)})
        if not (last or self.args.keep_outputs):
            for folder in ("merged", "onnx", "checkpoints"):
                shutil.rmtree(project / "models" / folder, ignore_errors=True)

    def ensure_model(self, name: str, dims: dict, shape_dir: Path, model_dir: Path) -> StageRun | None:
        """The user's model folder, built by a child process unless an earlier run built it for the same shape."""
        marker = shape_dir / "model.json"
        if marker.is_file() and (model_dir / "config.json").is_file():
            done = json.loads(marker.read_text(encoding="utf-8"))
            if done.get("dims") == dims:
                print(f"[{name}] model folder {model_dir} reused (built in {done['wall_s']:.0f}s)", flush=True)
                self.record({"kind": "model", "shape": name, "reused": True, **done})
                return None
        shutil.rmtree(model_dir, ignore_errors=True)
        shape_dir.mkdir(parents=True, exist_ok=True)
        raw = REPO / "data" / "raw" / TENANT
        run = self.child(
            name,
            "model",
            "build",
            shape_dir,
            shape_dir / "logs",
            ["_model", "--dims", json.dumps(dims), "--raw", str(raw), "--out", str(model_dir)],
        )
        run.bytes_written = dir_bytes(model_dir)
        row = {
            "kind": "model",
            "shape": name,
            "reused": False,
            "dims": dims,
            "model_dir": str(model_dir),
            **asdict(run),
        }
        self.record(row)
        if run.rc == 0:
            marker.write_text(
                json.dumps(
                    {
                        k: row[k]
                        for k in (
                            "dims",
                            "model_dir",
                            "wall_s",
                            "bytes_written",
                            "device",
                            "peak_gpu_alloc_gib",
                            "peak_rss_gib",
                        )
                    }
                ),
                encoding="utf-8",
            )
        return run

    def run_stages(
        self, shape: str, targets: str, project: Path, logs: Path, stages: tuple[str, ...]
    ) -> list[StageRun]:
        runs = []
        for stage in stages:
            before = snapshot(project)
            run = self.child(
                shape,
                targets,
                stage,
                project,
                logs,
                ["_stage", "--project", str(project), "--stage", stage, "--tenant", TENANT],
            )
            run.bytes_by_area = written_bytes(before, snapshot(project))
            run.bytes_written = sum(run.bytes_by_area.values())
            runs.append(run)
            self.record({"kind": "stage", **asdict(run)})
            if run.rc != 0:
                break
        return runs

    def child(self, shape: str, targets: str, stage: str, cwd: Path, logs: Path, argv: list[str]) -> StageRun:
        """Run `real_size.py <argv>` and read back what it measured; its stdout and stderr go to logs/."""
        logs.mkdir(parents=True, exist_ok=True)
        tag = stage if targets in ("shared", "model") else f"{targets.replace(',', '+')}-{stage}"
        out, err, result = (logs / f"{tag}.{ext}" for ext in ("out", "err", "json"))
        result.unlink(missing_ok=True)
        print(f"[{shape}] {targets}: {stage} ...", flush=True)
        with out.open("w") as fo, err.open("w") as fe, DevicePeak() as device_peak:
            started = time.perf_counter()
            rc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *argv, "--result", str(result)],
                cwd=cwd,
                env=self.env,
                stdout=fo,
                stderr=fe,
            ).returncode
            wall = time.perf_counter() - started
        inside = json.loads(result.read_text(encoding="utf-8")) if rc == 0 and result.is_file() else {}
        run = StageRun(
            shape=shape,
            targets=targets,
            stage=stage,
            rc=rc,
            wall_s=round(wall, 2),
            device_peak_used_gib=device_peak.gib,
            **inside,
        )
        if rc != 0:
            run.error = tail(err, STDERR_TAIL)
            print(f"[{shape}] {targets}: {stage} FAILED (rc {rc}, log {err}):\n{run.error}", flush=True)
        else:
            print(
                f"[{shape}] {targets}: {stage} {wall:.1f}s, peak GPU {run.peak_gpu_alloc_gib:.2f} GiB, "
                f"RSS {run.peak_rss_gib:.2f} GiB",
                flush=True,
            )
        return run


def shape_dims(name: str) -> dict[str, int]:
    if name == "tiny":
        return dict(TINY)
    try:
        spec = importlib.util.spec_from_file_location("peer_qlora", PEER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return dict(module.SHAPES[name])
    except (OSError, AttributeError, KeyError, ImportError):
        return dict(LLAMA_SHAPES[name])


def make_project(project: Path, model_dir: Path, args: argparse.Namespace, graphs_supported: bool) -> dict[str, Any]:
    """A fresh project folder: params.yaml for one tenant on the user's model folder, its raw data copied in."""
    from loraline.config import load_params

    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    tenant = {k: v for k, v in data["tenants"][TENANT].items() if k != "train"}
    data["tenants"] = {TENANT: tenant}
    data["base"]["model"] = str(model_dir.resolve())
    data["merge"]["dtype"] = args.merge_dtype
    if args.merge_dtype != "float32":
        data["gate"]["max_merge_logit_diff"] = args.merge_logit_diff
    if args.max_steps:
        data["train"]["max_steps"] = args.max_steps
    if graphs_supported:
        data["export"]["graphs"] = args.graphs
    shutil.rmtree(project, ignore_errors=True)
    raw = Path(tenant["raw_dir"])
    shutil.copytree(REPO / raw, project / raw)
    write_params(project, data)
    load_params(project / "params.yaml")  # invalid params fail here, before any stage runs
    return data


def set_targets(project: Path, data: dict[str, Any], targets: list[str]) -> None:
    data["tenants"][TENANT]["deploy"] = {"targets": list(targets)}
    write_params(project, data)


def write_params(project: Path, data: dict[str, Any]) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def stages_for(data: dict[str, Any]) -> tuple[str, ...]:
    """The shared stages; synthesize only with the offline generator (the others need an LLM)."""
    return tuple(s for s in SHARED_STAGES if s != "synthesize" or data["synthesize"]["generator"] == "offline")


def config_summary(
    shape: str, targets: list[str], shared: list[StageRun], runs: list[StageRun], project: Path
) -> dict[str, Any]:
    """A config's totals: end to end time (shared stages included), the tenant's bytes, the goals of issue 36."""
    every = shared + runs
    wall = sum(r.wall_s for r in every)
    train_s = next(r.wall_s for r in shared if r.stage == "train")
    areas: dict[str, int] = {}
    for r in every:
        if r.stage != "base":  # the shared base's record, not the tenant's
            for area, n in r.bytes_by_area.items():
                areas[area] = areas.get(area, 0) + n
    checkpoints = areas.get("models/checkpoints", 0)
    models = sum(n for a, n in areas.items() if a.startswith("models/")) - checkpoints
    outside = sum(n for a, n in areas.items() if not a.startswith("models/"))
    adapter = dir_bytes(project / "models" / "adapters" / TENANT)
    adapter_weights = dir_bytes(project / "models" / "adapters" / TENANT, "adapter_model.safetensors")
    finished = len(runs) == len(CONFIG_STAGES) and all(r.rc == 0 for r in runs)
    kind = "adapter" if targets == ["adapter"] else "full" if set(targets) == {"adapter", "merged", "onnx"} else None
    goals: dict[str, bool | None] = {"goal_time": None, "goal_train_half": None, "goal_bytes": None}
    if finished and kind == "adapter":
        goals = {
            "goal_time": wall <= GOAL_ADAPTER_S,
            "goal_train_half": train_s >= wall / 2,
            "goal_bytes": models <= 2 * adapter,
        }  # bytes <= 2 x adapter + the bytes outside models/
    elif finished and kind == "full":
        goals["goal_time"] = wall <= GOAL_FULL_S
    gate = next((r.outcome for r in runs if r.stage == "gate" and r.outcome), {})
    return {
        "shape": shape,
        "targets": ",".join(targets),
        "finished": finished,
        "failed_stage": next((r.stage for r in every if r.rc != 0), None),
        "end_to_end_s": round(wall, 1),
        "train_s": train_s,
        "shared_s": round(sum(r.wall_s for r in shared), 1),
        "tenant_bytes": models + outside + checkpoints,
        "tenant_bytes_models": models,
        "tenant_bytes_outside_models": outside,
        "checkpoint_bytes": checkpoints,
        "bytes_by_area": areas,
        "adapter_bytes": adapter,
        "adapter_weights_bytes": adapter_weights,
        "peak_gpu_alloc_gib": max((r.peak_gpu_alloc_gib for r in every), default=0.0),
        "peak_rss_gib": max((max(r.peak_rss_gib, r.peak_rss_children_gib) for r in every), default=0.0),
        "device": next((r.device for r in every if r.device and r.device != "cpu"), "cpu"),
        "gate_passed": gate.get("passed"),
        "training_shared": "documents..train measured once per shape, included in every config's end_to_end_s",
        **goals,
    }


# -- bytes ---------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `root`: (size, mtime, inode); a file a stage replaced atomically has a new inode."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            files[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return files


def written_bytes(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, int]:
    """Sizes of the files new or changed since `before`, per area (models/<kind>, reports, data)."""
    areas: dict[str, int] = {}
    for rel, stat in after.items():
        if before.get(rel) != stat:
            area = area_of(rel)
            areas[area] = areas.get(area, 0) + stat[0]
    return areas


def area_of(rel: str) -> str:
    parts = Path(rel).parts
    return "/".join(parts[:2]) if parts[0] == "models" and len(parts) > 2 else parts[0]


def dir_bytes(folder: Path, name: str | None = None) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob(name or "*") if p.is_file() and not p.is_symlink())


class DevicePeak:
    """The card's peak used memory (every process) while a stage runs, read by nvidia-smi every 200 ms;
    None without nvidia-smi. It sees what a stage's own children (torchrun workers) hold, which torch's
    counters in the stage's process do not."""

    def __enter__(self) -> DevicePeak:
        self.gib: float | None = None
        self._peak_mib = 0.0
        exe = shutil.which("nvidia-smi")
        self._proc = None
        if exe:
            self._proc = subprocess.Popen(
                [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self._peak_mib = max(self._peak_mib, float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        self._proc.wait()
        self._reader.join(timeout=5)
        self.gib = round(self._peak_mib / 1024, 2)


# -- child processes ----------------------------------------------------------------------------------


def stage_child(argv: list[str]) -> int:
    """One stage of the project in `--project`, as `loraline run --no-dvc` calls it; writes what it measured."""
    ap = argparse.ArgumentParser(prog="real_size.py _stage")
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--stage", required=True, choices=[*SHARED_STAGES, *CONFIG_STAGES])
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--result", type=Path, required=True)
    args = ap.parse_args(argv)
    os.chdir(args.project)  # the CLI runs from the project root; Layout() and relative raw_dirs follow it
    # torch is not imported here: the stage imports what it needs (documents, synthesize, gate and a base
    # of the user's own load no torch, as `loraline <stage>` does not), and the wall time shows it.
    from loraline.config import load_params
    from loraline.layout import Layout

    params, layout = load_params(Path("params.yaml").resolve()), Layout()
    started = time.perf_counter()
    result = call_stage(args.stage, params, layout, args.tenant)
    call_s = time.perf_counter() - started
    timing_path = layout.timing_path(args.stage, None if args.stage == "base" else args.tenant)
    timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else None
    write_measures(args.result, call_s, timing=timing, outcome=outcome_of(args.stage, result))
    return 0


def call_stage(stage: str, params: Any, layout: Any, tenant: str) -> Any:
    import importlib

    run = importlib.import_module(f"loraline.{stage}").run
    if stage == "base":
        return run(params, layout)
    if stage == "prepare":
        import datasets

        datasets.disable_progress_bars()  # as the CLI does
    if stage == "train":
        return run(params, layout, tenant, checkpoints=True)  # the CLI's default (no --no-checkpoints)
    if stage == "evaluate":  # its stderr (logs/) then says how long each model took
        return run(params, layout, tenant, progress=True)
    return run(params, layout, tenant)


def outcome_of(stage: str, result: Any) -> dict[str, Any] | None:
    """A few words on what the stage decided, for the jsonl."""
    if stage == "gate":
        return {"passed": bool(result.passed), "failed_rules": [r.name for r in result.rules if not r.passed]}
    if stage == "train":
        return result.record.model_dump(include={"batch", "steps", "device", "loss"}, exclude_unset=True)
    if stage in ("merge", "export"):
        keys = {"device", "device_name", "passed", "merged", "onnx", "graphs"}
        return result.report.model_dump(include=keys, exclude_unset=True)
    if stage == "evaluate":
        metrics = result.metrics
        return {
            "test_rows": metrics.get("test_rows"),
            "device": metrics.get("device"),
            "models": sorted(metrics["models"]),
            "batch_rows": metrics.get("batch_rows"),
        }
    if stage == "prepare":
        stats = result.stats if isinstance(result.stats, dict) else result.stats.__dict__
        return {k: stats[k] for k in ("rows_in", "kept", "splits") if k in stats}
    return None


def model_child(argv: list[str]) -> int:
    """The user's model folder: random Llama weights of `--dims` (seed 0, bf16) and a tokenizer trained on `--raw`."""
    ap = argparse.ArgumentParser(prog="real_size.py _model")
    ap.add_argument("--dims", required=True)
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraline.base.tokenizer import train_tokenizer
    from loraline.modelling.chat import save_tokenizer

    started = time.perf_counter()
    dims = json.loads(args.dims)
    tokenizer = train_tokenizer(raw_texts(args.raw), vocab_size=min(dims["vocab_size"], TOKENIZER_VOCAB))
    config = LlamaConfig(
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: an 8B model never exists in fp32 (32 GB)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out, max_shard_size="5GB")  # safetensors, sharded as Hub folders are
    save_tokenizer(tokenizer, args.out)
    parameters = sum(p.numel() for p in model.parameters())
    write_measures(
        args.result,
        time.perf_counter() - started,
        outcome={"parameters": parameters, "tokenizer_vocab": len(tokenizer)},
    )
    return 0


def raw_texts(raw: Path) -> list[str]:
    """The tenant's raw files as lines of text (JSON and CSV as they are: the answers are JSON)."""
    lines = []
    for path in sorted(raw.rglob("*")):
        if path.is_file():
            lines += [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines


def write_measures(path: Path, call_s: float, **extra: Any) -> None:
    """What only the process itself can see: torch's GPU peaks, its own and its children's peak RSS."""
    alloc = reserved = 0
    device = "cpu"  # the stage never started CUDA (or never imported torch: importing it here would cost seconds)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        # a fresh process: the peaks count from zero, so no reset is needed (and none starts CUDA in a CPU-only stage)
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        device = torch.cuda.get_device_name()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    path.write_text(
        json.dumps(
            {
                "stage_call_s": round(call_s, 2),
                "device": device,
                "peak_gpu_alloc_gib": round(alloc / GIB, 3),
                "peak_gpu_reserved_gib": round(reserved / GIB, 3),
                "peak_rss_gib": round(rss / GIB, 3),
                "peak_rss_children_gib": round(rss_children / GIB, 3),
                **extra,
            },
            default=str,
        ),
        encoding="utf-8",
    )


CHILDREN = {"_stage": stage_child, "_model": model_child}


# -- output ---------------------------------------------------------------------------------------------


def render_table(rows: list[dict[str, Any]], notes: list[str]) -> str:
    head = "| shape | targets | stage | wall s | peak GPU GiB | peak RSS GiB | bytes written |"
    lines = ["", head, "|" + "---|" * 7]
    for r in rows:
        if r["kind"] in ("model", "stage"):
            targets = "(model folder, not timed in totals)" if r["kind"] == "model" else r["targets"]
            stage = ("build" if r["kind"] == "model" else r["stage"]) + (" (reused)" if r.get("reused") else "")
            stage += f" FAILED rc {r['rc']}" if r.get("rc") else ""
            rss = max(r.get("peak_rss_gib", 0.0), r.get("peak_rss_children_gib", 0.0))
            card = f" ({r['device_peak_used_gib']:.1f})" if r.get("device_peak_used_gib") is not None else ""
            lines.append(
                f"| {r['shape']} | {targets} | {stage} | {r['wall_s']:.1f} | "
                f"{r.get('peak_gpu_alloc_gib', 0.0):.2f}{card} | {rss:.2f} | {human(r.get('bytes_written', 0))} |"
            )
        else:
            total = "end to end" if r["finished"] else f"end to end (stopped at {r['failed_stage']})"
            lines.append(
                f"| {r['shape']} | **{r['targets']}** | **{total}** | **{r['end_to_end_s']:.1f}** | "
                f"{r['peak_gpu_alloc_gib']:.2f} | {r['peak_rss_gib']:.2f} | **{human(r['tenant_bytes'])}** |"
            )
    lines += ["", "Totals per config:", ""]
    for r in rows:
        if r["kind"] == "config":
            state = "finished" if r["finished"] else f"stopped at {r['failed_stage']}"
            goals = ", ".join(
                f"{k[5:]} {'ok' if v else 'MISSED'}" for k, v in r.items() if k.startswith("goal_") and v is not None
            )
            lines.append(
                f"- {r['shape']} [{r['targets']}] ({state}, {r['device']}): end to end {r['end_to_end_s']:.0f} s "
                f"(train {r['train_s']:.0f} s, {r['train_s'] / max(r['end_to_end_s'], 1e-9):.0%}); tenant bytes "
                f"{human(r['tenant_bytes'])} = models {human(r['tenant_bytes_models'])} + outside models "
                f"{human(r['tenant_bytes_outside_models'])} + checkpoints {human(r['checkpoint_bytes'])}; adapter "
                f"{human(r['adapter_bytes'])}; gate "
                f"{'PASS' if r['gate_passed'] else 'FAIL' if r['gate_passed'] is False else '-'}"
                + (f"; goals: {goals}" if goals else "")
            )
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        lines += [
            "",
            f"{r['shape']} {r['targets']} {r['stage']} failed (rc {r['rc']}), stderr tail:",
            "```",
            r["error"],
            "```",
        ]
    lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    if rows:
        lines.append(
            f"- {rows[0]['gpu'] or 'no GPU'}; torch {rows[0]['torch']}, transformers {rows[0]['transformers']}, "
            f"commit {rows[0]['commit']}"
        )
    return "\n".join(lines)


def human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def tail(path: Path, n: int) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _gpu_name() -> str | None:
    """The card, from nvidia-smi: the parent never starts CUDA (its context would hold memory on the card)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return f"{len(names)} x {names[0]}" if len(names) > 1 else (names[0] if names else None)


def _export_has_graphs() -> bool:
    """export.graphs is being added (fp32 | fp16 | int8 | int4); until then export writes its default graphs."""
    from loraline.config import ExportParams

    return "graphs" in ExportParams.model_fields


if __name__ == "__main__":
    sys.exit(main())
