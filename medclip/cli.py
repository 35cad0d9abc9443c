"""The `medclip` command. Each feature module contributes its own subcommands via `register`.

Building the parser imports no torch (feature modules import their heavy dependencies inside their
command functions), so `--help` and `--version` answer at once. Every failure ends in one
`medclip: error: ...` line: exit code 2 for bad input or an unusable environment, 1 for anything
unexpected; `--debug` (or MEDCLIP_DEBUG=1) prints the traceback first.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from medclip import __version__
from medclip.errors import MedclipError, os_error_line, worker_message

# Modules that define `register(subparsers)`; each adds its own subcommands.
COMMAND_MODULES = [
    "medclip.info",
    "medclip.concepts.cli",
    "medclip.evaluation.cli",
    "medclip.data.cli",
    "medclip.training.cli",
    "medclip.models.cli",
]
DEBUG_ENV = "MEDCLIP_DEBUG"
USER_ERROR, INTERNAL_ERROR, INTERRUPTED = 2, 1, 130

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip", description="Medical CLIP pretraining and evaluation.")
    parser.add_argument("--version", action="version", version=f"medclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error (or set {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def describe_error(exc: BaseException) -> tuple[str, int]:
    """One line saying what went wrong and how to fix it, and the exit code."""
    if isinstance(exc, MedclipError):
        return _one_line(str(exc)), USER_ERROR
    if isinstance(exc, OSError) and os_error_line(exc):
        return os_error_line(exc), USER_ERROR
    text = _one_line(worker_message(str(exc))) or "(no message)"
    return (f"unexpected {type(exc).__name__}: {text} (a bug? rerun with --debug for the traceback and "
            f"report it)"), INTERNAL_ERROR


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def debug_requested(args: argparse.Namespace) -> bool:
    return args.debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None, **command_options) -> int:
    """Run ``medclip ARGV``; ``command_options`` go to the command's function as keyword arguments (what a
    caller hands in that a command line cannot carry: the rehearsal gives `pretrain` its callbacks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--debug` is accepted after the subcommand too (`medclip pretrain ... --debug`).
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args, **command_options) or 0)
    except KeyboardInterrupt:
        print("medclip: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        if debug_requested(args):
            traceback.print_exc()
        message, code = describe_error(exc)
        print(f"medclip: error: {message}", file=sys.stderr)
        return code
