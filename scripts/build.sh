#!/usr/bin/env bash
# Installs the dependencies (once), configures ./build (once) and builds it.
# Extra Meson options: SPARQ_MESON_ARGS="-Dhead_dims=64,128,256 -Dcuda-archs=sm_90a" ./scripts/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
if [ ! -f build/build.ninja ]; then
  # shellcheck disable=SC2086
  meson setup build ${SPARQ_MESON_ARGS:-}
elif [ -n "${SPARQ_MESON_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  meson configure build ${SPARQ_MESON_ARGS}
fi
ninja -C build
