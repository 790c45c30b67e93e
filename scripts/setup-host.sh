#!/bin/sh
# Prepare a fresh Debian 12 or Ubuntu 22.04+ machine for SPEAKER, as root.
# It installs Docker, audit and build tools from the distribution and starts
# the Docker daemon. Then it creates .venv with SPEAKER installed and builds
# the demo images (speaker-demo/redis, nginx, postgres) from Debian packages.
#
# It changes nothing that is already set up: an existing
# /etc/docker/daemon.json is kept, and a running dockerd is used as it is.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "setup-host.sh: run as root (sudo scripts/setup-host.sh)" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
	docker.io runc auditd debootstrap redis-tools wrk \
	python3 python3-venv python3-dev gcc libseccomp2 ca-certificates curl

if ! docker info >/dev/null 2>&1; then
	if [ -d /run/systemd/system ]; then
		systemctl enable --now docker
	else
		# No systemd (a container or a minimal VM): run dockerd directly,
		# without bridge networking, since SPEAKER's containers use
		# --network none or host.
		mkdir -p /etc/docker
		if [ ! -s /etc/docker/daemon.json ]; then
			echo '{"bridge":"none","iptables":false,"ip-forward":false,"ip-masq":false}' >/etc/docker/daemon.json
		fi
		nohup dockerd >/var/log/dockerd.log 2>&1 &
	fi
	for _ in $(seq 1 60); do
		docker info >/dev/null 2>&1 && break
		sleep 1
	done
fi
docker info --format 'Docker {{.ServerVersion}} is running'

if [ ! -x .venv/bin/python ]; then
	python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev,plot]'

images/build.sh
echo "Ready. Trace the demo redis image with: .venv/bin/python -m speaker run pipelines/trace.toml"
