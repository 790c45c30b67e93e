#!/bin/sh
# A virtualenv with the package and its test extras.
set -eu
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev,plot]'
