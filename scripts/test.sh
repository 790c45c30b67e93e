#!/bin/sh
# Run the test suite with the project's virtualenv. Tests that need Docker,
# audit, bpftrace or qemu skip on machines without them, unless
# SPEAKER_REQUIRE_SYSTEM=1 makes them fail instead.
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
