#!/usr/bin/env bash
# The benchmark run behind bench/RESULTS.md, on a GPU machine, with peers in the same run.
#   bench/run_device.sh BUILD_DIR OUT_DIR [sparq-bench args...]
# Runs sparq-bench on every GPU backend the build has (CUDA, Vulkan), then the torch peers
# (../shared/bench/peers_torch.py copied to .peers/) on the same shapes. JSON lines go to OUT_DIR/*.jsonl,
# the tables to OUT_DIR/*.txt.
set -uo pipefail
build=${1:?build dir}; out=${2:?out dir}; shift 2
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$out/device.txt" 2>&1
git rev-parse --short HEAD >> "$out/device.txt" 2>/dev/null
for backend in cuda vulkan; do
  echo "== sparq-bench --backend $backend $*"
  "$build/bench/sparq-bench" --backend "$backend" "$@" > "$out/sparq-$backend.jsonl" 2> "$out/sparq-$backend.txt"
  tail -n 40 "$out/sparq-$backend.txt"
done
if [ -f .peers/peers_torch.py ]; then
  echo "== peers"
  python3 .peers/peers_torch.py --batch 4 --heads 32 --dims 64,128 --seqs 4096,16384 > "$out/peers.jsonl" 2>&1
  python3 .peers/peers_torch.py --batch 4 --heads 32 --dims 128 --seqs 16384 --causal >> "$out/peers.jsonl" 2>&1
  cat "$out/peers.jsonl"
fi
