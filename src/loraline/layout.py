"""Where each stage reads and writes by default. dvc.yaml spells out the same paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    @property
    def base_dir(self) -> Path:
        return self.root / "models" / "base"

    def documents_dir(self, tenant: str) -> Path:
        return self.root / "data" / "documents" / tenant

    def synthetic_dir(self, tenant: str) -> Path:
        return self.root / "data" / "synthetic" / tenant

    def synthesize_stats_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "synthesize_stats.json"

    def synth_cache_dir(self, tenant: str) -> Path:
        """Endpoint replies, kept outside DVC outputs (DVC deletes a stage's outputs before re-running it)."""
        return self.root / ".cache" / "synth" / tenant

    def prepared_dir(self, tenant: str) -> Path:
        return self.root / "data" / "prepared" / tenant

    def rejected_path(self, tenant: str) -> Path:
        return self.root / "data" / "rejected" / f"{tenant}.jsonl"

    def prepare_stats_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "prepare_stats.json"

    def adapter_dir(self, tenant: str) -> Path:
        return self.root / "models" / "adapters" / tenant

    def checkpoint_dir(self, tenant: str) -> Path:
        return self.root / "models" / "checkpoints" / tenant

    def train_metrics_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "train_metrics.json"

    def train_plots_dir(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "train"

    def merged_dir(self, tenant: str) -> Path:
        return self.root / "models" / "merged" / tenant

    def merge_report_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "merge_report.json"

    def onnx_dir(self, tenant: str) -> Path:
        return self.root / "models" / "onnx" / tenant

    def export_report_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "export_report.json"

    def evaluation_dir(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "evaluation"

    def eval_metrics_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "eval_metrics.json"

    def gate_path(self, tenant: str) -> Path:
        return self.root / "reports" / tenant / "gate.json"

    def release_path(self, tenant: str) -> Path:
        """What the last release did (registered version, promotion decision); not a DVC output."""
        return self.root / "reports" / tenant / "release.json"
