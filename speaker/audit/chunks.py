"""Count SECCOMP records per (pid, arch, syscall) over a whole read buffer.

Both audit sources hand this parser buffers of complete audit.log lines
(``audit_netlink`` turns each netlink message into such a line). Making one
Python object per record cannot reach a million records per second. So every
chunk starts the same way: one ``findall`` captures each record's key, which
is the text from ``pid=`` to the syscall number. A Counter counts the keys at
C speed, and only the distinct keys, usually a few dozen, are decoded. Then
the serial numbers are checked in one of three ways:

* **fast**: the chunk contains nothing but SECCOMP records whose serials
  continue the ones seen so far without a gap. The first and last serial and
  the record count prove that, so no other serial is read;
* **bulk**: other record types or a gap: one more ``findall`` reads every
  record's serial for the serial tracker;
* **exact**: a SECCOMP record whose key does not parse, or per-record
  output requested: each line is parsed on its own, and lines
  that are not records are counted as garbled. This path is about ten times
  slower.

The fast and bulk paths ignore a line that is neither a record nor part of
one, such as an empty line: it has no serial, so nothing was lost.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re

from speaker.audit.records import (
    KEY_FIELDS,
    LINE_HEADER,
    SECCOMP_FIELDS,
    SeccompRecord,
    arch_name,
    decode_value,
    is_daemon_type,
)
from speaker.audit.serials import SerialTracker

#: (pid, libseccomp arch name, syscall number)
CountKey = tuple[int, str, int]

_SECCOMP_MARK = b"type=SECCOMP msg=audit("
# One group from the pid to the syscall number: six space-separated values
# (pid, comm, exe, sig, arch, syscall). Generic tokens keep the regex engine's
# work per record small. KEY_FIELDS checks the field names of each distinct
# key, which also rejects the keys this finds in other record types (the
# "ppid=1 pid=2 auid=..." of a SYSCALL record, for example).
_KEY = re.compile(rb"pid=([^ ]+ [^ ]+ [^ ]+ [^ ]+ [^ ]+ [^ ]+)")
_STAMP = re.compile(rb"type=SECCOMP msg=audit\((\d+\.\d+):(\d+)\)")
# The serial of every record except auditd's own (DAEMON_START and so on),
# which auditd numbers from its own counter.
_SERIAL = re.compile(rb"type=(?!DAEMON_)[^ \n]+ msg=audit\(\d+\.\d+:(\d+)\)")
# Finds the serial of a line whose header is damaged, so that the record does
# not also show up as a serial gap.
_LOOSE_SERIAL = re.compile(rb"audit\(\d+\.\d+:(\d+)\)")
# Decoded keys are cached across chunks; the cache is cleared when it grows past this.
_KEY_CACHE_LIMIT = 65536
#: Bytes of a garbled line kept for the log.
EXAMPLE_LENGTH = 160


@dataclasses.dataclass
class ChunkResult:
    """Counts, times and losses of one chunk."""

    counts: collections.Counter[CountKey] = dataclasses.field(default_factory=collections.Counter)
    #: SECCOMP records counted in ``counts``.
    records: int = 0
    #: Minimum and maximum kernel time of the counted records, 0.0 when there are none.
    start_time: float = 0.0
    end_time: float = 0.0
    #: Lines that are not audit records, or SECCOMP records without a readable key.
    garbled: int = 0
    #: The first garbled line, cut to EXAMPLE_LENGTH bytes.
    garbled_example: bytes = b""
    #: Each record, only when the parser was asked to keep them.
    seccomp: list[SeccompRecord] = dataclasses.field(default_factory=list)
    #: ``fast``, ``bulk`` or ``exact``: how the serials were checked.
    path: str = ""


class ChunkParser:
    """Parse chunks of audit.log lines and feed their serial numbers to a SerialTracker."""

    def __init__(self, tracker: SerialTracker, keep_records: bool = False) -> None:
        self.tracker = tracker
        self.keep_records = keep_records
        self._keys: dict[bytes, CountKey | None] = {}
        self._arches: dict[tuple[bytes, int], str] = {}

    def parse(self, buffer: bytes | bytearray, end: int | None = None) -> ChunkResult:
        """Parse ``buffer[:end]``, which must hold whole lines, each ending in a newline."""
        if end is None:
            end = len(buffer)
        if end == 0:
            return ChunkResult(path="fast")
        if buffer[end - 1] != 0x0A:
            raise ValueError("a chunk must end with a newline; keep the partial last line for the next chunk")
        if self.keep_records:
            return self._parse_exact(bytes(buffer[:end]))
        records = buffer.count(_SECCOMP_MARK, 0, end)
        raw_keys = _KEY.findall(buffer, 0, end)
        counts: collections.Counter[CountKey] = collections.Counter()
        foreign_keys = 0
        for raw, count in collections.Counter(raw_keys).items():
            key = self._decode_key(raw)
            if key is None:
                foreign_keys += count
            else:
                counts[key] += count
        if len(raw_keys) - foreign_keys != records:
            return self._parse_exact(bytes(buffer[:end]))

        result = ChunkResult(counts=counts, records=records)
        if records:
            first = _STAMP.search(buffer, 0, end)
            last_start = buffer.rfind(_SECCOMP_MARK, 0, end)
            last = _STAMP.match(buffer, last_start, end)
            assert first is not None and last is not None
            # NOTE: the kernel times a record when it starts it and queues it when
            # it finishes it, so the first and last line can be one record out of
            # order. Their times then differ from the true minimum and maximum by
            # less than the clock's 4 ms resolution.
            times = (float(first.group(1)), float(last.group(1)))
            result.start_time, result.end_time = min(times), max(times)
            if (
                foreign_keys == 0
                and first.start() == 0
                and buffer.rfind(b"\n", 0, end - 1) + 1 == last_start
                and self.tracker.open_holes == 0
                and self.tracker.extends(int(first.group(2)))
                and int(last.group(2)) - int(first.group(2)) + 1 == records
            ):
                self.tracker.add_run(int(first.group(2)), int(last.group(2)))
                result.path = "fast"
                return result
        self.tracker.add(map(int, _SERIAL.findall(buffer, 0, end)))
        result.path = "bulk"
        return result

    def _decode_key(self, raw: bytes) -> CountKey | None:
        """Return the (pid, arch, nr) of a captured key, or None when it is not a SECCOMP key."""
        if raw in self._keys:
            return self._keys[raw]
        fields = KEY_FIELDS.fullmatch(raw)
        key = None
        if fields is not None:
            nr = int(fields.group(5))
            key = (int(fields.group(1)), arch_name(int(fields.group(4), 16), nr), nr)
        if len(self._keys) >= _KEY_CACHE_LIMIT:
            self._keys.clear()
        self._keys[raw] = key
        return key

    def _parse_exact(self, text: bytes) -> ChunkResult:
        result = ChunkResult(path="exact")
        counts = result.counts
        serials: list[int] = []
        first_stamp = last_stamp = b""
        for line in text.split(b"\n")[:-1]:
            header = LINE_HEADER.match(line)
            if header is None:
                self._count_garbled(result, line)
                loose = _LOOSE_SERIAL.search(line)
                if loose is not None:
                    serials.append(int(loose.group(1)))
                continue
            type_name, stamp, serial_text = header.groups()
            if is_daemon_type(type_name):
                continue
            serials.append(int(serial_text))
            # TODO: a SECCOMP line whose type name is damaged is taken for another
            # record type, so it is neither counted nor reported as garbled.
            if type_name != b"SECCOMP":
                continue
            fields = SECCOMP_FIELDS.match(line, header.end())
            if fields is None:
                self._count_garbled(result, line)
                continue
            pid, comm, exe, arch_hex, nr_text, code = fields.groups()
            nr = int(nr_text)
            arch = self._arches.get((arch_hex, nr))
            if arch is None:
                arch = self._arches.setdefault((arch_hex, nr), arch_name(int(arch_hex, 16), nr))
            counts[(int(pid), arch, nr)] += 1
            result.records += 1
            # Stamps of one trace have the same width (ten digits for the seconds
            # from 2001 to 2286, then three for the milliseconds), so they compare like numbers.
            if not first_stamp or stamp < first_stamp:
                first_stamp = stamp
            if stamp > last_stamp:
                last_stamp = stamp
            if self.keep_records:
                result.seccomp.append(
                    SeccompRecord(
                        time=float(stamp),
                        serial=serials[-1],
                        pid=int(pid),
                        comm=decode_value(comm),
                        exe=decode_value(exe),
                        arch=arch,
                        nr=nr,
                        action=int(code, 16) if code else 0,
                    )
                )
        self.tracker.add(serials)
        if result.records:
            result.start_time, result.end_time = float(first_stamp), float(last_stamp)
        return result

    @staticmethod
    def _count_garbled(result: ChunkResult, line: bytes) -> None:
        if not result.garbled:
            result.garbled_example = line[:EXAMPLE_LENGTH]
        result.garbled += 1


def parse_file(path: str | os.PathLike[str], read_size: int = 1 << 20) -> tuple[collections.Counter[CountKey], dict[str, int]]:
    """Count the SECCOMP records of a whole audit.log file as the audit_log source does.

    Returns the counts per (pid, arch, nr) and the losses per reason
    (``garbled``, ``serial_gap``). The file is read into one reused buffer
    in pieces of ``read_size`` bytes, each cut after its last newline. This is
    the function that the parser benchmark measures.
    """
    tracker = SerialTracker(grace=0.0)
    parser = ChunkParser(tracker)
    counts: collections.Counter[CountKey] = collections.Counter()
    losses: collections.Counter[str] = collections.Counter()
    buffer = bytearray(read_size)
    have = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            if have == len(buffer):
                buffer.extend(bytes(len(buffer)))
            with memoryview(buffer) as view:
                size = handle.readinto(view[have:])
            if not size:
                break
            have += size
            end = buffer.rfind(b"\n", 0, have) + 1
            if end == 0:
                continue
            result = parser.parse(buffer, end)
            counts.update(result.counts)
            losses["garbled"] += result.garbled
            buffer[: have - end] = buffer[end:have]
            have -= end
    if have:
        losses["garbled"] += parser.parse(bytes(buffer[:have]) + b"\n").garbled
    losses.update(tracker.confirm(final=True))
    return counts, {reason: count for reason, count in losses.items() if count}
