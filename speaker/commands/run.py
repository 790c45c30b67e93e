"""``run FILE``: run a pipeline until its sources finish or it is stopped."""

from __future__ import annotations

import argparse
import sys

import anyio

from speaker.commands._common import load_or_report
from speaker.engine import ExitCode, run_pipeline


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "run",
        parents=[common],
        help="run a pipeline file",
        description="Run a pipeline. The first SIGINT, SIGTERM or SIGHUP stops it gracefully (sinks flush); a second aborts.",
    )
    parser.add_argument("file", help="pipeline file, such as pipelines/trace.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.NAME.KEY=VALUE",
        help="override one option; VALUE is read as TOML, or as a string if that fails (repeatable)",
    )
    parser.add_argument(
        "--allow-loss",
        action="store_true",
        help="exit 0 even when records were lost; the output is still marked incomplete",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    spec = load_or_report(args.file, args.overrides)
    if spec is None:
        return ExitCode.USAGE
    result = anyio.run(run_pipeline, spec)
    for failure in result.failures:
        print(f"error: {failure.component} failed during {failure.during}: {failure.error}", file=sys.stderr)
    for problem in result.problems:
        print(f"{'error' if problem in result.errors else 'warning'}: {problem}", file=sys.stderr)
    if result.exit_code == ExitCode.ABORTED:
        print(f"error: aborted ({result.stop_reason}); sinks may not have flushed", file=sys.stderr)
    if result.exit_code == ExitCode.INCOMPLETE and args.allow_loss:
        return ExitCode.OK
    return result.exit_code
