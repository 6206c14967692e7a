#!/usr/bin/env bash
# The main job end to end on the embedded synthetic default:
#   synthetic DDR-like data -> WebDataset shards -> train Attention-DeepLab -> evaluate (paper + standard protocols)
#   -> report (Table I layout, PR and training curves) -> overlays for a few test images.
# `bash launch/demo.sh` (outputs under demo_out/). Creates/reuses .venv. Re-running resumes/reuses finished steps;
# `rm -rf demo_out` starts over.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh ""

out=demo_out
run="$out/runs/attention_deeplab"
start=$(date +%s)

if [ ! -d "$out/ddr/lesion_segmentation" ]; then
  echo "== 1/5 synthetic DDR-like data in the official layout -> $out/ddr"
  drseg synth --out "$out/ddr" --train 48 --valid 12 --test 12 --size 512 --seed 0
fi
if [ ! -f "$out/shards/manifest.json" ]; then
  echo "== 2/5 WebDataset shards at 128 px -> $out/shards"
  drseg shard --ddr-root "$out/ddr" --out "$out/shards" --image-px 128
fi
echo "== 3/5 train Attention-DeepLab (configs/demo.yaml) -> $run"
drseg train --config configs/demo.yaml
echo "== 4/5 evaluate on the test split (paper protocol at 128 px, standard protocol at native resolution)"
drseg eval --run "$run" --split test
echo "== 5/5 overlays and lesion measurements for the test images -> $out/predictions"
drseg predict --checkpoint "$run/checkpoints/best.pt" --input "$out/ddr/lesion_segmentation/test/image" \
  --out "$out/predictions"

echo
echo "validation mAP (standard protocol, 128 px) per epoch:"
python - "$run/metrics.csv" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    print(f"  epoch {int(row['epoch']):2d}  loss {float(row['train/total']):.3f}  val mAP {float(row['val/mAP']):.4f}"
          f"  val mIoU {float(row['val/mIoU']):.4f}")
PY
echo
sed -n '/^## Evaluation/,/^## Plots/p' "$run/report.md" | head -60
echo "== done in $(( $(date +%s) - start )) s. Report: $run/report.md (plots in $run/plots/), overlays: $out/predictions/"
