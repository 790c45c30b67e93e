#!/bin/sh
# Capture the audit fixtures of this directory: SCENARIO is i386, two or
# rotation (see README.md). Needs root, Docker with the speaker-demo/redis
# image, auditd installed but not running, gcc and binutils. It runs its own
# auditd with a private configuration and log, restores the kernel's audit
# "enabled" flag afterwards, and writes the files into SCENARIO/.
set -eu
scenario=$1
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d /tmp/spk-a-capture.XXXXXX)
image=speaker-demo/redis

if pgrep -x auditd >/dev/null; then
	echo "auditd is already running; stop it first, this script runs its own" >&2
	exit 1
fi
enabled_before=$(auditctl -s | awk '$1 == "enabled" {print $2}')

gcc -O2 -static -o "$work/storm" "$here/src/storm.c"
as --32 -o "$work/i386.o" "$here/src/i386.s"
ld -m elf_i386 -static -o "$work/i386" "$work/i386.o"
printf '%s\n' '{"defaultAction":"SCMP_ACT_LOG","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],"syscalls":[]}' >"$work/log.json"

start_auditd() {
	mkdir -p "$work/auditd/log" "$work/auditd/plugins.d"
	cat >"$work/auditd/auditd.conf" <<CONF
log_file = $work/auditd/log/audit.log
log_format = $1
log_group = root
write_logs = yes
flush = INCREMENTAL_ASYNC
freq = 50
max_log_file = 8
num_logs = 5
max_log_file_action = ROTATE
space_left = 2
space_left_action = IGNORE
admin_space_left = 1
admin_space_left_action = IGNORE
disk_full_action = IGNORE
disk_error_action = IGNORE
plugin_dir = $work/auditd/plugins.d
CONF
	auditd -c "$work/auditd"
	for _ in 1 2 3 4 5 6 7 8 9 10; do
		[ -s "$work/auditd/log/audit.log" ] && break
		sleep 0.5
	done
	auditd_pid=$(pgrep -f "auditd -c $work/auditd")
	"$python" "$here/src/capture_netlink.py" "$work/netlink.bin" &
	capture_pid=$!
	sleep 1
}

stop_auditd() {
	sleep 2
	kill "$capture_pid"
	wait "$capture_pid" || true
	kill "$auditd_pid"
	while kill -0 "$auditd_pid" 2>/dev/null; do sleep 0.2; done
	auditctl -e "$enabled_before" >/dev/null
}

run() {
	docker run --rm --network none --security-opt seccomp="$work/log.json" \
		-v "$work/storm:/storm:ro" -v "$work/i386:/i386:ro" "$image" "$@"
}

mkdir -p "$here/$scenario"
case $scenario in
i386)
	# An i386 program, then an x86_64 program that ends with an x32-numbered call.
	start_auditd ENRICHED
	run /i386
	run /storm 3 0 x32
	stop_auditd
	cp "$work/auditd/log/audit.log" "$here/i386/audit.log"
	cp "$work/netlink.bin" "$here/i386/netlink.bin"
	;;
two)
	# Two containers at once: 1000 and 2000 getppid calls, 100 us apart.
	start_auditd RAW
	run /storm 1000 100 &
	first=$!
	run /storm 2000 100 &
	second=$!
	wait "$first" "$second"
	stop_auditd
	gzip -9 -c "$work/auditd/log/audit.log" >"$here/two/audit.log.gz"
	gzip -9 -c "$work/netlink.bin" >"$here/two/netlink.bin.gz"
	;;
rotation)
	# 400 getppid calls 5 ms apart; auditd rotates its log (SIGUSR1) after 1 s.
	start_auditd ENRICHED
	run /storm 400 5000 &
	container=$!
	sleep 1
	kill -USR1 "$auditd_pid"
	wait "$container"
	stop_auditd
	gzip -9 -c "$work/auditd/log/audit.log.1" >"$here/rotation/audit.log.1.gz"
	gzip -9 -c "$work/auditd/log/audit.log" >"$here/rotation/audit.log.gz"
	;;
*)
	echo "unknown scenario $scenario: use i386, two or rotation" >&2
	exit 2
	;;
esac
rm -rf "$work"
echo "captured $scenario into $here/$scenario"
