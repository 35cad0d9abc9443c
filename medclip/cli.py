"""The `medclip` command. Each feature module contributes its own subcommands via `register`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medclip.errors import MedclipError

# Modules that define `register(subparsers)`; each adds its own subcommands.
COMMAND_MODULES = [
    "medclip.info",
    "medclip.concepts.cli",
    "medclip.evaluation.cli",
    "medclip.data.cli",
    "medclip.training.cli",
    "medclip.models.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip", description="Medical CLIP pretraining and evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MedclipError as exc:
        print(f"medclip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medclip: interrupted", file=sys.stderr)
        return 130
