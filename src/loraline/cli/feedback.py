"""`loraline feedback export`: the served traffic's feedback (serve.log_traffic) as a raw source of a tenant's
data, which the next `dvc repro` prepares (the logic: loraline.serve.feedback)."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any


def add_feedback_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("feedback", help="turn the feedback on served answers into training data")
    sub = p.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    s = sub.add_parser(
        "export",
        parents=[common],
        help="write a tenant's logged answers and feedback as SFT rows (accepted answers) and preference pairs "
        "(a rewrite or a better-rated answer over a worse one) into its raw_dir, PII masked",
    )
    s.add_argument("--tenant", required=True, help="the tenant whose traffic log (logs/traffic/<tenant>/) to read")
    s.add_argument(
        "--since", type=date.fromisoformat, metavar="YYYY-MM-DD", help="only answers given on this UTC day or later"
    )
    s.add_argument(
        "--out",
        type=Path,
        help="the file to write (default: <raw_dir>/feedback-<first day>-<last day>.jsonl, read by the next prepare)",
    )
    s.add_argument(
        "--accept-score",
        type=float,
        metavar="X",
        help="numeric ratings at least X are accepted answers (SFT rows); without it numbers only rank answers",
    )
    s.set_defaults(func=cmd_feedback_export)


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from loraline.cli.main import _load
    from loraline.layout import Layout
    from loraline.serve.feedback import export_feedback

    params = _load(args)
    params.tenant_params(args.tenant)  # an unknown tenant: a configuration error naming the known ones
    summary = export_feedback(params, Layout(), args.tenant, args.since, args.out, args.accept_score)
    print(f"feedback export {summary.line()}")
    for note in summary.notes:
        print(f"loraline feedback: note: {note}", file=sys.stderr)
    return 0
