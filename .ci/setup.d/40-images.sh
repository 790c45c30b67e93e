#!/bin/sh
# Build the demo images once, before the tests time themselves.
set -eu
images/build.sh
