"""NETLINK_AUDIT sockets: the multicast group, and AUDIT_GET/AUDIT_SET requests.

Constants and ``struct audit_status`` follow include/uapi/linux/audit.h and
include/uapi/linux/netlink.h. Requests need CAP_AUDIT_CONTROL, the initial
user namespace and the initial pid namespace. Joining the multicast group
needs CAP_AUDIT_READ, and only the initial network namespace receives records.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_AUDIT = 9
#: Multicast group that receives a copy of every kernel audit record.
AUDIT_NLGRP_READLOG = 1
AUDIT_GET = 1000
AUDIT_SET = 1001
AUDIT_ADD_RULE = 1011
AUDIT_DEL_RULE = 1012
AUDIT_LIST_RULES = 1013
NLMSG_DONE = 3
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
#: setsockopt option that sets a receive buffer above net.core.rmem_max (needs CAP_NET_ADMIN).
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

#: Bits of ``audit_status.mask`` that select the fields AUDIT_SET changes.
AUDIT_STATUS_ENABLED = 0x0001
AUDIT_STATUS_RATE_LIMIT = 0x0008
AUDIT_STATUS_BACKLOG_LIMIT = 0x0010

#: struct nlmsghdr: length, type, flags, sequence number, port id.
NLMSG_HEADER = struct.Struct("=IHHII")
_STATUS = struct.Struct("=11I")
_ERROR_CODE = struct.Struct("=i")
_sequence = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class AuditStatus:
    """The kernel's audit settings and counters (``struct audit_status``), as ``auditctl -s`` prints them."""

    enabled: int = 0
    failure: int = 0
    pid: int = 0
    rate_limit: int = 0
    backlog_limit: int = 0
    #: Records the kernel dropped since boot (backlog full, rate limit, no memory).
    lost: int = 0
    backlog: int = 0
    feature_bitmap: int = 0
    backlog_wait_time: int = 0
    backlog_wait_time_actual: int = 0

    @classmethod
    def from_bytes(cls, payload: bytes) -> AuditStatus:
        """Decode a reply; older kernels send a shorter struct, whose missing fields are 0."""
        data = payload[: _STATUS.size].ljust(_STATUS.size, b"\0")
        _mask, *values = _STATUS.unpack(data)
        return cls(*values)


class AuditRequestError(OSError):
    """An AUDIT_GET or AUDIT_SET request that the kernel rejected or did not respond to."""


def iter_messages(data: bytes | bytearray | memoryview, size: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Yield (type, sequence number, payload) for each netlink message in one datagram."""
    view = memoryview(data)[: len(data) if size is None else size]
    offset = 0
    while offset + NLMSG_HEADER.size <= len(view):
        length, msg_type, _flags, seq, _port = NLMSG_HEADER.unpack_from(view, offset)
        if length < NLMSG_HEADER.size or offset + length > len(view):
            return
        yield msg_type, seq, bytes(view[offset + NLMSG_HEADER.size : offset + length])
        offset += (length + 3) & ~3


def open_multicast(receive_buffer: int = 0) -> socket.socket:
    """Open a NETLINK_AUDIT socket that receives every audit record.

    ``receive_buffer`` (bytes, 0 keeps the default) is set with
    SO_RCVBUFFORCE, or with SO_RCVBUF, which the kernel caps at
    net.core.rmem_max, when the process lacks CAP_NET_ADMIN. Raises
    PermissionError without CAP_AUDIT_READ.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
    try:
        if receive_buffer:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, 1 << (AUDIT_NLGRP_READLOG - 1)))
    except BaseException:
        sock.close()
        raise
    return sock


def receive_buffer_size(sock: socket.socket) -> int:
    """Return the socket's receive buffer in bytes, as the kernel accounts it (twice the value set)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def get_status(timeout: float = 2.0) -> AuditStatus:
    """Send AUDIT_GET and return the kernel's audit status. Raises AuditRequestError."""
    reply = _request(AUDIT_GET, b"", expect_reply=True, timeout=timeout)
    assert reply is not None
    return AuditStatus.from_bytes(reply)


