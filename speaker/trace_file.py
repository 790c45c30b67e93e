"""The trace log format: constants shared by the ``trace_log`` sink and its reader.

A trace log is a JSON lines file. Its first line is a header,
``{"type": "trace_log", "version": 1, "created": EPOCH_SECONDS}``. Every
other line is either an event as ``Event.to_dict`` writes it (ContainerEvent,
PhaseChange, ProcessSample, ContainerOutput, RecordLoss, TraceIncomplete) or
a syscall row::

    {"type": "syscall_second", "container_id": "...", "second": 1796411519,
     "phase": "running", "start_time": 1796411519.02, "end_time": 1796411519.98,
     "syscalls": {"x86_64": {"epoll_wait": 10, "read": 3}},
     "spans": {"x86_64": {"epoll_wait": [1796411519.02, 1796411519.98], "read": [1796411519.5, 1796411519.6]}}}

A row contains the syscalls of one container whose records started in one
second of kernel time and were assigned to one phase, with the first and
last record times. ``spans``, present when the audit sources tracked them,
gives the first and last record time of each syscall, so that ``rephase``
can place each syscall exactly. Several rows may share a key; readers add
them up.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

from speaker.events import Event, Phase, SyscallCounts, SyscallKey, event_from_dict
from speaker.syscalls import UNKNOWN_PREFIX, UnknownSyscall, syscall_number

HEADER_TYPE = "trace_log"
ROW_TYPE = "syscall_second"
FORMAT_VERSION = 1
#: Latest accepted time, 9999-12-31T23:59:59Z in seconds since the epoch.
MAX_TIME = 253402300799
BOM = b"\xef\xbb\xbf"


class TraceFileError(ValueError):
    """An unreadable trace log. The message names the file and line."""


def read_trace(path: Path | str) -> Iterator[Event]:
    """Yield the events of a trace log in file order, with each syscall row as one SyscallCounts.

    Raises TraceFileError for a missing header, a newer format version or an
    invalid line, such as one that is not UTF-8, JSON nested too deeply, or a
    time that is not finite or lies outside the years 1970 to 9999.
    """
    path = Path(path)
    try:
        # Binary, so that a byte that is not UTF-8 is reported with its line.
        handle = path.open("rb")
    except OSError as exc:
        raise TraceFileError(f"{path}: cannot open the trace log: {_reason(exc)}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            data = decode_line(path, number, raw)
            if data is None:
                continue
            if number == 1:
                _check_header(path, data)
                continue
            try:
                if isinstance(data, dict) and data.get("type") == ROW_TYPE:
                    event: Event = row_event(data)
                else:
                    event = event_from_dict(data)
                    check_event_times(event)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TraceFileError(f"{path}:{number}: invalid trace line: {clip_message(str(exc))}") from None
            yield event


def decode_line(path: Path, number: int, raw: bytes) -> object | None:
    """Parse one JSON line, or return None for a blank line. Raises TraceFileError naming the line.

    A UTF-8 byte order mark at the start of the file is skipped.
    """
    if number == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceFileError(
            f"{path}:{number}: invalid trace line: byte {exc.start + 1} is not UTF-8 text ({raw[exc.start]:#04x})"
        ) from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFileError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise TraceFileError(f"{path}:{number}: invalid JSON: arrays or objects are nested too deeply") from None


def clip_message(text: str, limit: int = 300) -> str:
    """Cut an error text that echoes a huge value from the file."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters in all)"


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _check_header(path: Path, data: object) -> None:
    if not isinstance(data, dict) or data.get("type") != HEADER_TYPE:
        raise TraceFileError(
            f"{path}:1: not a trace log: the first line must be the trace_log header that the trace_log sink writes"
        )
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise TraceFileError(
            f"{path}:1: trace log version {version!r} is not supported; this SPEAKER reads version {FORMAT_VERSION}"
        )


def row_event(data: dict) -> SyscallCounts:
    """Turn a syscall row into a SyscallCounts with summed pids, for the phase machine and profiles.

    Raises ValueError naming the field for a count that is not a whole number
    of 0 or more, or a time that ``check_time`` rejects.
    """
    start_time = check_time("start_time", data["start_time"])
    end_time = check_time("end_time", data["end_time"])
    if end_time < start_time:
        raise ValueError(f"end_time {end_time!r} is before start_time {start_time!r}")
    second = data.get("second")
    if second is not None and (isinstance(second, bool) or second != math.floor(start_time)):
        raise ValueError(f"second must be the whole second of start_time, {math.floor(start_time)}, got {_shorten(second)}")
    counts: dict[SyscallKey, int] = {}
    for arch, names in data["syscalls"].items():
        for name, count in names.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"the count of {_shorten(name)} on {_shorten(arch)} must be a whole number of 0 or more, got {_shorten(count)}")
            key = SyscallKey(0, arch, _number(arch, name), name)
            counts[key] = counts.get(key, 0) + count
    spans: dict[SyscallKey, tuple[float, float]] = {}
    for arch, names in data.get("spans", {}).items():
        for name, (first, last) in names.items():
            where = f"spans.{arch}.{name}"
            first, last = check_time(where, first), check_time(where, last)
            if last < first:
                raise ValueError(f"{_shorten(where)}: the last call {last!r} is before the first {first!r}")
            spans[SyscallKey(0, arch, _number(arch, name), name)] = (first, last)
    phase = data.get("phase")
    return SyscallCounts(
        container_id=data["container_id"],
        start_time=start_time,
        end_time=end_time,
        counts=counts,
        spans=spans,
        source="trace_log",
        phase=Phase(phase) if phase else None,
    )


def check_time(field: str, value: object) -> float:
    """Return ``value`` as seconds since the epoch, or raise ValueError naming ``field``.

    A time must be a finite number from 0 to ``MAX_TIME``: later times have
    no calendar date in Python, so profile.json could not record them.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a time in seconds, got {_shorten(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be a finite time in seconds, got {_json_number(value)}")
    if not 0 <= value <= MAX_TIME:
        raise ValueError(f"{field} must be seconds since the epoch from 0 to {MAX_TIME} (the end of the year 9999), got {value!r}")
    return float(value)


def check_event_times(event: Event) -> None:
    """Raise ValueError for a float field of ``event`` that is not finite, or a wall-clock time out of range.

    ``mono_time`` counts from the host's boot, so only its finiteness is checked.
    """
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if not isinstance(value, float):
            continue
        if field.name == "mono_time":
            if not math.isfinite(value):
                raise ValueError(f"mono_time must be a finite time in seconds, got {_json_number(value)}")
            continue
        check_time(field.name, value)


def _json_number(value: float) -> str:
    """Spell a non-finite float as the JSON line did: NaN, Infinity or -Infinity."""
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _shorten(value: object, limit: int = 60) -> str:
    """Return ``repr(value)`` cut to about ``limit`` characters, so an error never echoes a huge value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _number(arch: str, name: str) -> int:
    if name.startswith(UNKNOWN_PREFIX):
        return int(name.rsplit(":", 1)[1])
    try:
        return syscall_number(arch, name)
    except UnknownSyscall:
        return -1
