"""The original SPEAKER format: one file per phase, one syscall name per line.

A directory contains ``booting``, ``running`` and ``shutdown``. SPEAKER writes the
names sorted, each followed by a newline, so reading a directory it wrote and
writing it back gives the same bytes. The files carry no architecture: on
reading, each name goes to the host's native arch, or to the first compat
arch that has it (``mmap2`` goes to x86), and on writing each file lists the
union over arches. The original tool wrote names in arbitrary order; such
directories read fine and are written back sorted.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from speaker.compile.arches import all_syscall_names, home_arch, host_arches
from speaker.events import PHASES, Phase
from speaker.profiles.errors import ProfileError, shorten_name, unknown_name_message
from speaker.profiles.files import exists, read_text
from speaker.profiles.model import Profile


def list_file(directory: Path, phase: Phase) -> Path:
    return directory / phase.value


def is_lists_dir(path: Path) -> bool:
    """Return whether ``path`` is a directory with at least one phase file."""
    return path.is_dir() and any(exists(list_file(path, phase)) for phase in PHASES)


def read_list_file(path: Path, *, allow_empty: bool = False) -> list[str]:
    """Read one phase file and return its names in file order.

    Raises ProfileError naming the file and line for a missing file, a line
    that is not a syscall name (with the closest known name), a duplicate, or
    an empty file unless ``allow_empty``.
    """
    text = read_text(
        path,
        "a SPEAKER phase file",
        missing="missing phase file: a SPEAKER profile directory needs booting, running and shutdown",
    )
    names: list[str] = []
    seen: dict[str, int] = {}
    known = all_syscall_names()
    for number, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            raise ProfileError("empty line: write one syscall name per line, with no blank lines", path=path, line=number)
        if name not in known:
            raise ProfileError(_unknown_name_message(name), path=path, line=number)
        if name in seen:
            raise ProfileError(f"duplicate syscall {name!r}, first listed on line {seen[name]}", path=path, line=number)
        seen[name] = number
        names.append(name)
    if not names and not allow_empty:
        raise ProfileError(
            "empty phase: the file lists no syscalls. A traced phase always makes some; "
            "trace again, or list the syscalls the phase needs",
            path=path,
        )
    return names


def read_lists_dir(directory: Path, *, allow_empty: frozenset[Phase] = frozenset()) -> Profile:
    """Read a SPEAKER list directory into a profile, assigning each name to an arch as described above."""
    profile = Profile()
    native = host_arches()[0]
    profile.syscalls[native] = {phase: set() for phase in PHASES}
    for phase in PHASES:
        path = list_file(directory, phase)
        for name in read_list_file(path, allow_empty=phase in allow_empty):
            arch = home_arch(name)
            if arch is None:
                # all_syscall_names() covers the host arches, so this is a libseccomp inconsistency.
                raise ProfileError(f"syscall {name!r} exists on none of {', '.join(host_arches())}", path=path)
            profile.add(arch, phase, name)
    profile.notes.append(f"read from the SPEAKER list directory {directory}")
    return profile


def format_list(names: set[str] | frozenset[str]) -> str:
    """Return a phase file's text: sorted names, one per line, each ending in a newline."""
    return "".join(f"{name}\n" for name in sorted(names))


def write_lists_dir(profile: Profile, directory: Path) -> list[Path]:
    """Write ``booting``, ``running`` and ``shutdown`` into ``directory`` and return their paths.

    Each file is replaced atomically, so a reader never sees half a list.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for phase in PHASES:
        path = list_file(directory, phase)
        write_atomic(path, format_list(profile.phase(phase)))
        written.append(path)
    return written


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    Raises OSError, after removing the temporary file, when either step fails.
    """
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _unknown_name_message(name: str) -> str:
    if not name.replace("_", "").isalnum():
        return f"{shorten_name(name)} is not a syscall name: write one name per line, such as 'openat'"
    return unknown_name_message(name, host_arches()[0])
