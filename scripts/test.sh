#!/usr/bin/env bash
# Installs everything the tests need, then runs lint and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
# Headless Chromium for the status page test (Debian's packages; needs root, as CI has).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# The image that docker tests run their engines in (debootstrap + docker import; cached by tag).
tests/docker/build_image.sh
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
