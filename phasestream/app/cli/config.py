"""``phasestream config`` (the effective configuration and where each value came from) and
``phasestream deploy check`` (is this host ready to start the services with it)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from phasestream.app.settings import describe, problems

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="the effective configuration, where each value came from, "
                                                  "secrets masked, and what is wrong with it")
    config.add_argument("--json", action="store_true")
    deploy = subparsers.add_parser("deploy", help="deployment checks (deploy check)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    check = deploy_sub.add_parser("check", help="validate the configuration on this host before starting: "
                                                "folders, database, Redis, ports, the API key")
    check.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    return run_config(args) if args.command == "config" else run_deploy_check(args)


def run_config(args: argparse.Namespace) -> int:
    """Print every setting with its source; exit status 1 when one is wrong (an error, not a warning)."""
    rows = describe(args.loaded)
    found = problems(args.settings)
    if args.json:
        print(json.dumps({"config_file": str(args.loaded.config_file or ""), "settings": rows,
                          "problems": [asdict(p) for p in found]}, indent=2))
    else:
        print(f"configuration file: {args.loaded.config_file or 'none (--config FILE or $PHASESTREAM_CONFIG)'}")
        width = max(len(r["variable"]) for r in rows)
        for r in rows:
            print(f"{r['variable']:<{width}}  {r['value'] or '-':<40}  {r['source']}")
        for p in found:
            print(f"{p.level.upper()}: {p.message}")
    return 1 if any(p.level == "error" for p in found) else 0


def run_deploy_check(args: argparse.Namespace) -> int:
    """One line per check; exit status 1 when one is an error."""
    from phasestream.app.deploycheck import deploy_check

    checks = deploy_check(args.settings)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{c.level.upper():<8} {c.name:<24} {c.detail}")
        errors = sum(c.level == "error" for c in checks)
        print(f"{len(checks)} checks, {errors} errors" + ("" if errors else ": ready to start"))
    return 1 if any(c.level == "error" for c in checks) else 0
