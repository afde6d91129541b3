"""Where each stage reads and writes, and what the stages are called: the one place the library
spells a project path or a stage name. dvc.yaml spells out the same paths (a test checks they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The pipeline's stages in the order they run, named as in dvc.yaml; every stage but `base` runs once
# per tenant (`train@acme-shop`).
STAGES = ("documents", "synthesize", "base", "prepare", "train", "merge", "export", "evaluate", "gate")
SHARED_STAGES = ("base",)
TENANT_STAGES = tuple(s for s in STAGES if s not in SHARED_STAGES)
# The tenant stages the shared base is built from (its dvc.yaml dep: data/documents, every tenant's).
BASE_INPUT_STAGES = ("documents",)

# Files inside stage outputs that another stage (or the registry) reads.
BASE_RECORD = "base_record.json"
# In the base's folder: general text the built base did not pretrain on (evaluate.general's default path).
GENERAL_TEXT = "general_text.jsonl"
# In data/general/<tenant>/ (the prepare stage's): the tokenized general-text sample, and where it came from.
GENERAL_ROWS = "rows.jsonl"
GENERAL_SAMPLE = "sample.json"
DOCUMENTS_MANIFEST = "documents.json"
PREPARED_DATASET = "dataset"
TOKENIZER_STAMP = "tokenizer_stamp.json"  # in a prepared dataset: which tokenizer made its ids
SYNTHETIC_ROWS = "rows.jsonl"
TRAIN_RECORD = "train_record.json"
# In an adapter's folder (peft's format, the train stage's output) beside TRAIN_RECORD.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# In the merged and ONNX folders, each copied to reports/<tenant>/ (loraline.records reads and writes all four).
MERGE_REPORT = "merge_report.json"
EXPORT_REPORT = "export_report.json"
# In a merged QA-LoRA model's folder: its codes, scales and zero points (modelling.qalora), which export reads.
QALORA_QUANTIZED = "qalora_quantized.safetensors"
# Beside it: the same low-bit model as a folder transformers loads through torchao (modelling.qalora_torchao).
QALORA_TORCHAO = "torchao"
# In a QA-LoRA adapter's folder: its QLoRA reference (train.qalora.reference), which the evaluation compares it with.
QLORA_REFERENCE = "qlora_reference"
# What a tenant is deployed as (deploy.targets): its adapter served on the shared base (`loraline serve`),
# a standalone merged Hugging Face folder, and an ONNX export of that folder. A stage whose target is not
# built still writes its (small) outputs, a report saying so, because DVC requires every declared output.
DEPLOY_TARGETS = ("adapter", "merged", "onnx")
NOT_BUILT = "not built (deploy.targets)"
# reports/<tenant>/ holds each tenant's reports; reports/timing/ every stage's timing, so no tenant
# may be called that (config.py refuses it).
TIMING_DIR = "timing"


def stage_id(stage: str, tenant: str | None = None) -> str:
    """DVC's name for one instance of a stage: `base`, or `train@acme-shop` for a tenant's."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return stage if stage in SHARED_STAGES or tenant is None else f"{stage}@{tenant}"


# The DVC files: the root dvc.yaml holds the shared stages, the registry's artifacts and the timing metrics;
# each tenant's stages live in their own pipelines/<tenant>/dvc.yaml (and DVC writes its dvc.lock beside it),
# rendered from TENANT_TEMPLATE by `loraline pipelines`. One lock per tenant keeps what a stage run reads and
# rewrites the same size whatever the number of tenants: with one dvc.lock for all, every DVC process parsed
# 31 KB a tenant of it, 155 s a process at 1,000 tenants (docs/benchmarks.md, "Scaling").
PIPELINES_DIR = "pipelines"
TENANT_TEMPLATE = f"{PIPELINES_DIR}/tenant.yaml"
ROOT_DVC_FILES = ("dvc.yaml", "dvc.lock")


def tenant_dvc_file(tenant: str, name: str = "dvc.yaml") -> str:
    """A tenant's dvc.yaml (or, with name="dvc.lock", its lock), relative to the project root."""
    return f"{PIPELINES_DIR}/{tenant}/{name}"


def dvc_target(name: str) -> str:
    """How DVC's command line addresses a stage id from the project root: `base`, or
    `pipelines/acme-shop/dvc.yaml:train@acme-shop` (a tenant's stages are in the tenant's own dvc.yaml)."""
    stage, tenant = split_stage_id(name)
    return name if tenant is None else f"{tenant_dvc_file(tenant)}:{name}"


