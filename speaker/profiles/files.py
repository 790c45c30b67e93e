"""Read profile files, turning every file-system failure into a ProfileError that names the file."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from speaker.profiles.errors import ProfileError

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def read_text(path: Path, content: str, missing: str = "file not found") -> str:
    """Return the UTF-8 text of the regular file ``path``, without a leading byte order mark.

    ``content`` names the expected content in the message for a file that is not
    UTF-8 (such as ``a SPEAKER profile``), and ``missing`` is the message for
    a file that does not exist. Raises ProfileError for any file that cannot
    be read, including a directory, a FIFO or a symlink loop.
    """
    try:
        # O_NONBLOCK, so that opening a FIFO without a writer does not hang.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProfileError(missing, path=path) from None
    except OSError as exc:
        raise ProfileError(f"cannot read the file: {os_reason(exc)}", path=path) from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = _KINDS.get(stat.S_IFMT(mode), "something else")
        raise ProfileError(f"cannot read the file: it is {kind}, not a regular file", path=path)
    with os.fdopen(descriptor, "rb") as stream:
        try:
            data = stream.read()
        except OSError as exc:
            raise ProfileError(f"cannot read the file: {os_reason(exc)}", path=path) from None
    try:
        # utf-8-sig drops the byte order mark that some editors write.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ProfileError(f"not {content}: the file is not UTF-8 text (byte {exc.start + 1})", path=path, line=line) from None


def os_reason(exc: OSError) -> str:
    """Return the OS error text in lower case, such as ``too many levels of symbolic links``."""
    text = exc.strerror or os.strerror(exc.errno or errno.EIO)
    return text[:1].lower() + text[1:]


def exists(path: Path) -> bool:
    """Return whether ``path`` names anything, also a broken symlink or a symlink loop, which readers then report."""
    return os.path.lexists(path)
