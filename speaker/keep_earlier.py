"""Move an earlier run's output aside, so that a new run never replaces data already collected.

The file sinks call ``keep_earlier_file`` or ``move_aside`` before they first
write to a path that contains output of an earlier run. The earlier file or
profile directory is renamed to a sibling named after its own time in UTC,
such as ``out/trace.2026-12-04T23-59-01Z.jsonl`` or
``out/profiles/redis.2026-12-04T23-59-01Z``. The new output takes the usual
path, because readers such as pipelines/enforce.toml look there for the
newest run. ``check_output_file`` and ``check_writable`` let a sink find out during
setup, before any container starts, that such a rename would fail.
"""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

from speaker.errors import ComponentError

#: UTC time of the earlier output in the sibling's name. It has no colons,
#: which some file systems and tools reject.
STAMP_FORMAT = "%Y-%m-%dT%H-%M-%SZ"


def check_output_file(path: Path, what: str, option: str) -> None:
    """Create the directory of the output file ``path`` and check that a sink can write it without losing data.

    ``what`` names the file in messages, such as "trace log", and ``option``
    is the option that sets ``path``. Raises ComponentError when ``path`` is a
    directory, when its directory does not allow creating the file, or when an
    earlier file there could not be moved aside.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ComponentError(f"cannot create the directory of {path}: {exc.strerror}") from exc
    if path.is_dir():
        raise ComponentError(f"{path} is a directory: set {option} to a file name")
    if _is_file_to_keep(path):
        check_writable(path.parent, f"the earlier {what} {path} cannot be moved aside", option)
    elif not path.exists():
        check_writable(path.parent, f"the {what} {path} cannot be created", option)


def keep_earlier_file(path: Path, written_at: float | None = None) -> Path | None:
    """Move an earlier output file at ``path`` aside with ``move_aside`` and return its new path.

    Returns None, and leaves ``path`` alone, unless it is a regular file with
    data in it. An empty file contains nothing to keep, and a FIFO or a device
    such as /dev/null must never be renamed.
    """
    if not _is_file_to_keep(path):
        return None
    return move_aside(path, written_at)


def check_writable(directory: Path, problem: str, option: str) -> None:
    """Raise ComponentError unless this process may create and rename entries in ``directory``.

    ``problem`` describes what would fail, such as "the earlier trace log
    out/trace.jsonl cannot be moved aside", and ``option`` names the option
    that sets the path, for the message.
    """
    if os.access(directory, os.W_OK | os.X_OK):
        return
    raise ComponentError(
        f"{directory} is not writable, so {problem}. Nothing was changed: make {directory} writable, "
        f"or set the {option} option to a writable location, then run again"
    )


def move_aside(path: Path, written_at: float | None = None) -> Path:
    """Rename ``path`` to a free sibling named after ``written_at`` and return the new path.

    ``written_at`` is the earlier output's own time in seconds since the
    epoch, for example from a header it contains. When it is None or not a
    valid time, the modification time of ``path`` is used. A file keeps its
    last suffix (``trace.jsonl`` becomes ``trace.STAMP.jsonl``), a directory
    gets the stamp at the end (``redis.STAMP``). A name already taken gets a
    counter: ``redis.STAMP-2``, ``redis.STAMP-3`` and so on.

    Raises ComponentError naming ``path`` when the rename fails, and then
    ``path`` is unchanged.
    """
    stamp = _format_stamp(written_at)
    if stamp is None:
        try:
            stamp = _format_stamp(path.stat().st_mtime)
        except OSError as exc:
            raise ComponentError(f"cannot read the modification time of the earlier output {path}: {exc.strerror}") from exc
    target = _free_sibling(path, stamp)
    try:
        # TODO: a rename replaces a file that another process creates under the
        # same name after _free_sibling checked it. Two runs that write the same
        # output at the same time conflict in any case.
        path.rename(target)
    except OSError as exc:
        raise ComponentError(
            f"cannot move the earlier output {path} aside to {target.name}: {exc.strerror}. It was left unchanged "
            f"and nothing was written over it: make {path.parent} writable, or move {path} away yourself, then run again"
        ) from exc
    return target


def _is_file_to_keep(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size > 0


def _format_stamp(written_at: float | None) -> str | None:
    if written_at is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(written_at, datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return moment.strftime(STAMP_FORMAT)


def _free_sibling(path: Path, stamp: str) -> Path:
    directory = path.is_dir()
    counter = 1
    while True:
        tag = stamp if counter == 1 else f"{stamp}-{counter}"
        if directory or not path.suffix:
            name = f"{path.name}.{tag}"
        else:
            name = f"{path.stem}.{tag}{path.suffix}"
        target = path.with_name(name)
        if not os.path.lexists(target):
            return target
        counter += 1
