#!/bin/sh
# Debian packages for the tests: Docker 20.10 with runc, auditd, debootstrap
# for the demo images, bpftrace, and qemu with Debian's kernel headers for the
# kernel-module tests.
set -eu
apt-get update -q
apt-get install -y -q --no-install-recommends \
	docker.io runc auditd debootstrap bpftrace \
	qemu-system-x86 busybox-static linux-headers-amd64 build-essential dwarves \
	redis-tools wrk cpio python3-venv ca-certificates
