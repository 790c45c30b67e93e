"""The error every profile reader and writer raises for bad input."""

from __future__ import annotations

from pathlib import Path

from speaker.compile.arches import UnknownSyscall, check_syscall, syscall_table


class ProfileError(ValueError):
    """Invalid profile input. ``str()`` gives ``FILE[:LINE]: message``."""

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        if self.path is None:
            return self.message
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


def line_of(text: str, needle: str, start: int = 0) -> int | None:
    """Return the 1-based line of the first ``needle`` in ``text`` at or after ``start``, or None.

    JSON and YAML parsers do not report where a value came from, so the
    readers find the line of a bad value by searching for its text.
    """
    position = text.find(needle, start)
    if position < 0:
        return None
    return text.count("\n", 0, position) + 1


#: Longer than any syscall name in libseccomp's tables, so messages cut a longer name.
MAX_NAME_LENGTH = 64


def shorten_name(name: str) -> str:
    """Return ``repr(name)``, cut after ``MAX_NAME_LENGTH`` characters so that an error never echoes a huge value."""
    if len(name) <= MAX_NAME_LENGTH:
        return repr(name)
    return f"{name[:MAX_NAME_LENGTH]!r}... ({len(name)} characters)"


def unknown_name_message(name: str, arch: str) -> str:
    """Explain why ``name`` is not a syscall of ``arch``, with the closest known name where there is one."""
    if len(name) > MAX_NAME_LENGTH:
        return f"{shorten_name(name)} is not a syscall name: it is longer than any syscall name"
    lower = name.lower()
    if lower != name and syscall_table(arch).number(lower) is not None:
        return f"unknown syscall name {name!r}: syscall names are lower case; did you mean {lower!r}?"
    try:
        check_syscall(arch, name)
    except UnknownSyscall as exc:
        return str(exc)
    return f"unknown syscall name {name!r}"


NESTED_TOO_DEEPLY = "invalid JSON: arrays or objects are nested too deeply"
