"""The error every profile reader and writer raises for bad input."""

from __future__ import annotations

from pathlib import Path


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
