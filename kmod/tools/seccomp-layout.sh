#!/bin/sh
# Print the kmod/layout.c table entry for a kernel, from the BTF of its vmlinux.
#
# Usage: seccomp-layout.sh [VMLINUX [RELEASE]]
# Default: /sys/kernel/btf/vmlinux and `uname -r`, that is the running kernel.
# Needs pahole (Debian package dwarves). Check the printed offsets against
# `pahole -C seccomp_filter VMLINUX` before adding the line.
set -eu

vmlinux=${1:-/sys/kernel/btf/vmlinux}
release=${2:-$(uname -r)}
if ! command -v pahole >/dev/null; then
	echo "seccomp-layout.sh: pahole not found; install dwarves" >&2
	exit 1
fi
if ! layout=$(pahole -C seccomp_filter "$vmlinux" 2>/dev/null) || [ -z "$layout" ]; then
	echo "seccomp-layout.sh: no struct seccomp_filter in $vmlinux (it needs BTF or DWARF data)" >&2
	exit 1
fi

# pahole prints members as "TYPE NAME; /* OFFSET SIZE */" and ends with "/* size: N, ...".
echo "$layout" | awk -v release="$release" '
	/;[ \t]*\/\*/ {
		line = $0
		sub(/;.*/, "", line)
		count = split(line, words, /[ \t*]+/)
		name = words[count]
		comment = $0
		sub(/.*\/\*[ \t]*/, "", comment)
		split(comment, numbers, /[ \t]+/)
		offset[name] = numbers[1]
		size[name] = numbers[2]
	}
	/\/\* size: / {
		total = $0
		sub(/.*size: /, "", total)
		sub(/,.*/, "", total)
	}
	END {
		needed = "refs users cache prev prog notif"
		split(needed, names, " ")
		for (i in names)
			if (!(names[i] in offset)) {
				print "seccomp-layout.sh: struct seccomp_filter has no member " names[i] > "/dev/stderr"
				exit 1
			}
		printf "\t{\n\t\t.release = \"%s\",\n", release
		printf "\t\t.refs = %d, .users = %d, .cache = %d, .cache_size = %d,\n", offset["refs"], offset["users"], offset["cache"], size["cache"]
		printf "\t\t.prev = %d, .prog = %d, .notif = %d, .size = %d,\n\t},\n", offset["prev"], offset["prog"], offset["notif"], total
	}'
