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

import json
from collections.abc import Iterator
from pathlib import Path

from speaker.events import Event, Phase, SyscallCounts, SyscallKey, event_from_dict
from speaker.syscalls import UNKNOWN_PREFIX, UnknownSyscall, syscall_number

HEADER_TYPE = "trace_log"
ROW_TYPE = "syscall_second"
FORMAT_VERSION = 1


class TraceFileError(ValueError):
    """An unreadable trace log. The message names the file and line."""


def read_trace(path: Path | str) -> Iterator[Event]:
    """Yield the events of a trace log in file order, with each syscall row as one SyscallCounts.

    Raises TraceFileError for a missing header, a newer format version or an
    invalid line.
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise TraceFileError(f"{path}: cannot open the trace log: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFileError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
            if number == 1:
                _check_header(path, data)
                continue
            try:
                if data.get("type") == ROW_TYPE:
                    yield row_event(data)
                else:
                    yield event_from_dict(data)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TraceFileError(f"{path}:{number}: invalid trace line: {exc}") from None


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
    """Turn a syscall row into a SyscallCounts with summed pids, for the phase machine and profiles."""
    counts: dict[SyscallKey, int] = {}
    for arch, names in data["syscalls"].items():
        for name, count in names.items():
            key = SyscallKey(0, arch, _number(arch, name), name)
            counts[key] = counts.get(key, 0) + int(count)
    spans: dict[SyscallKey, tuple[float, float]] = {}
    for arch, names in data.get("spans", {}).items():
        for name, (first, last) in names.items():
            spans[SyscallKey(0, arch, _number(arch, name), name)] = (float(first), float(last))
    phase = data.get("phase")
    return SyscallCounts(
        container_id=data["container_id"],
        start_time=float(data["start_time"]),
        end_time=float(data["end_time"]),
        counts=counts,
        spans=spans,
        source="trace_log",
        phase=Phase(phase) if phase else None,
    )


def _number(arch: str, name: str) -> int:
    if name.startswith(UNKNOWN_PREFIX):
        return int(name.rsplit(":", 1)[1])
    try:
        return syscall_number(arch, name)
    except UnknownSyscall:
        return -1
