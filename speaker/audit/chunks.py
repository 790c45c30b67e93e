"""Count SECCOMP records per (pid, arch, syscall) over a whole read buffer.

Both audit sources hand this parser buffers of complete audit.log lines
(``audit_netlink`` turns each netlink message into such a line). Making one
Python object per record cannot reach a million records per second. So every
chunk starts the same way: one ``findall`` captures each record's key, which
is the text from ``pid=`` to the syscall number. A Counter counts the keys at
C speed, and only the distinct keys, usually a few dozen, are decoded.

Each key also gets the kernel times of its first and last record in the
chunk (its *span*), which the phase machine needs to place keys whose calls
straddle a phase boundary. The order of the keys' first and last records,
which two dicts built at C speed provide, lets a few searches find those
records, and the times are read from only those lines.

Then the serial numbers are checked in one of three ways:

* **fast**: the chunk contains nothing but SECCOMP records whose serials
  continue the ones seen so far without a gap. The first and last serial and
  the record and line counts prove that, so no other serial is read;
* **bulk**: other record types or a gap: one more ``findall`` reads every
  line's header and the serial of each record for the serial tracker. The
  records of stop signals (``speaker.audit.signals``) can only be in such
  chunks;
* **exact**: a line that is not an audit record, a SECCOMP record whose key
  does not parse, or per-record output requested: each line is parsed on its
  own. This path is about ten times slower.

Every path counts the same lines as garbled: each line that does not start
with an audit record header (``type=NAME msg=audit(TIME:SERIAL): ``), and
each SECCOMP record whose key does not parse. The fast and bulk paths only
accept chunks in which every line starts with a header and no SECCOMP header
sits inside a line, and leave the rest to the exact path. A key that parses
but names an arch, pid or syscall number that no profile can contain is
counted as ``out_of_range`` instead, on every path.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path

import anyio

from speaker.audit.follow import AuditLogFollower, Chunk
from speaker.audit.records import (
    KEY_FIELDS,
    LINE_HEADER,
    PID_LIMIT,
    SECCOMP_FIELDS,
    SeccompRecord,
    decode_value,
    is_daemon_type,
    supported_arch,
)
from speaker.audit.serials import SerialTracker
from speaker.audit.signals import SignalScanner, SignalSend

#: (pid, libseccomp arch name, syscall number)
CountKey = tuple[int, str, int]
#: Kernel times of the first and last record of a key, in seconds since the epoch.
Span = tuple[float, float]

_SECCOMP_MARK = b"type=SECCOMP msg=audit("
_LINE_SECCOMP_MARK = b"\n" + _SECCOMP_MARK
# One group from the pid to the syscall number: six space-separated values
# (pid, comm, exe, sig, arch, syscall). Generic tokens keep the regex engine's
# work per record small. KEY_FIELDS checks the field names of each distinct
# key, which also rejects the keys this finds in other record types (the
# "ppid=1 pid=2 auid=..." of a SYSCALL record, for example).
_KEY = re.compile(rb"pid=([^ ]++ [^ ]++ [^ ]++ [^ ]++ [^ ]++ [^ ]++)")
# The same key with its record's time, for chunks that also contain other
# record types. The lazy scan starts after the header, so it finds the same
# "pid=" as _KEY does in a SECCOMP line.
_TIMED_KEY = re.compile(rb"type=SECCOMP msg=audit\((\d+\.\d+):\d+\): [^\n]*?pid=([^ ]+ [^ ]+ [^ ]+ [^ ]+ [^ ]+ [^ ]+)")
_STAMP = re.compile(rb"type=SECCOMP msg=audit\((\d+\.\d+):(\d+)\)")
# The header of every line after the first, as LINE_HEADER matches it, with
# the serial of each record except auditd's own (DAEMON_START and so on),
# which auditd numbers from its own counter. Those give an empty serial.
_NEXT_HEADER = re.compile(
    rb"\ntype=(?:DAEMON_[^ \n]* msg=audit\(\d+\.\d+:\d+\)|(?!DAEMON_)[^ \n]+ msg=audit\(\d+\.\d+:(\d+)\)): "
)
# Finds the serial of a line whose header is damaged, so that the record does
# not also show up as a serial gap.
_LOOSE_SERIAL = re.compile(rb"audit\(\d+\.\d+:(\d+)\)")
# Decoded keys are cached across chunks; the cache is cleared when it grows past this.
_KEY_CACHE_LIMIT = 65536
#: Bytes of a garbled line kept for the log.
EXAMPLE_LENGTH = 160
#: The key that ``_checked_key`` returns, compared by identity, for a record whose arch, pid or
#: syscall number no profile can contain.
_OUT_OF_RANGE: CountKey = (0, "", 0)


@dataclasses.dataclass
class ChunkResult:
    """Counts, times and losses of one chunk."""

    counts: collections.Counter[CountKey] = dataclasses.field(default_factory=collections.Counter)
    #: Kernel times of each key's first and last record in the chunk. These are
    #: the earliest and latest times unless the kernel queued records of two
    #: CPUs one place out of order. Such a swap moves a time by less than the
    #: clock's resolution (one jiffy).
    spans: dict[CountKey, Span] = dataclasses.field(default_factory=dict)
    #: SECCOMP records counted in ``counts``.
    records: int = 0
    #: Minimum and maximum kernel time of the counted records, 0.0 when there are none.
    start_time: float = 0.0
    end_time: float = 0.0
    #: Lines that are not audit records, or SECCOMP records without a readable key.
    garbled: int = 0
    #: The first garbled line, cut to EXAMPLE_LENGTH bytes.
    garbled_example: bytes = b""
    #: SECCOMP records with an arch other than x86_64 and x86, a pid of
    #: PID_LIMIT or more, or a syscall number outside 0 to SYSCALL_LIMIT - 1.
    #: They are not in ``counts`` or ``records``.
    out_of_range: int = 0
    #: The first such record's key (``pid=...`` to its syscall number), cut to EXAMPLE_LENGTH bytes.
    out_of_range_example: bytes = b""
    #: Each record, only when the parser was asked to keep them.
    seccomp: list[SeccompRecord] = dataclasses.field(default_factory=list)
    #: Signals sent by kill, tkill, tgkill or pidfd_send_signal, when the audit rule records them.
    signals: list[SignalSend] = dataclasses.field(default_factory=list)
    #: ``fast``, ``bulk`` or ``exact``: how the serials were checked.
    path: str = ""

    def remove(self, key: CountKey) -> int:
        """Drop the records of ``key`` from the counts, spans and record count; return how many there were."""
        count = self.counts.pop(key, 0)
        if self.spans.pop(key, None) is not None:
            self.start_time = min((span[0] for span in self.spans.values()), default=0.0)
            self.end_time = max((span[1] for span in self.spans.values()), default=0.0)
        self.records -= count
        return count


class ChunkParser:
    """Parse chunks of audit.log lines and feed their serial numbers to a SerialTracker."""

    def __init__(self, tracker: SerialTracker, keep_records: bool = False) -> None:
        self.tracker = tracker
        self.keep_records = keep_records
        self.signals = SignalScanner()
        self._keys: dict[bytes, CountKey | None] = {}
        self._exact_keys: dict[tuple[bytes, bytes, bytes], CountKey] = {}

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
        lines = buffer.count(b"\n", 0, end)
        # SECCOMP headers at the start of a line.
        line_records = buffer.count(_LINE_SECCOMP_MARK, 0, end) + buffer.startswith(_SECCOMP_MARK)
        if line_records == lines:
            # Every line starts with a SECCOMP header. A header inside a line
            # (a cut record glued to the next one) adds a serial or a key. Then
            # the serial range below or the key count in _parse_fast differs
            # from the line count, and the bulk path takes the chunk.
            # TODO: a line whose time digits are damaged is counted here unless it
            # is its key's first or last record, while the exact path counts it as garbled.
            first = _STAMP.match(buffer, 0, end)
            last = _STAMP.match(buffer, buffer.rfind(b"\n", 0, end - 1) + 1, end)
            if (
                first is not None
                and last is not None
                and self.tracker.open_holes == 0
                and self.tracker.extends(int(first.group(2)))
                and int(last.group(2)) - int(first.group(2)) + 1 == lines
            ):
                result = self._parse_fast(buffer, end, lines)
                if result is not None:
                    self.tracker.add_run(int(first.group(2)), int(last.group(2)))
                    return result
        return self._parse_bulk(buffer, end, lines, line_records)

    def _parse_fast(self, buffer: bytes | bytearray, end: int, records: int) -> ChunkResult | None:
        """Count a chunk of SECCOMP lines only; return None when a line does not fit, so the bulk path decides."""
        raw_keys = _KEY.findall(buffer, 0, end)
        if len(raw_keys) != records:
            return None

        # A Counter keeps its keys in the order of their first records, and
        # the dict below in the order of their last records, from the end. So
        # each key's first (or last) record is found by one search that starts
        # where the previous key's ended, and all searches together read the
        # chunk about twice, at C speed.
        in_first_order = collections.Counter(raw_keys)
        in_last_order = dict.fromkeys(reversed(raw_keys))
        result = ChunkResult(records=records, path="fast")
        counts = result.counts
        firsts: dict[bytes, tuple[CountKey, float]] = {}
        position = -1
        for raw, count in in_first_order.items():
            key = self._decode_key(raw)
            if key is None:
                return None
            if key is _OUT_OF_RANGE:
                _count_out_of_range(result, raw, count)
                continue
            counts[key] += count
            position = buffer.find(b"pid=" + raw + b" ", position + 1, end)
            if position < 0:
                return None
            first_time = _line_time(buffer, position)
            if first_time is None:
                return None
            firsts[raw] = (key, first_time)

        spans = result.spans
        position = end
        for raw in in_last_order:
            if raw not in firsts:
                continue
            position = buffer.rfind(b"pid=" + raw + b" ", 0, position)
            if position < 0:
                return None
            key, first = firsts[raw]
            last_time = _line_time(buffer, position)
            if last_time is None:
                return None
            _widen(spans, key, first, last_time)

        result.records -= result.out_of_range
        if spans:
            result.start_time = min(span[0] for span in spans.values())
            result.end_time = max(span[1] for span in spans.values())
        return result

    def _parse_bulk(self, buffer: bytes | bytearray, end: int, lines: int, records: int) -> ChunkResult:
        """Count a chunk whose lines all start with a header; hand any other chunk to the exact path.

        ``records`` is the number of SECCOMP headers at the start of a line.
        """
        if buffer.count(_SECCOMP_MARK, 0, end) != records:
            # A SECCOMP header inside a line: the exact path counts that line as one record at most.
            return self._parse_exact(bytes(buffer[:end]))
        first_header = LINE_HEADER.match(buffer, 0, end)
        if first_header is None:
            return self._parse_exact(bytes(buffer[:end]))
        serials = _NEXT_HEADER.findall(buffer, 0, end)
        if len(serials) + 1 != lines:
            # A line without a header: the exact path counts it as garbled.
            return self._parse_exact(bytes(buffer[:end]))
        if not is_daemon_type(first_header.group(1)):
            serials.insert(0, first_header.group(3))

        result = ChunkResult(path="bulk")
        counts = result.counts
        spans = result.spans
        timed = _TIMED_KEY.findall(buffer, 0, end)
        if len(timed) != records:
            return self._parse_exact(bytes(buffer[:end]))
        if timed:
            stamps, raw_keys = zip(*timed)
            first_stamp = dict(zip(reversed(raw_keys), reversed(stamps)))
            last_stamp = dict(zip(raw_keys, stamps))
            for raw, count in collections.Counter(raw_keys).items():
                key = self._decode_key(raw)
                if key is None:
                    return self._parse_exact(bytes(buffer[:end]))
                if key is _OUT_OF_RANGE:
                    _count_out_of_range(result, raw, count)
                    continue
                result.records += count
                counts[key] += count
                _widen(spans, key, float(first_stamp[raw]), float(last_stamp[raw]))
        if spans:
            result.start_time = min(span[0] for span in spans.values())
            result.end_time = max(span[1] for span in spans.values())
        self.tracker.add(map(int, filter(None, serials)))
        result.signals = self.signals.scan(buffer, end)
        return result

    def _decode_key(self, raw: bytes) -> CountKey | None:
        """Return the (pid, arch, nr) of a captured key, None when it is not a SECCOMP key, or _OUT_OF_RANGE."""
        if raw in self._keys:
            return self._keys[raw]
        fields = KEY_FIELDS.fullmatch(raw)
        key = None
        if fields is not None:
            key = _checked_key(int(fields.group(1)), int(fields.group(4), 16), int(fields.group(5)))
        if len(self._keys) >= _KEY_CACHE_LIMIT:
            self._keys.clear()
        self._keys[raw] = key
        return key

    def _parse_exact(self, text: bytes) -> ChunkResult:
        result = ChunkResult(path="exact")
        counts = result.counts
        spans = result.spans
        serials: list[int] = []
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
            key = self._exact_keys.get((pid, arch_hex, nr_text))
            if key is None:
                if len(self._exact_keys) >= _KEY_CACHE_LIMIT:
                    self._exact_keys.clear()
                key = self._exact_keys[(pid, arch_hex, nr_text)] = _checked_key(int(pid), int(arch_hex, 16), int(nr_text))
            if key is _OUT_OF_RANGE:
                _count_out_of_range(result, line[fields.start(1) - len(b"pid=") : fields.end(5)], 1)
                continue
            arch, nr = key[1], key[2]
            counts[key] += 1
            result.records += 1
            time = float(stamp)
            span = spans.get(key)
            spans[key] = (time, time) if span is None else (min(span[0], time), max(span[1], time))
            if self.keep_records:
                result.seccomp.append(
                    SeccompRecord(
                        time=time,
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
        if spans:
            result.start_time = min(span[0] for span in spans.values())
            result.end_time = max(span[1] for span in spans.values())
        result.signals = self.signals.scan(text, len(text))
        return result

    @staticmethod
    def _count_garbled(result: ChunkResult, line: bytes) -> None:
        if not result.garbled:
            result.garbled_example = line[:EXAMPLE_LENGTH]
        result.garbled += 1


def _checked_key(pid: int, audit_arch: int, nr: int) -> CountKey:
    """Return the count key of a record, or _OUT_OF_RANGE when no profile can contain it."""
    arch = supported_arch(audit_arch, nr)
    if arch is None or not 0 < pid < PID_LIMIT:
        return _OUT_OF_RANGE
    return (pid, arch, nr)


def _count_out_of_range(result: ChunkResult, raw: bytes, count: int) -> None:
    if not result.out_of_range:
        result.out_of_range_example = (raw if raw.startswith(b"pid=") else b"pid=" + raw)[:EXAMPLE_LENGTH]
    result.out_of_range += count


def _line_time(buffer: bytes | bytearray, position: int) -> float | None:
    """Return the kernel time of the SECCOMP line that contains ``position``, or None when its header is damaged."""
    stamp = _STAMP.match(buffer, buffer.rfind(b"\n", 0, position) + 1, position)
    return None if stamp is None else float(stamp.group(1))


def _widen(spans: dict[CountKey, Span], key: CountKey, first: float, last: float) -> None:
    """Merge a key's span into ``spans``; two raw keys can decode to one key (a thread renamed itself)."""
    span = spans.get(key)
    spans[key] = (first, last) if span is None else (min(span[0], first), max(span[1], last))


