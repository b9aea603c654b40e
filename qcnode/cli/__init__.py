"""``qcnode`` command line: one sub-command module per stage registers its commands."""
from __future__ import annotations

import argparse
import importlib
import sys

from qcnode.config import ConfigError

# Each module has ``register(subparsers)``; it must not import torch at module level.
COMMAND_MODULES = (
    "qcnode.cli.simulate",  # simulate
    "qcnode.cli.model",      # train, evaluate, score
    "qcnode.cli.validate",  # validate
    "qcnode.cli.service",  # serve, status, db
    "qcnode.cli.audit",    # audit
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command."""
    parser = argparse.ArgumentParser(prog="qcnode", description="Quality-control node for low-dose CT")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # stage not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qcnode`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # any command: one line, no traceback
        name = " ".join(n for n in (args.command, getattr(args, "db_command", None)) if n)
        print(f"qcnode {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

