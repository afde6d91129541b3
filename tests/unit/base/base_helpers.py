"""Helpers for the base-stage tests (a uniquely named module: conftest.py names clash across folders)."""

from __future__ import annotations

from pathlib import Path

from loraline.config import BuildParams

MARKER = "ZQXJ-INSTRUCTION-ROW-MARKER-93817"
DOC_TEXT = "Lampwick Outfitters ships every parcel within three working days of payment."


def tiny_build(**overrides) -> BuildParams:
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=128,
        seq_len=64,
        batch_size=4,
        max_steps=20,
        warmup_steps=2,
        learning_rate=3e-3,
        max_stdlib_chars=20_000,
        exercises=60,
        copy_drill_steps=0,
    )
    fields.update(overrides)
    return BuildParams(**fields)


def make_raw(root: Path) -> list[Path]:
    """Two tenants: documents (.md/.txt) and instruction rows (.jsonl/.csv) carrying a unique marker."""
    a, b = root / "tenant-a", root / "tenant-b"
    (a / "docs").mkdir(parents=True)
    b.mkdir(parents=True)
    (a / "docs" / "shipping.md").write_text(f"# Shipping\n\n{DOC_TEXT}\n", encoding="utf-8")
    (b / "handbook.txt").write_text("Printers on floor two are serviced every Monday.\n", encoding="utf-8")
    (a / "rows.jsonl").write_text(f'{{"instruction": "{MARKER}", "output": "{{}}"}}\n', encoding="utf-8")
    (b / "rows.csv").write_text(f"prompt,completion\n{MARKER},x\n", encoding="utf-8")
    return [a, b]
