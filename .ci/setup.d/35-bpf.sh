#!/bin/sh
# Make bpftrace usable for the ebpf source: mount tracefs (the source also
# mounts it itself when it can), then check that a tracepoint program loads.
set -eu
if ! [ -d /sys/kernel/tracing/events/raw_syscalls ] && ! [ -d /sys/kernel/debug/tracing/events/raw_syscalls ]; then
	mount -t tracefs nodev /sys/kernel/tracing
fi
if ! [ -e /sys/kernel/btf/vmlinux ]; then
	echo "35-bpf.sh: /sys/kernel/btf/vmlinux is missing; the ebpf source needs a kernel with BTF" >&2
	exit 1
fi
# bpftrace 0.17 warns that it cannot raise RLIMIT_MEMLOCK; kernels since 5.11
# do not need it, so only the exit code counts.
timeout 60 bpftrace -e 'tracepoint:raw_syscalls:sys_enter { @ = count(); exit(); }' >/dev/null 2>&1 || {
	echo "35-bpf.sh: bpftrace cannot load a raw_syscalls tracepoint program" >&2
	exit 1
}
echo "bpftrace $(bpftrace --version | cut -d' ' -f2) ready"