def parse_file(path: str | os.PathLike[str], read_size: int = 1 << 20) -> tuple[collections.Counter[CountKey], dict[str, int]]:
    """Count the SECCOMP records of a whole audit.log file as the audit_log source does.

    Returns the counts per (pid, arch, nr) and the losses per reason
    (``garbled``, ``out_of_range``, ``serial_gap``). The file is read with the
    source's AuditLogFollower, in pieces of ``read_size`` bytes cut after
    their last newline, so lines longer than MAX_LINE_LENGTH are skipped and
    counted as garbled. Raises NotRegularFileError or another OSError when the
    file cannot be read.
    """
    tracker = SerialTracker(grace=0.0)
    parser = ChunkParser(tracker)
    counts: collections.Counter[CountKey] = collections.Counter()
    losses: collections.Counter[str] = collections.Counter()

    def add(result: ChunkResult) -> None:
        counts.update(result.counts)
        losses["garbled"] += result.garbled
        losses["out_of_range"] += result.out_of_range

    async def read_all() -> None:
        follower = AuditLogFollower(Path(path), from_start=True, read_size=read_size)
        await follower.open()
        try:
            while (item := await follower.read()) is not None:
                if isinstance(item, Chunk):
                    losses["garbled"] += len(item.long_lines)
                    add(parser.parse(item.buffer, item.end))
            if follower.take_long_line() is not None:
                losses["garbled"] += 1
            leftover = follower.leftover()
            if leftover:
                add(parser.parse(leftover + b"\n"))
        finally:
            await follower.close()

    anyio.run(read_all)
    losses.update(tracker.confirm(final=True))
    return counts, {reason: count for reason, count in losses.items() if count}
