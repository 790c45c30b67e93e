"""Kernel audit support shared by the audit sources.

* ``records``: record types, architecture names and the fields of a
  type=SECCOMP (1326) record;
* ``chunks``: a parser that counts SECCOMP records per (pid, arch, syscall)
  over a whole read buffer, in audit.log line format, with each key's first
  and last record time;
* ``serials``: a check of audit serial numbers that finds lost records;
* ``netlink``: NETLINK_AUDIT messages and the kernel's ``struct audit_status``;
* ``leases``: registries of the traces that hold a host-wide audit change;
* ``control``: raising the audit backlog and lifting the rate limit for a
  trace, and restoring both afterwards, with leases shared by all traces on
  the host;
* ``rules``: the audit rule that records stop signals, loaded with such a lease;
* ``signals``: finding the signals that rule records in chunks of records;
* ``kernel``: those settings, the rule and the kernel's lost counter as one source uses them;
* ``reader``: a thread that drains the audit multicast socket;
* ``follow``: reading audit.log across auditd's log rotation;
* ``marker``: a record made at the stop, which shows when every earlier
  record has been read;
* ``counting``: turning parsed chunks into SyscallCounts and RecordLoss events.
"""
