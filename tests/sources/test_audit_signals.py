"""Signals from the stop signal rule's records, on the audit stream captured in tests/data/stop."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from speaker.audit.leases import LeaseRegistry
from speaker.audit.rules import SignalRuleLease
from speaker.audit.signals import SignalScanner, SignalSend
from tests.conftest import DATA, PYTHON, ROOT, require_system
from tests.sources.audit_reference import netlink_lines

#: The SignalSend of runc's kill(2) in the capture (tests/data/stop/README.md).
KILL = SignalSend(
    time=1796423255.441,
    serial=54265788,
    syscall="kill",
    signal=15,
    sender_pid=18087,
    sender_comm="runc",
    pid=17996,
    comm="nginx",
)


def captured_lines() -> list[bytes]:
    """Return the capture's records as the audit_netlink source writes them, one line each."""
    return netlink_lines(DATA / "stop" / "netlink.bin.gz").splitlines(keepends=True)


def event_lines(serial: int) -> list[bytes]:
    return [line for line in captured_lines() if f":{serial}): ".encode() in line]


def scan(*chunks: bytes) -> list[SignalSend]:
    scanner = SignalScanner()
    found = []
    for chunk in chunks:
        found += scanner.scan(chunk, len(chunk))
    return found


def test_kill_event_has_four_records():
    lines = event_lines(KILL.serial)
    assert [line.split(b" ", 1)[0] for line in lines] == [b"type=1300", b"type=1318", b"type=1327", b"type=1320"]


def test_event_split_between_chunks():
    syscall, obj_pid, proctitle, end = event_lines(KILL.serial)
    assert scan(syscall, obj_pid + proctitle + end) == [KILL]
    assert scan(syscall + obj_pid, proctitle + end) == [KILL]


def test_waiting_call_dropped_at_end_of_event():
    syscall, obj_pid, proctitle, end = event_lines(KILL.serial)
    # An OBJ_PID record of the same serial after the EOE belongs to nothing.
    assert scan(syscall + proctitle + end, obj_pid) == []


def test_auditd_type_names():
    # auditd's RAW format names the types; its ENRICHED format appends
    # interpreted fields after a 0x1d byte.
    names = {b"1300": b"SYSCALL", b"1318": b"OBJ_PID", b"1327": b"PROCTITLE", b"1320": b"EOE"}
    lines = [re.sub(rb"^type=(\d+)", lambda m: b"type=" + names[m.group(1)], line) for line in event_lines(KILL.serial)]
    assert scan(b"".join(lines)) == [KILL]
    enriched = [line.rstrip(b"\n") + b"\x1dARCH=x86_64 SYSCALL=kill\n" if b"SYSCALL" in line else line for line in lines]
    assert scan(b"".join(enriched)) == [KILL]


def test_failed_call_ignored():
    text = b"".join(event_lines(KILL.serial)).replace(b"success=yes exit=0", b"success=no exit=-3")
    assert scan(text) == []


def test_tgkill_signal_from_third_argument():
    text = b"".join(event_lines(KILL.serial)).replace(b"syscall=62 ", b"syscall=234 ").replace(b"a1=f a2=0", b"a1=4654 a2=9")
    (send,) = scan(text)
    assert (send.syscall, send.signal, send.pid) == ("tgkill", 9, KILL.pid)


def test_other_keys_ignored():
    text = b"".join(event_lines(KILL.serial)).replace(b'key="speaker-stop-signal"', b'key="someone-else"')
    assert scan(text) == []


# --- The rule in the kernel ------------------------------------------------------


def listed_rules() -> list[str]:
    """Return the rules as ``auditctl -l`` prints them, an independent view of the kernel's list."""
    output = subprocess.run(["auditctl", "-l"], capture_output=True, text=True, check=True).stdout
    return [line for line in output.splitlines() if "speaker-stop-signal" in line]


@pytest.fixture
def audit_rules(is_root):
    """Skip while a trace on this host holds the rule; the leases share its registry, so a trace that starts later waits for them."""
    require_system("auditctl", shutil.which("auditctl") is not None, "install auditd")
    registry = LeaseRegistry("audit-signal-rule")
    if registry.live_holders(registry.load()):
        pytest.skip("a trace on this host holds the stop signal rule, so its state is not this test's")


EXPECTED_RULES = [
    "-a always,exit -F arch=b64 -S tgkill -F a2!=0x0 -F a2!=0x17 -F key=speaker-stop-signal",
    "-a always,exit -F arch=b64 -S kill,tkill,pidfd_send_signal -F a1!=0x0 -F a1!=0x17 -F key=speaker-stop-signal",
]


def test_rule_lease_shared_by_traces(audit_rules):
    first = SignalRuleLease()
    second = SignalRuleLease()
    assert first.acquire() == 0
    try:
        assert listed_rules() == EXPECTED_RULES
        assert second.acquire() == 1
        assert first.release() == 1
        assert listed_rules() == EXPECTED_RULES
    finally:
        if first.active:
            first.release()
        if second.active:
            second.release()
    assert listed_rules() == []


def test_rule_left_by_dead_trace_replaced(audit_rules):
    holder = subprocess.Popen(
        [PYTHON, "-c", "import time\nfrom speaker.audit.rules import SignalRuleLease\n"
         "SignalRuleLease().acquire()\nprint('acquired', flush=True)\ntime.sleep(60)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "acquired"
    holder.kill()
    holder.wait()
    assert listed_rules() == EXPECTED_RULES

    lease = SignalRuleLease()
    assert lease.acquire() == 0
    # One copy of each rule, not two.
    assert listed_rules() == EXPECTED_RULES
    lease.release()
    deadline = time.monotonic() + 5
    while listed_rules() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listed_rules() == []
