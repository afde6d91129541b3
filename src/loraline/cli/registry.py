"""`loraline registry ...`: look at, release, promote and roll back versions from the command line.

NAME is an artifact (`acme-shop-adapter`) or a tenant (`acme-shop`, meaning both of its artifacts,
which move together). Manual promotions go through the same lock as releases, and their tag
message records who promoted and why, since the gate did not decide them. Promote and rollback refuse
a version whose recorded gate failed or whose lineage disagrees with itself (registry.consistency)
unless --force is given, and the tag message then says which rule was overridden.
"""

from __future__ import annotations

import argparse
import getpass
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraline.registry.base import PROD, RegistryError, Version
from loraline.registry.consistency import allowed
from loraline.registry.lineage import artifact_paths
from loraline.registry.rollback import rollback_artifacts

if TYPE_CHECKING:
    from loraline.config import Params


def add_registry_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "registry", help="model registry: list, show, release, promote and roll back versions (GTO git tags)"
    )
    sub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    s = sub.add_parser("list", help="every artifact with its latest version, production version and last promotion")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s = sub.add_parser("show", help="an artifact's (or a tenant's) versions, lineage summary and promotion history")
    s.add_argument(
        "name", metavar="NAME", help="artifact name (e.g. acme-shop-adapter) or tenant (both its artifacts)"
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s = sub.add_parser(
        "promote",
        help="make VERSION production by hand (refused when its gate failed or its lineage "
        "is inconsistent, unless --force)",
    )
    s.add_argument("name", metavar="NAME", help="artifact name or tenant (both its artifacts)")
    s.add_argument("version", metavar="VERSION", help="a registered version, e.g. v0.0.3")
    s.add_argument(
        "--force",
        action="store_true",
        help="promote even though the version's recorded gate failed or its lineage is inconsistent",
    )
    s.add_argument("--reason", default="", help="why; recorded in the promotion's tag message")
    s.add_argument(
        "--no-canary",
        action="store_true",
        help="move all of the tenant's traffic at once even though serve.canary "
        "is set (a fix that must not wait for a canary's evidence)",
    )
    s = sub.add_parser(
        "rollback",
        help="make production again the version that was production before the current one "
        "(refused when its gate failed or its lineage is inconsistent, unless --force)",
    )
    s.add_argument("name", metavar="NAME", help="artifact name or tenant (both its artifacts)")
    s.add_argument(
        "--force",
        action="store_true",
        help="roll back even onto a version whose recorded gate failed or whose lineage is inconsistent",
    )
    s = sub.add_parser(
        "release", help="register each tenant's current DVC outputs and promote them if the gate passes"
    )
    s.add_argument("--params", default="params.yaml", help="the params file to read (default: params.yaml)")
    s.add_argument("--tenant", action="append", help="this tenant only (repeatable; default: every tenant)")
    s.add_argument("--no-promote", action="store_true", help="register only; leave production as it is")
    p.set_defaults(func=cmd_registry)


def cmd_registry(args: argparse.Namespace) -> int:
    from loraline.registry.gto_registry import GtoRegistry

    registry = GtoRegistry(Path.cwd())
    command = {"list": _list, "show": _show, "promote": _promote, "rollback": _rollback, "release": _release}[
        args.registry_command
    ]
    try:
        if args.registry_command in ("promote", "rollback"):  # release shares the registry itself
            from loraline.registry.sync import shared_registry

            with shared_registry(Path.cwd(), _registry_remote()):
                return command(registry, args)
        if args.registry_command in ("list", "show"):  # only reads: one read of every tag for all of them
            with registry.reading():
                return command(registry, args)
        return command(registry, args)
    except RegistryError as exc:
        print(f"loraline registry {args.registry_command}: error: {exc}", file=sys.stderr)
        return 1


def _registry_remote() -> str | None:
    """orchestrate.registry_remote of ./params.yaml, so a manual promotion reaches every machine too."""
    params = _params()
    return params.orchestrate.registry_remote if params is not None else None


def _params() -> Params | None:
    """./params.yaml's params; None where there is none."""
    from loraline.config import load_params

    path = Path("params.yaml")
    return load_params(path) if path.is_file() else None


def _names(registry: Any, name: str) -> list[str]:
    known = registry.artifacts()
    if name in known:
        return [name]
    pair = [n for n in artifact_paths(name) if n in known]
    if not pair:
        raise RegistryError(
            f"no artifact or tenant named {name!r}; artifacts: {', '.join(known) or 'none registered yet'}"
        )
    return pair


def _when(a: Any) -> str | None:
    return a.created_at.isoformat() if a is not None else None


def _list(registry: Any, args: argparse.Namespace) -> int:
    rows = []
    for name in registry.artifacts():
        latest, prod, history = registry.latest(name), registry.production(name), registry.history(name)
        rows.append(
            {
                "artifact": name,
                "latest": latest.version if latest else None,
                "prod": prod.version if prod else None,
                "promoted_at": _when(history[-1] if history else None),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no artifacts registered yet (loraline registry release registers them)")
        return 0
    header = {"artifact": "artifact", "latest": "latest", "prod": PROD, "promoted_at": "last promotion"}
    widths = {k: max(len(str(r[k] or "-")) for r in [header, *rows]) for k in header}
    for r in [header, *rows]:
        print("  ".join(str(r[k] or "-").ljust(widths[k]) for k in header).rstrip())
    return 0


def _summary(v: Version) -> dict[str, Any]:
    lin = v.lineage
    metrics = lin.get("metrics") or {}
    return {
        "version": v.version,
        "commit": v.commit,
        "created_at": v.created_at.isoformat(),
        "gate": metrics.get("gate"),
        "metrics": metrics.get("eval"),
        "data": (lin.get("data") or {}).get("prepared_md5"),
        "adapter_md5": (lin.get("outputs") or {}).get("adapter"),
    }


def _show(registry: Any, args: argparse.Namespace) -> int:
    out = {}
    for name in _names(registry, args.name):
        prod = registry.production(name)
        out[name] = {
            "production": prod.version if prod else None,
            "versions": [_summary(v) for v in registry.versions(name)],
            "history": [
                {
                    "number": a.number,
                    "version": a.version,
                    "at": a.created_at.isoformat(),
                    "message": a.message.strip().splitlines()[0] if a.message.strip() else "",
                }
                for a in registry.history(name)
            ],
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, info in out.items():
        print(f"{name}: production {info['production'] or 'none'}")
        for v in info["versions"]:
            gate = v["gate"] or {}
            verdict = (
                "-"
                if not gate
                else ("PASS" if gate.get("passed") else f"FAIL ({', '.join(gate.get('failed') or [])})")
            )
            cand = (v["metrics"] or {}).get("candidate") or {}
            base = (v["metrics"] or {}).get("base") or {}
            loss = cand.get("answer_loss")
            numbers = (
                f" answer_loss {loss:.4g} (base {base.get('answer_loss', float('nan')):.4g})"
                if loss is not None
                else ""
            )
            mark = "*" if v["version"] == info["production"] else " "
            print(
                f" {mark} {v['version']}  {v['created_at']}  commit {v['commit'][:12]}  "
                f"gate {verdict}{numbers}  data {str(v['data'])[:12]}"
            )
        for a in info["history"]:
            print(f"    {PROD}#{a['number']}: {a['version']} at {a['at']}  {a['message']}")
    return 0


def _who() -> str:
    done = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True)
    git_name = done.stdout.strip()
    return f"{getpass.getuser()}" + (f" ({git_name})" if git_name else "")


def _promote(registry: Any, args: argparse.Namespace) -> int:
    from loraline.registry.canary import provisional
    from loraline.release import on_canary

    names = _names(registry, args.name)
    params = _params()
    with registry.transaction():
        # refuse before moving anything, so a tenant's pair moves together
        notes = {name: allowed(registry.version(name, args.version), args.force, "promote") for name in names}
        for name in names:
            before = registry.production(name)
            msg = (
                f"Manual promotion of {name} {args.version} to {PROD} by "
                f"{_who()}{notes[name]}: {args.reason or 'no reason given'}"
            )
            canary = (
                params is not None and on_canary(params, before.version if before else None) and not args.no_canary
            )
            a = registry.promote(name, args.version, message=provisional(msg) if canary else msg)
            print(
                f"{name}: {PROD} {before.version if before else 'none'} -> {a.version} ({name}#{PROD}#{a.number})"
                + (", on canary (serve.canary)" if canary else "")
            )
    return 0


def _rollback(registry: Any, args: argparse.Namespace) -> int:
    for moved in rollback_artifacts(registry, _names(registry, args.name), _who(), force=args.force):
        a = moved.assignment
        print(
            f"{moved.name}: {PROD} {moved.was} -> {a.version} ({moved.name}#{PROD}#{a.number}, rollback by {_who()})"
        )
    return 0


def _release(registry: Any, args: argparse.Namespace) -> int:
    from loraline.config import load_params
    from loraline.release import release_shared

    params = load_params(args.params)
    for tenant in args.tenant or params.tenant_names:
        params.tenant_params(tenant)
        r = release_shared(Path.cwd(), params, tenant, registry, promote=not args.no_promote)
        new = "registered" if r.registered_new else "already registered"
        moved = (
            f"promoted, {PROD} {r.production_before or 'none'} -> {r.production_after}"
            if r.promoted
            else f"{PROD} stays {r.production_after or 'none'}"
        )
        print(f"release[{tenant}]: {r.version} {new}; {moved}; {r.reason}")
    return 0
