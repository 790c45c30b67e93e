"""``rephase TRACE``: split a recorded trace into phases again, with another detector."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import structlog

from speaker.detectors import DetectorSpec, parse_detector
from speaker.engine import ExitCode
from speaker.events import PHASES, Event, PhaseChange, SyscallCounts, SyscallRecord, TraceIncomplete
from speaker.options import Duration, OptionError
from speaker.phase_tracker import PhaseMachine, PhaseSettings, event_time
from speaker.profiles.builder import ProfileBuilder
from speaker.profiles.directory import write_profile_dir
from speaker.trace_file import TraceFileError, read_trace

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "rephase",
        parents=[common],
        help="recompute the phases of a recorded trace log with another detector",
        description="Replay a trace log written by the trace_log sink through the phase machine with the given "
        "readiness detector, and write one profile directory per container. Nothing is run again.",
    )
    parser.add_argument("trace", type=Path, help="trace log (JSON lines) written by the trace_log sink")
    parser.add_argument(
        "--detector",
        required=True,
        help='readiness detector: a type name such as window, or a TOML inline table such as '
        '\'{type="listen", port=6379}\' or \'{any=[{type="log", pattern="ready"}, {type="delay", after="30s"}]}\'',
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="directory that receives one profile directory per container"
    )
    parser.add_argument(
        "--ready-timeout",
        default="2m",
        help="maximum time from a container's start to readiness, such as 90s (default: 2m)",
    )
    parser.add_argument(
        "--allow-loss",
        action="store_true",
        help="exit 0 even when a profile is incomplete; it is still marked incomplete",
    )
    parser.set_defaults(handler=handle)


def parse_detector_argument(text: str) -> DetectorSpec:
    """Parse ``--detector``: a bare type name or a TOML inline table. Raises OptionError."""
    stripped = text.strip()
    value: Any = stripped
    if stripped.startswith("{"):
        try:
            value = tomllib.loads(f"detector = {stripped}")["detector"]
        except tomllib.TOMLDecodeError as exc:
            raise OptionError(f"invalid TOML inline table {stripped!r}: {exc}") from None
    return parse_detector(value)


def handle(args: argparse.Namespace) -> int:
    try:
        detector = parse_detector_argument(args.detector)
    except OptionError as exc:
        where = f" at {exc.key_path.lstrip('.')}" if exc.key_path else ""
        print(f"error: --detector{where}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        timeout = Duration.parse(args.ready_timeout)
    except ValueError as exc:
        print(f"error: --ready-timeout: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        events = load_events(args.trace)
    except TraceFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        print(f"error: {args.output}: is a file, not a directory; pass a new or existing directory to -o", file=sys.stderr)
        return ExitCode.USAGE
    log = structlog.get_logger("speaker").bind(command="rephase")
    builder = rephase(events, detector, float(timeout), log, source=f"rephase {args.trace}")
    if not builder.containers:
        print(f"error: {args.trace} contains no container events or syscalls", file=sys.stderr)
        return ExitCode.USAGE
    return write_profiles(builder, args.output, args.allow_loss)


def load_events(path: Path) -> list[Event]:
    """Read a trace log, leaving out the phases of the recorded run, in order of event time.

    Raises TraceFileError.
    """
    events = [event for event in read_trace(path) if not isinstance(event, (PhaseChange, TraceIncomplete))]
    # The log writes syscall rows in bursts, after the events of the same
    # seconds; the phase machine needs them in time order.
    events.sort(key=event_time)
    return events


def rephase(events: list[Event], detector: DetectorSpec, ready_timeout: float, log: Any, source: str) -> ProfileBuilder:
    """Run ``events`` through a phase machine with ``detector`` and collect the profiles."""
    # Every event is present and sorted, so nothing arrives late: lag 0.
    machine = PhaseMachine(PhaseSettings(detector, ready_timeout, lag=0.0), log)
    builder = ProfileBuilder(source=source)
    for event in events:
        builder.add_all(machine.feed(event))
        if not isinstance(event, (SyscallCounts, SyscallRecord)):
            builder.add_all(machine.advance(machine.latest))
    builder.add_all(machine.advance(machine.latest))
    builder.add_all(machine.finish())
    return builder


def write_profiles(builder: ProfileBuilder, output: Path, allow_loss: bool) -> int:
    code = ExitCode.OK
    used: set[str] = set()
    for container_id in builder.container_ids():
        profile = builder.profile(container_id)
        trace = profile.traces[0]
        base = _UNSAFE_NAME.sub("_", trace.container_name).strip("._") or container_id[:12]
        name = base if base not in used else f"{base}-{container_id[:12]}"
        used.add(name)
        try:
            written = write_profile_dir(profile, output / name)
        except OSError as exc:
            print(f"error: {output / name}: cannot write the profile: {exc.strerror or exc}", file=sys.stderr)
            return ExitCode.USAGE
        sizes = ", ".join(f"{phase.value} {len(profile.phase(phase))}" for phase in PHASES)
        print(f"{written.directory}: {sizes} syscalls; detector {trace.detector or 'none'}")
        for warning in written.warnings:
            print(f"  note: {warning}")
        if not profile.complete:
            code = ExitCode.INCOMPLETE
            for problem in trace.problems:
                print(f"  incomplete: {problem}", file=sys.stderr)
    if code == ExitCode.INCOMPLETE and allow_loss:
        return ExitCode.OK
    return code