def set_status(
    *,
    rate_limit: int | None = None,
    backlog_limit: int | None = None,
    enabled: int | None = None,
    timeout: float = 2.0,
) -> None:
    """Send AUDIT_SET for the given fields. Raises AuditRequestError (EPERM without CAP_AUDIT_CONTROL)."""
    mask = 0
    if enabled is not None:
        mask |= AUDIT_STATUS_ENABLED
    if rate_limit is not None:
        mask |= AUDIT_STATUS_RATE_LIMIT
    if backlog_limit is not None:
        mask |= AUDIT_STATUS_BACKLOG_LIMIT
    if not mask:
        return
    payload = _STATUS.pack(mask, enabled or 0, 0, 0, rate_limit or 0, backlog_limit or 0, 0, 0, 0, 0, 0)
    _request(AUDIT_SET, payload, expect_reply=False, timeout=timeout)


def add_rule(rule: bytes, timeout: float = 2.0) -> None:
    """Send AUDIT_ADD_RULE with a ``struct audit_rule_data``. Raises AuditRequestError (EEXIST for a rule already loaded)."""
    _request(AUDIT_ADD_RULE, rule, expect_reply=False, timeout=timeout)


def delete_rule(rule: bytes, timeout: float = 2.0) -> None:
    """Send AUDIT_DEL_RULE with the same ``struct audit_rule_data`` as the addition. Raises AuditRequestError (ENOENT when absent)."""
    _request(AUDIT_DEL_RULE, rule, expect_reply=False, timeout=timeout)


def list_rules(timeout: float = 2.0) -> list[bytes]:
    """Return the loaded rules as ``struct audit_rule_data`` payloads, in the kernel's order."""
    seq = next(_sequence) & 0xFFFFFFFF
    message = NLMSG_HEADER.pack(NLMSG_HEADER.size, AUDIT_LIST_RULES, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    rules: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        try:
            sock.sendto(message, (0, 0))
        except OSError as exc:
            raise AuditRequestError(exc.errno, f"listing audit rules failed: {exc.strerror}") from exc
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise AuditRequestError(errno.ETIMEDOUT, f"the kernel did not list its audit rules within {timeout} s") from None
            for reply_type, reply_seq, body in iter_messages(data):
                if reply_seq != seq:
                    continue
                if reply_type == NLMSG_ERROR:
                    (code,) = _ERROR_CODE.unpack_from(body)
                    if code:
                        raise AuditRequestError(-code, f"listing audit rules failed: {os.strerror(-code)}")
                elif reply_type == AUDIT_LIST_RULES:
                    rules.append(body)
                elif reply_type == NLMSG_DONE:
                    return rules


def _request(msg_type: int, payload: bytes, *, expect_reply: bool, timeout: float) -> bytes | None:
    seq = next(_sequence) & 0xFFFFFFFF
    message = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        try:
            sock.sendto(message + payload, (0, 0))
        except OSError as exc:
            raise AuditRequestError(exc.errno, f"sending audit request {msg_type} failed: {exc.strerror}") from exc
        # The kernel sends the AUDIT_GET reply from a worker thread, so it can
        # arrive before or after the acknowledgement.
        acknowledged = False
        reply = None
        while not acknowledged or (expect_reply and reply is None):
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise AuditRequestError(
                    errno.ETIMEDOUT, f"the kernel did not answer audit request {msg_type} within {timeout} s"
                ) from None
            for reply_type, reply_seq, body in iter_messages(data):
                if reply_seq != seq:
                    continue
                if reply_type == NLMSG_ERROR:
                    (code,) = _ERROR_CODE.unpack_from(body)
                    if code:
                        raise AuditRequestError(-code, f"audit request {msg_type} failed: {os.strerror(-code)}")
                    acknowledged = True
                elif reply_type == msg_type:
                    reply = body
        return reply
