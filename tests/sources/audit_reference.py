"""Fixture loading and an independent reference parser for the audit tests.

The reference parser splits each line into ``key=value`` words, which is
slow and simple and shares no code with speaker.audit, so tests compare the
two.
"""

from __future__ import annotations

import collections
import gzip
import struct
from pathlib import Path

from speaker.audit.reader import append_lines
from tests.conftest import DATA

AUDIT_DATA = DATA / "audit"
_ARCHES = {"c000003e": "x86_64", "40000003": "x86"}


def read_fixture(relative: str) -> bytes:
    """Return the bytes of a fixture under tests/data/audit, unpacking .gz files."""
    path = AUDIT_DATA / relative
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def netlink_datagrams(relative: str) -> list[bytes]:
    """Return the datagrams of a capture_netlink.py file under tests/data/audit (4-byte length, then the datagram)."""
    return split_datagrams(read_fixture(relative))


def netlink_lines(path: Path) -> bytes:
    """Return the records of a capture_netlink.py file (gzipped if its name ends in .gz) as audit_netlink writes them."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    pending = bytearray()
    for datagram in split_datagrams(data):
        append_lines(pending, datagram, len(datagram))
    return bytes(pending)


def split_datagrams(data: bytes) -> list[bytes]:
    datagrams = []
    offset = 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        datagrams.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return datagrams


def reference_counts(text: bytes) -> collections.Counter[tuple[int, str, int]]:
    """Count well-formed SECCOMP lines per (pid, arch, nr)."""
    counts: collections.Counter[tuple[int, str, int]] = collections.Counter()
    for line in text.split(b"\n"):
        if not line.startswith(b"type=SECCOMP msg=audit("):
            continue
        fields = {}
        for word in line.split(b"\x1d")[0].decode().split(" "):
            name, equals, value = word.partition("=")
            if equals:
                fields[name] = value
        if not {"pid", "arch", "syscall", "compat"} <= fields.keys():
            continue
        nr = int(fields["syscall"])
        arch = _ARCHES[fields["arch"]]
        if arch == "x86_64" and nr & 0x40000000:
            arch = "x32"
        counts[(int(fields["pid"]), arch, nr)] += 1
    return counts


def reference_spans(text: bytes) -> dict[tuple[int, str, int], tuple[float, float]]:
    """Return the earliest and latest time of the well-formed SECCOMP lines per (pid, arch, nr)."""
    spans: dict[tuple[int, str, int], tuple[float, float]] = {}
    for line in text.split(b"\n"):
        if not line.startswith(b"type=SECCOMP msg=audit("):
            continue
        fields = {}
        for word in line.split(b"\x1d")[0].decode().split(" "):
            name, equals, value = word.partition("=")
            if equals:
                fields[name] = value
        if not {"pid", "arch", "syscall", "compat"} <= fields.keys():
            continue
        nr = int(fields["syscall"])
        arch = _ARCHES[fields["arch"]]
        if arch == "x86_64" and nr & 0x40000000:
            arch = "x32"
        time = float(fields["msg"].removeprefix("audit(").split(":")[0])
        key = (int(fields["pid"]), arch, nr)
        first, last = spans.get(key, (time, time))
        spans[key] = (min(first, time), max(last, time))
    return spans


def reference_serials(text: bytes) -> list[int]:
    """Return the serial of every record except auditd's DAEMON_* records, in file order."""
    serials = []
    for line in text.split(b"\n"):
        if not line.startswith(b"type=") or line.startswith(b"type=DAEMON_"):
            continue
        stamp = line.split(b"msg=audit(", 1)[1].split(b")", 1)[0]
        serials.append(int(stamp.split(b":")[1]))
    return serials


def pids_of(text: bytes, exe: bytes) -> set[int]:
    """Return the pids of SECCOMP records whose exe field is ``exe``, such as b'"/storm"'."""
    pids = set()
    for line in text.split(b"\n"):
        if line.startswith(b"type=SECCOMP ") and b" exe=" + exe + b" " in line:
            pids.add(int(line.split(b" pid=", 1)[1].split(b" ", 1)[0]))
    return pids
