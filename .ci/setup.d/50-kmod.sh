#!/bin/sh
# Cache the Debian kernel image that the kernel module tests boot in qemu:
# the release whose headers linux-headers-amd64 installs (10-packages.sh
# installs the headers, qemu, busybox-static and build-essential). Only
# vmlinuz and its config are kept, in $SPEAKER_KMOD_CACHE/RELEASE
# (default /var/cache/speaker/kmod), so a rerun downloads nothing.
set -eu

release=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | sed -n 's/.*linux-headers-\([^ ,]*\).*/\1/p')
if [ -z "$release" ]; then
	echo "50-kmod.sh: linux-headers-amd64 is not installed" >&2
	exit 1
fi
cache=${SPEAKER_KMOD_CACHE:-/var/cache/speaker/kmod}/$release
if [ -s "$cache/vmlinuz" ] && [ -s "$cache/config" ]; then
	echo "kernel $release already cached in $cache"
	exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt downloads as the _apt user when it may write the directory.
chown _apt "$work" 2>/dev/null || true
apt-get download -q "linux-image-$release"
dpkg-deb --fsys-tarfile linux-image-"$release"_*.deb | tar -x "./boot/vmlinuz-$release" "./boot/config-$release"
mkdir -p "$cache"
mv "boot/vmlinuz-$release" "$cache/vmlinuz"
mv "boot/config-$release" "$cache/config"
echo "kernel $release cached in $cache"
