"""``report TRACE``: a timeline of a trace, as a terminal summary and PNG/SVG plots."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from speaker.engine import ExitCode
from speaker.report.plot import matplotlib_available, plot_timeline
from speaker.report.summary import render_summary
from speaker.report.timeline import ReportInputError, build_timelines, read_events

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "report",
        parents=[common],
        help="plot syscalls/s and distinct syscalls/s of a trace, with its phase boundaries",
        description="Print each traced container's phase boundaries and per-phase totals, and draw its timeline "
        "(syscalls per second, distinct syscalls per second, phases and detector reasons) as PNG and SVG. "
        "Plots need matplotlib (pip install 'speaker[plot]'); without it only the summary is printed.",
    )
    parser.add_argument("trace", metavar="TRACE", help="trace log written by the trace_log sink, or a jsonl event file")
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="directory for CONTAINER.png and CONTAINER.svg (default: TRACE's name with -report, next to it)",
    )
    parser.add_argument("--container", action="append", default=[], metavar="ID_OR_NAME", help="report only these containers (repeatable)")
    parser.add_argument("--no-plot", action="store_true", help="print the summary only")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    path = Path(args.trace)
    try:
        timelines = build_timelines(read_events(path))
    except ReportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    selected = [
        timeline
        for timeline in timelines.values()
        if not args.container or any(timeline.container_id.startswith(item) or timeline.name == item for item in args.container)
    ]
    if not selected:
        print(f"error: {path} has no syscalls or phases of {'the given containers' if args.container else 'any container'}", file=sys.stderr)
        return ExitCode.USAGE
    for timeline in selected:
        try:
            timeline.check_span()
        except ReportInputError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return ExitCode.USAGE
    plot = not args.no_plot
    if plot and not matplotlib_available():
        print("note: matplotlib is not installed, so no plots are drawn; install it with pip install 'speaker[plot]'", file=sys.stderr)
        plot = False
    output = Path(args.output) if args.output else path.with_name(path.stem + "-report")
    if plot and os.path.lexists(output) and not os.path.isdir(output):
        print(f"error: {output}: is a file, not a directory; pass a new or existing directory to -o", file=sys.stderr)
        return ExitCode.USAGE
    for timeline in selected:
        sys.stdout.write(render_summary(timeline))
        if plot:
            name = _UNSAFE_NAME.sub("_", timeline.label).strip("._") or timeline.container_id[:12]
            try:
                written_paths = plot_timeline(timeline, output / name)
            except OSError as exc:
                print(f"error: {output / name}: cannot write the plot: {exc.strerror or exc}", file=sys.stderr)
                return ExitCode.USAGE
            for written in written_paths:
                print(f"  wrote {written}")
    return ExitCode.OK
