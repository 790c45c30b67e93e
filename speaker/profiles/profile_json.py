"""SPEAKER's own profile.json: names, numbers and counts per arch and phase, with provenance.

The file is JSON with sorted names and fixed key order, so writing a profile
that was read from profile.json gives the same bytes. ``complete`` and
``problems`` at the top are summaries for people and other tools; on reading,
completeness comes from the ``traces`` entries.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from speaker.compile.arches import KNOWN_ARCHES, host_arches, syscall_table
from speaker.events import PHASES, Phase
from speaker.profiles.errors import NESTED_TOO_DEEPLY, ProfileError, line_of, shorten_name, unknown_name_message
from speaker.profiles.files import read_text
from speaker.profiles.model import Profile, TraceInfo, Transition

FORMAT = "speaker-profile"
VERSION = 1
FILE_NAME = "profile.json"

# The JSON types each scalar TraceInfo field accepts; an int is a valid float in JSON.
_TRACE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "container_id": (str,),
    "container_name": (str,),
    "image": (str,),
    "source": (str,),
    "started": (int, float),
    "ended": (int, float),
    "kernel": (str,),
    "docker_version": (str,),
    "speaker_version": (str,),
    "libseccomp_version": (str,),
    "detector": (str,),
    "exit_code": (int,),
    "complete": (bool,),
}
_OPTIONAL_TRACE_FIELDS = frozenset({"started", "ended", "exit_code"})
_TYPE_NAMES = {str: "a string", int: "a number", float: "a number", bool: "true or false"}


@dataclasses.dataclass
class FilterRecord:
    """Compile settings of the Docker JSON files next to a profile.json, so a reader can see the invariants."""

    default_action: str
    arch_lists: str
    #: Syscalls whose action a safety invariant set, with that action, such as ``{"clone3": "errno:ENOSYS"}``.
    invariants: dict[str, str]
    #: File names by what they enforce, such as ``{"booting": "docker-booting.json"}``.
    files: dict[str, str]


def dump_profile(profile: Profile, filters: FilterRecord | None = None) -> str:
    """Return the profile.json text of ``profile``, ending in a newline."""
    data: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created": profile.created,
        "complete": profile.complete,
        "problems": profile.problems,
        "arches": {arch: _dump_arch(profile, arch) for arch in _ordered_arches(profile)},
        "traces": [_dump_trace(trace) for trace in profile.traces],
        "notes": list(profile.notes),
    }
    if filters is not None:
        data["filters"] = dataclasses.asdict(filters)
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_profile_json(profile: Profile, path: Path, filters: FilterRecord | None = None) -> None:
    from speaker.profiles.speaker_lists import write_atomic

    write_atomic(path, dump_profile(profile, filters))


def read_profile_json(path: Path) -> tuple[Profile, FilterRecord | None]:
    """Read a profile.json. Raises ProfileError naming the file and, where it can, the line."""
    return parse_profile_json(read_text(path, "a SPEAKER profile"), path)


def parse_profile_json(text: str, path: Path | str) -> tuple[Profile, FilterRecord | None]:
    """Parse profile.json ``text``; ``path`` only names the file in errors."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=exc.lineno) from None
    except RecursionError:
        raise ProfileError(NESTED_TOO_DEEPLY, path=path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(
            f'not a SPEAKER profile: profile.json starts with "format": "{FORMAT}". '
            "For a Docker or OCI seccomp profile, pass that file itself",
            path=path,
        )
    if data.get("version") != VERSION:
        raise ProfileError(
            f"unsupported profile.json version {data.get('version')!r}: this SPEAKER reads version {VERSION}",
            path=path,
            line=line_of(text, '"version"'),
        )
    reader = _Reader(text, path)
    if not isinstance(data.get("complete", False), bool):
        raise reader.error(f'"complete" must be true or false, got {_shorten(data["complete"])}', '"complete"')
    profile = Profile(created=str(data.get("created", "")))
    arches = reader.mapping(data.get("arches"), "arches")
    for arch, phases in arches.items():
        reader.read_arch(profile, arch, phases)

    traces = reader.sequence(data.get("traces", []), "traces")
    profile.traces = [reader.trace(item, index) for index, item in enumerate(traces)]
    profile.notes = [str(note) for note in reader.sequence(data.get("notes", []), "notes")]
    return profile, _filter_record(data.get("filters"))


def _filter_record(raw: Any) -> FilterRecord | None:
    if not isinstance(raw, dict):
        return None
    invariants, files = raw.get("invariants", {}), raw.get("files", {})
    return FilterRecord(
        default_action=str(raw.get("default_action", "")),
        arch_lists=str(raw.get("arch_lists", "")),
        invariants={str(key): str(value) for key, value in invariants.items()} if isinstance(invariants, dict) else {},
        files={str(key): str(value) for key, value in files.items()} if isinstance(files, dict) else {},
    )


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a count must be a whole number of 0 or more, got {_shorten(value)}")
    return value


class _Reader:
    """Checks the parts of a parsed profile.json, raising ProfileError with a line where it can find one."""

    def __init__(self, text: str, path: Path | str) -> None:
        self.text = text
        self.path = path

    def error(self, message: str, needle: str | None = None, start: int = 0) -> ProfileError:
        line = line_of(self.text, needle, start) if needle else None
        return ProfileError(message, path=self.path, line=line)

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"{key!r} must be an object", f'"{key}"')
        return value

    def sequence(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(f"{key!r} must be a list", f'"{key}"')
        return value

    def read_arch(self, profile: Profile, arch: str, phases: Any) -> None:
        arch_start = self.text.find(f'"{arch}"')
        if arch not in host_arches():
            if arch in KNOWN_ARCHES:
                raise self.error(
                    f"this profile is for {arch}, but this host enforces only {', '.join(host_arches())}: "
                    "trace the container on a host of that architecture",
                    f'"{arch}"',
                )
            raise self.error(f"unknown architecture {arch!r}: expected one of {', '.join(host_arches())}", f'"{arch}"')
        phases = self.mapping(phases, f"arches.{arch}")
        for key in phases:
            if key not in {phase.value for phase in PHASES}:
                raise self.error(f"unknown phase {key!r} under {arch}: expected booting, running or shutdown", f'"{key}"', arch_start)
        profile.syscalls.setdefault(arch, {phase: set() for phase in PHASES})
        table = syscall_table(arch)
        for phase in PHASES:
            phase_start = self.text.find(f'"{phase.value}"', max(arch_start, 0))
            for entry in self.sequence(phases.get(phase.value, []), f"arches.{arch}.{phase.value}"):
                name, nr, calls = self._entry(entry, arch, phase, phase_start)
                if name in profile.syscalls[arch][phase]:
                    raise self.error(f"duplicate syscall {shorten_name(name)} in {arch} {phase}", f'"{name}"', phase_start)
                known_nr = table.number(name)
                if known_nr is None:
                    raise self.error(f"{unknown_name_message(name, arch)} (in {arch} {phase})", f'"{name}"', phase_start)
                if nr is not None and nr != known_nr:
                    raise self.error(
                        f"{name} has number {nr} here, but libseccomp numbers it {known_nr} on {arch}: "
                        "the file was edited or written for another kernel ABI; remove the \"nr\" field to trust the name",
                        f'"{name}"',
                        phase_start,
                    )
                profile.add(arch, phase, name, calls)

    def _entry(self, entry: Any, arch: str, phase: Phase, start: int) -> tuple[str, int | None, int]:
        if isinstance(entry, str):
            return entry, None, 0
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise self.error(f"each entry of {arch} {phase} must be a name or an object with \"name\"", None)
        nr = entry.get("nr")
        calls = entry.get("calls", 0)
        if nr is not None and not isinstance(nr, int):
            raise self.error(f"\"nr\" of {entry['name']} must be an integer", f'"{entry["name"]}"', start)
        if not isinstance(calls, int) or calls < 0:
            raise self.error(f"\"calls\" of {entry['name']} must be a count of 0 or more", f'"{entry["name"]}"', start)
        return entry["name"], nr, calls

    def trace(self, item: Any, index: int) -> TraceInfo:
        if not isinstance(item, dict):
            raise self.error(f"traces[{index}] must be an object", '"traces"')
        trace = TraceInfo()
        for field in dataclasses.fields(TraceInfo):
            if field.name in ("transitions", "lost", "unresolved", "problems") or field.name not in item:
                continue
            setattr(trace, field.name, self.trace_field(field.name, item[field.name], index))
        trace.transitions = [self.transition(raw, index) for raw in self.sequence(item.get("transitions", []), "transitions")]
        try:
            trace.lost = {str(key): _count(value) for key, value in self.mapping(item.get("lost", {}), "lost").items()}
            trace.unresolved = {
                str(arch): {int(nr): _count(calls) for nr, calls in self.mapping(numbers, "unresolved").items()}
                for arch, numbers in self.mapping(item.get("unresolved", {}), "unresolved").items()
            }
        except ValueError as exc:
            raise self.error(f"traces[{index}]: {exc}", '"traces"') from None
        trace.problems = [str(problem) for problem in self.sequence(item.get("problems", []), "problems")]
        return trace

    def trace_field(self, name: str, value: Any, index: int) -> Any:
        """Return ``value`` when it has the type of TraceInfo field ``name``, else raise ProfileError."""
        expected = _TRACE_FIELD_TYPES[name]
        valid = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        if value is None and name in _OPTIONAL_TRACE_FIELDS:
            valid = True
        if not valid:
            kind = " or ".join(dict.fromkeys(_TYPE_NAMES[item] for item in expected))
            raise self.error(f"traces[{index}].{name} must be {kind}, got {_shorten(value)}", f'"{name}"', self.text.find('"traces"'))
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(f"traces[{index}].{name} must be a finite time in seconds", f'"{name}"', self.text.find('"traces"'))
        return value

    def transition(self, raw: Any, index: int) -> Transition:
        if not isinstance(raw, dict):
            raise self.error(f"a transition of traces[{index}] must be an object", '"transitions"')
        try:
            phase = Phase(raw["phase"])
            previous = Phase(raw["previous"]) if raw.get("previous") else None
            time = raw["time"]
            if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
                raise ValueError(f'"time" must be a finite number of seconds, got {_shorten(time)}')
        except (KeyError, ValueError, TypeError) as exc:
            raise self.error(f"invalid transition in traces[{index}]: {exc}", '"transitions"') from None
        time = float(time)
        return Transition(phase, previous, time, str(raw.get("reason", "")), str(raw.get("detector", "")))


def _shorten(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else f"{text[:60]}... ({len(text)} characters)"


def _ordered_arches(profile: Profile) -> list[str]:
    order = {arch: index for index, arch in enumerate(host_arches())}
    return sorted(profile.syscalls, key=lambda arch: (order.get(arch, len(order)), arch))


def _dump_arch(profile: Profile, arch: str) -> dict[str, list[dict[str, Any]]]:
    table = syscall_table(arch)
    result = {}
    for phase in PHASES:
        entries = []
        for name in sorted(profile.phase(phase, arch)):
            entry: dict[str, Any] = {"name": name, "nr": table.number(name)}
            calls = profile.calls(arch, phase, name)
            if calls is not None:
                entry["calls"] = calls
            entries.append(entry)
        result[phase.value] = entries
    return result


def _dump_trace(trace: TraceInfo) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for field in dataclasses.fields(TraceInfo):
        value = getattr(trace, field.name)
        if field.name == "transitions":
            value = [
                {
                    "phase": item.phase.value,
                    "previous": item.previous.value if item.previous else None,
                    "time": item.time,
                    "time_utc": _utc(item.time),
                    "reason": item.reason,
                    "detector": item.detector,
                }
                for item in value
            ]
        elif field.name == "unresolved":
            value = {arch: {str(nr): calls for nr, calls in sorted(numbers.items())} for arch, numbers in value.items()}
        elif field.name == "lost":
            value = dict(sorted(value.items()))
        data[field.name] = value
    return data


def _utc(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
