#!/usr/bin/env bash
# Installs everything the tests need, then runs lint and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
# The image that docker tests run their engines in (debootstrap + docker import; cached by tag).
tests/docker/build_image.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
