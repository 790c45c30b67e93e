#!/bin/sh
# The user-facing host setup (Docker, audit, .venv, demo images), then the
# packages only the tests need: bpftrace, and qemu with Debian's kernel
# headers for the kernel-module tests.
set -eu
scripts/setup-host.sh
apt-get install -y -q --no-install-recommends \
	bpftrace qemu-system-x86 busybox-static linux-headers-amd64 build-essential dwarves cpio libcap2-bin zstd
.venv/bin/pip install -q -e '.[dev,plot]'