def split_stage_id(name: str) -> tuple[str, str | None]:
    """(stage, tenant) of a DVC stage name: `train@acme-shop` -> ("train", "acme-shop"), `base` -> ("base", None);
    a DVC address (`pipelines/acme-shop/dvc.yaml:train@acme-shop`) gives the same."""
    stage, sep, tenant = name.rpartition(":")[2].partition("@")
    return stage, tenant if sep else None


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def relative(self, path: Path) -> str:
        """`path` as dvc.yaml and dvc.lock write it: relative to the project root, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()

    def artifacts(self, tenant: str, targets: tuple[str, ...] | list[str] = DEPLOY_TARGETS) -> dict[str, str]:
        """The registry's artifact names for a tenant and the DVC output (relative path) each versions: the
        adapter always, the ONNX export only when `targets` (deploy.targets) builds it."""
        out = {f"{tenant}-adapter": self.relative(self.adapter_dir(tenant))}
        if "onnx" in targets:
            out[f"{tenant}-onnx"] = self.relative(self.onnx_dir(tenant))
        return out

    @property
    def base_dir(self) -> Path:
        return self.root / "models" / "base"

    def documents_dir(self, tenant: str) -> Path:
        return self.root / "data" / "documents" / tenant

    def synthetic_dir(self, tenant: str) -> Path:
        return self.root / "data" / "synthetic" / tenant

    def base_record_path(self) -> Path:
        return self.base_dir / BASE_RECORD

    def documents_manifest(self, tenant: str) -> Path:
        return self.documents_dir(tenant) / DOCUMENTS_MANIFEST

    def synthetic_rows_path(self, tenant: str) -> Path:
        return self.synthetic_dir(tenant) / SYNTHETIC_ROWS

    def synthesize_stats_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "synthesize_stats.json"

    def synth_cache_dir(self, tenant: str) -> Path:
        """Endpoint replies, kept outside DVC outputs (DVC deletes a stage's outputs before re-running it)."""
        return self.root / ".cache" / "synth" / tenant

    def judge_cache_dir(self, tenant: str) -> Path:
        """evaluate.judge's replies, outside DVC outputs as synth_cache_dir's."""
        return self.root / ".cache" / "judge" / tenant

    def prepared_dir(self, tenant: str) -> Path:
        return self.root / "data" / "prepared" / tenant

    def prepared_dataset_dir(self, tenant: str) -> Path:
        """The datasets `save_to_disk` folder (train/validation/test) inside the prepared output."""
        return self.prepared_dir(tenant) / PREPARED_DATASET

    def general_sample_dir(self, tenant: str) -> Path:
        """The general-text sample (evaluate.general) tokenized for the tenant's evaluation: not its data."""
        return self.root / "data" / "general" / tenant

    def rejected_path(self, tenant: str) -> Path:
        return self.root / "data" / "rejected" / f"{tenant}.jsonl"

    def prepare_stats_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "prepare_stats.json"

    def adapter_dir(self, tenant: str) -> Path:
        return self.root / "models" / "adapters" / tenant

    def train_record_path(self, tenant: str) -> Path:
        return self.adapter_dir(tenant) / TRAIN_RECORD

    def checkpoint_dir(self, tenant: str) -> Path:
        return self.root / "models" / "checkpoints" / tenant

    def reference_dir(self, tenant: str, source: str, version: str, commit: str) -> Path:
        """train.preference.reference naming a registry version (<source>@<version>): `source`'s adapter as of that
        version, fetched for `tenant`'s DPO run (registry/reference.py). The commit in the name: a re-created tag
        never reuses stale files."""
        return self.root / "models" / "reference" / tenant / f"{source}-{version}-{commit[:12]}"

    def train_plots_dir(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "train"

    def merged_dir(self, tenant: str) -> Path:
        return self.root / "models" / "merged" / tenant

    def merge_report_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / MERGE_REPORT

    def onnx_dir(self, tenant: str) -> Path:
        return self.root / "models" / "onnx" / tenant

    def export_report_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / EXPORT_REPORT

    def evaluation_dir(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "evaluation"

    def evaluation_results_path(self, tenant: str) -> Path:
        """The evaluation's full results, every metric of every model (a copy of evaluation/metrics.json that the
        gate, the release and the summary read): a report, though its file name says metrics; the DVC metrics
        are metrics_path("evaluate", tenant)."""
        return self.root / "reports" / tenant / "eval_metrics.json"

    def gate_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "gate.json"

    def metrics_path(self, stage: str, tenant: str) -> Path:
        """The few numbers of a tenant's stage that people compare across runs (a DVC metric, e.g.
        reports/<tenant>/metrics/train.json); the stage's detailed report is an ordinary output."""
        stage_id(stage, tenant)  # an unknown stage fails here
        return self.root / "reports" / tenant / "metrics" / f"{stage}.json"

    @property
    def timing_dir(self) -> Path:
        """Run facts (wall times, rates, memory peaks, the git commit): not a stage output, so that
        dvc.lock records only what repeats; dvc.yaml lists this folder under its top-level `metrics`."""
        return self.root / "reports" / TIMING_DIR

    def timing_path(self, stage: str, tenant: str | None = None) -> Path:
        """reports/timing/<stage id>.json: base.json, train@acme-shop.json."""
        return self.timing_dir / f"{stage_id(stage, tenant)}.json"

    @property
    def traffic_root(self) -> Path:
        """logs/traffic/: the gateway's traffic logs (serve.log_traffic), one folder per tenant."""
        return self.root / "logs" / "traffic"

    def traffic_dir(self, tenant: str) -> Path:
        """logs/traffic/<tenant>/: what the gateway served the tenant and the feedback on it, one JSONL file per
        UTC day (loraline.serve.traffic). Not a DVC output: `loraline feedback export` turns it into a raw file
        of the tenant's, which prepare reads."""
        return self.traffic_root / tenant

    def release_path(self, tenant: str) -> Path:
        """What the last release did (registered version, promotion decision); not a DVC output."""
        return self.root / "reports" / tenant / "release.json"
