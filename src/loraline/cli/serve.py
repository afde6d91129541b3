"""`loraline serve`: every tenant's production adapter on one vLLM server behind loraline's gateway."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_serve_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "serve",
        parents=[common],
        help="serve every tenant's production adapter through vLLM (OpenAI API), following promotions live",
    )
    p.add_argument(
        "--env",
        default=".serve-venv",
        help="the serving environment, built from its lock when missing (default: .serve-venv)",
    )
    p.add_argument("--python", help="use this Python's vLLM instead of building the serving environment")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from loraline.cli.main import _load
    from loraline.layout import Layout
    from loraline.serve.claims import ClaimError
    from loraline.serve.engine import EngineError
    from loraline.serve.environment import ensure_serving_env
    from loraline.serve.server import serve

    params = _load(args)
    python = Path(args.python) if args.python else ensure_serving_env(Path(args.env)).python
    try:
        serve(params, Layout(), python)
    except (
        ClaimError,
        EngineError,
    ) as exc:  # a taken port, a serve already running, vLLM failing to start: no traceback
        print(f"loraline serve: error: {exc}", file=sys.stderr)
        return 1
    return 0
