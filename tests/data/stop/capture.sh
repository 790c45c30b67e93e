#!/bin/sh
# Capture the stop fixtures of this directory from one real trace (README.md
# describes the files). Needs root, Docker with the speaker-demo/nginx image,
# the kernel audit netlink socket, and curl. Run from anywhere:
#   sh tests/data/stop/capture.sh
#
# pipelines/trace.toml traces speaker-demo/nginx. Once nginx listens, the
# workload sends one curl request every 50 ms for about 4 s in the background
# and returns after 1.5 s, so that Docker's stop comes while requests still
# arrive. Meanwhile every datagram of the audit multicast group is recorded.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d /tmp/spk-g-capture.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$python" "$root/tests/data/audit/src/capture_netlink.py" "$work/netlink.bin" >/dev/null &
capture=$!
sleep 1

load='(for i in $(seq 80); do curl -s -o /dev/null http://127.0.0.1:80/; sleep 0.05; done) >/dev/null 2>&1 & sleep 1.5'
"$python" -m speaker --log-format json run "$root/pipelines/trace.toml" \
	--set sources.docker.launch.image=speaker-demo/nginx \
	--set sources.docker.launch.name=spk-g-capture-nginx \
	--set 'stages.phases.detector={type="listen", port=80}' \
	--set "stages.workload.command=[\"nsenter\", \"-t\", \"{pid}\", \"-n\", \"sh\", \"-c\", \"$load\"]" \
	--set "sinks.profiles.directory=$work/profiles" \
	--set "sinks.trace.path=$here/trace.jsonl" \
	--set sinks.capture.type=jsonl \
	--set 'sinks.capture.inputs=["classify"]' \
	--set "sinks.capture.path=$here/timeline.jsonl" \
	2>"$work/speaker.log" || { tail -20 "$work/speaker.log" >&2; exit 1; }

sleep 1
kill -INT "$capture"
wait "$capture" || true
gzip -9 -c "$work/netlink.bin" >"$here/netlink.bin.gz"
grep -E '"(phase_change|container_event)"' "$work/speaker.log" | cut -c1-200
echo "captured into $here"
