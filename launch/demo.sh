#!/usr/bin/env bash
# The main job end to end on the embedded synthetic default: synthetic DDR-like data → WebDataset shards → …
# `bash launch/demo.sh [OUT_DIR]` (default demo_out/). Creates/reuses .venv; safe to re-run (reuses finished steps).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh ""

out="${1:-demo_out}"
mkdir -p "$out"
start=$(date +%s)

if [ ! -d "$out/ddr/lesion_segmentation" ]; then
  echo "== 1. synthetic DDR-like data (official layout) -> $out/ddr"
  drseg synth --out "$out/ddr" --train 48 --valid 12 --test 12 --size 512 --seed 0
fi
if [ ! -f "$out/shards/manifest.json" ]; then
  echo "== 2. WebDataset shards at 256 px -> $out/shards"
  drseg shard --ddr-root "$out/ddr" --out "$out/shards" --image-px 256
fi
echo "== done in $(( $(date +%s) - start )) s: data in $out/ddr, shards in $out/shards ($out/shards/manifest.json)"
