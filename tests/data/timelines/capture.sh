#!/bin/sh
# Capture the recorded timelines of this directory from real traces: the
# events that the classify stage emits (lifecycle events, output lines,
# process samples and syscall counts, attributed and named), written by a
# jsonl sink. Needs root, Docker with the speaker-demo/redis image, and the
# kernel audit netlink socket. Run from anywhere:
#   sh tests/data/timelines/capture.sh [redis] [exit-booting] [two]
# With no argument it captures all three; each one replaces its file.
#
#   redis.jsonl         redis with a health check (redis-cli ping every 1 s),
#                       idle for 8 s after it listens, then stopped
#   two.jsonl           two redis containers traced at once in watch mode,
#                       stopped one after the other
#   exit-booting.jsonl  redis started with an invalid option: it exits with
#                       code 1 while booting
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d /tmp/spk-b-capture.XXXXXX)
trap 'rm -rf "$work"' EXIT

capture() {
	# capture NAME [--set ...]: trace.toml plus a jsonl sink on classify's output.
	name=$1
	shift
	"$python" -m speaker --log-format json run "$root/pipelines/trace.toml" \
		--set "sinks.profiles.directory=$work/profiles" \
		--set "sinks.trace.path=$work/$name-trace.jsonl" \
		--set sinks.capture.type=jsonl \
		--set 'sinks.capture.inputs=["classify"]' \
		--set "sinks.capture.path=$here/$name.jsonl" \
		"$@" 2>"$work/$name.log" || echo "$name: exit code $? (expected for exit-booting)"
}

wanted() {
	[ "$all" = yes ] || case " $scenarios " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}
scenarios="$*"
all=no
[ -n "$scenarios" ] || all=yes

wanted redis && capture redis \
	--set sources.docker.launch.name=spk-b-capture-redis \
	--set 'sources.docker.launch.healthcheck={test=["CMD", "redis-cli", "ping"], interval="1s"}' \
	--set 'stages.workload.command=[]' \
	--set stages.workload.duration=8s

wanted exit-booting && capture exit-booting \
	--set sources.docker.launch.name=spk-b-capture-exit \
	--set 'sources.docker.launch.command=["redis-server", "--port", "not-a-port"]'

wanted two || exit 0
# Watch mode: two labeled containers under the logging profile.
"$python" -m speaker --log-format json run "$root/pipelines/trace-watch.toml" \
	--set 'stages.phases.detector={type="listen", port=6379}' \
	--set "sinks.profiles.directory=$work/profiles" \
	--set "sinks.trace.path=$work/two-trace.jsonl" \
	--set sinks.capture.type=jsonl \
	--set 'sinks.capture.inputs=["classify"]' \
	--set "sinks.capture.path=$here/two.jsonl" \
	2>"$work/two.log" &
speaker=$!
for _ in $(seq 1 50); do
	grep -q '"watching"' "$work/two.log" 2>/dev/null && break
	sleep 0.2
done
profile=/run/speaker/trace-log.json
for index in 1 2; do
	docker run -d --rm --name "spk-b-capture-two-$index" --network none --label speaker.trace=1 \
		--security-opt "seccomp=$profile" speaker-demo/redis >/dev/null
	sleep 1
done
sleep 5
docker stop -t 10 spk-b-capture-two-1 >/dev/null
sleep 1
docker stop -t 10 spk-b-capture-two-2 >/dev/null
sleep 3
kill -INT "$speaker"
wait "$speaker" || true
ls -l "$here"/*.jsonl
