#!/usr/bin/env bash
# Quick start 2: build, then run every test suite (unit, reference, vulkan, cuda); GPU suites skip with a
# message where their device is missing. Arguments go to `meson test` (e.g. --suite vulkan).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
meson test -C build --print-errorlogs "$@"
