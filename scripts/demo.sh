#!/usr/bin/env bash
# Quick start 1: build, then run sparq-demo on the best available backend (CUDA GPU, else Vulkan, else CPU).
# Arguments go to sparq-demo (e.g. --backend vulkan --seq 4096 --causal).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
./build/examples/sparq-demo "$@"
