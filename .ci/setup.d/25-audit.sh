#!/bin/sh
# auditd for the audit_log tests. The audit_netlink source needs no auditd.
# Its log is /var/log/audit/audit.log; the tests read it as root.
set -eu
if ! pgrep -x auditd >/dev/null; then
	auditd
	for _ in $(seq 1 20); do
		[ -s /var/log/audit/audit.log ] && break
		sleep 0.5
	done
fi
auditctl -s | grep -E '^(enabled|pid|backlog_limit|rate_limit|lost)'
