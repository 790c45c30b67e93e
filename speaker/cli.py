"""Command line: ``python -m speaker COMMAND``.

Each module in speaker/commands/ adds one subcommand through its
``register(subparsers, common)`` function, so a new command is a new module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

import speaker.commands
from speaker.engine import ExitCode
from speaker.logs import LEVELS, configure


def build_parser() -> argparse.ArgumentParser:
    # The logging options work before or after the command name, so they live
    # in a parent parser whose defaults do not overwrite the main parser's.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default=argparse.SUPPRESS,
        help="log rendering: console lines, JSON lines, or auto (console on a terminal, JSON otherwise)",
    )
    common.add_argument(
        "--log-level", choices=LEVELS, default=argparse.SUPPRESS, help="lowest level to log (default: info)"
    )

    parser = argparse.ArgumentParser(
        prog="python -m speaker",
        description="Trace containers through booting, running and shutdown, and enforce one syscall list per phase.",
        parents=[common],
        epilog="Exit codes: 0 success, 1 a component failed or an enforced container crashed, 2 invalid command "
        "line or pipeline file, 3 finished but incomplete (lost trace records, or a traced container was not "
        "found ready), 4 violations found while the violations sink's fail_on_violation option is true, "
        "130 aborted by a signal during setup or by a second signal.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(speaker.commands.__path__), key=lambda item: item.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"speaker.commands.{info.name}")
        module.register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(getattr(args, "log_format", "auto"), getattr(args, "log_level", "info"))
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return int(ExitCode.ABORTED)
    except BrokenPipeError:
        # The reader of stdout went away (as in `speaker components | head`).
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)


def exit_main() -> None:
    sys.exit(main())
