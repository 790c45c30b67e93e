"""``validate FILE``: check a pipeline file without starting anything."""

from __future__ import annotations

import argparse

from speaker.commands._common import load_or_report
from speaker.engine import ExitCode, topological_order


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "validate",
        parents=[common],
        help="check a pipeline file and print its components",
        description="Check types, options, inputs, cycles and event types, then print the graph. Starts nothing.",
    )
    parser.add_argument("file", help="pipeline file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.NAME.KEY=VALUE")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    spec = load_or_report(args.file, args.overrides)
    if spec is None:
        return ExitCode.USAGE
    print(f"{spec.path}: valid, {len(spec.components)} components")
    for name in topological_order(spec):
        component = spec.components[name]
        inputs = f" <- {', '.join(component.inputs)}" if component.inputs else ""
        print(f"  {component.section}.{name} ({component.type_name}){inputs}")
    return ExitCode.OK
