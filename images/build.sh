#!/bin/sh
# Build the demo images speaker-demo/redis, speaker-demo/nginx and
# speaker-demo/postgres from Debian packages, without any image registry.
#
# One debootstrap root file system carries all three servers. The images are
# tagged with a recipe hash (this script, the suite and the package list), so
# a second run with an unchanged recipe only checks the labels and exits.
#
# Usage: images/build.sh [redis|nginx|postgres ...]   (default: all three)
# Needs root, debootstrap and a running Docker daemon. Takes about a minute
# on a 2-core machine the first time, mostly debootstrap.
set -eu

SUITE=${SPEAKER_IMAGE_SUITE:-bookworm}
MIRROR=${SPEAKER_IMAGE_MIRROR:-http://deb.debian.org/debian}
PACKAGES=redis-server,redis-tools,nginx-light,postgresql,procps
CACHE_DIR=${SPEAKER_IMAGE_CACHE:-/var/cache/speaker/images}

RECIPE=$( { cat "$0"; echo "$SUITE $PACKAGES"; } | sha256sum | cut -c1-16)
LABEL=org.speaker.recipe

if [ "$#" -eq 0 ]; then
	set -- redis nginx postgres
fi

image_is_current() {
	found=$(docker image inspect --format "{{index .Config.Labels \"$LABEL\"}}" \
		"speaker-demo/$1:latest" 2>/dev/null || true)
	[ "$found" = "$RECIPE" ]
}

missing=""
for name in "$@"; do
	case "$name" in
	redis | nginx | postgres) ;;
	*)
		echo "images/build.sh: unknown image '$name': expected redis, nginx or postgres" >&2
		exit 2
		;;
	esac
	if image_is_current "$name"; then
		echo "speaker-demo/$name:latest is current (recipe $RECIPE)"
	else
		missing="$missing $name"
	fi
done
[ -z "$missing" ] && exit 0

mkdir -p "$CACHE_DIR"
TARBALL="$CACHE_DIR/rootfs-$RECIPE.tar"
if [ ! -s "$TARBALL" ]; then
	ROOT=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
	trap 'rm -rf "$ROOT"' EXIT
	echo "debootstrap $SUITE with $PACKAGES into $ROOT"
	debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || {
		echo "images/build.sh: debootstrap failed; its log is $ROOT.log" >&2
		exit 1
	}
	rm -f "$ROOT.log"
	# The postgresql package normally creates a cluster in
	# /var/lib/postgresql/VERSION/main; create it if the postinst did not.
	# Listen on loopback only, and trust local connections for the workloads.
	if ! ls "$ROOT"/etc/postgresql/*/main/postgresql.conf >/dev/null 2>&1; then
		version=$(ls "$ROOT/usr/lib/postgresql" | head -n1)
		chroot "$ROOT" pg_createcluster "$version" main >/dev/null
	fi
	conf=$(ls "$ROOT"/etc/postgresql/*/main/postgresql.conf)
	echo "listen_addresses = '127.0.0.1'" >>"$conf"
	hba=$(ls "$ROOT"/etc/postgresql/*/main/pg_hba.conf)
	printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' >"$hba"
	rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
	tar -C "$ROOT" -cf "$TARBALL.tmp" .
	mv "$TARBALL.tmp" "$TARBALL"
fi

PG_VERSION=$(tar -tf "$TARBALL" | sed -n 's|^\./usr/lib/postgresql/\([0-9]*\)/bin/postgres$|\1|p' | head -n1)

for name in $missing; do
	case "$name" in
	redis)
		set -- -c 'CMD ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]'
		;;
	nginx)
		set -- -c 'CMD ["nginx", "-g", "daemon off;"]'
		;;
	postgres)
		set -- -c 'USER postgres' \
			-c "CMD [\"/usr/lib/postgresql/$PG_VERSION/bin/postgres\", \"-D\", \"/var/lib/postgresql/$PG_VERSION/main\", \"-c\", \"config_file=/etc/postgresql/$PG_VERSION/main/postgresql.conf\"]"
		;;
	esac
	docker import -c "LABEL $LABEL=$RECIPE" "$@" - "speaker-demo/$name:latest" <"$TARBALL" >/dev/null
	echo "built speaker-demo/$name:latest (recipe $RECIPE)"
done
