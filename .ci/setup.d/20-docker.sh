#!/bin/sh
# Start dockerd without bridge networking: containers use --network none or
# host only.
set -eu
mkdir -p /etc/docker
if [ ! -s /etc/docker/daemon.json ]; then
	echo '{"bridge":"none","iptables":false,"ip-forward":false,"ip-masq":false}' >/etc/docker/daemon.json
fi
if ! docker info >/dev/null 2>&1; then
	nohup dockerd >/var/log/dockerd.log 2>&1 &
	for _ in $(seq 1 60); do
		docker info >/dev/null 2>&1 && break
		sleep 1
	done
fi
docker info --format 'dockerd {{.ServerVersion}} ready'
