#!/usr/bin/env bash
# One-shot check on a GPU machine, sized for a 15-minute lease: GPU-marked tests (fused CBAM kernel parity, opcheck,
# compiled module; CUDA metrics), `drseg bench cbam`, and `drseg bench train` in the paper's setting and the fast ones.
# Usage, from the repo root on the GPU machine:  bash launch/gpu_check.sh [OUT_DIR]        (default: $OUT, else gpu_check)
# It uses the machine's python3 (its own CUDA torch and Triton) and the repo in place (PYTHONPATH), installing the
# wheels in .whl/ first if there are any: make them beforehand with `bash launch/gpu_wheels.sh` where pip works.
# Each part has its own time limit (DRSEG_GPU_CHECK_SCALE multiplies them), so one hang cannot eat the lease.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-gpu_check}}"
scale="${DRSEG_GPU_CHECK_SCALE:-1}"
mkdir -p "$out"
limit() { echo $(( $1 * scale )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/drseg-site \
    .whl/*.whl || { echo "error: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/drseg-site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

status=0
run_part() {  # run_part NAME SECONDS COMMAND...: output to $out/NAME.txt and the console; failures are remembered
  local name="$1" seconds="$2"
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${seconds}s): $*" | tee "$out/$name.txt"
  timeout "$seconds" "$@" 2>&1 | tee -a "$out/$name.txt"
  local rc="${PIPESTATUS[0]}"
  echo "=== $name exit $rc" | tee -a "$out/$name.txt"
  [ "$rc" -eq 0 ] || status=1
}

run_part versions 60 bash -c 'nvidia-smi -L; python3 -c "import sys, torch, triton; print(sys.version.split()[0], \
  \"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())"'
run_part pytest_gpu "$(limit 240)" python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/test_metrics.py
run_part bench_cbam "$(limit 150)" python3 -m hpc_drseg bench cbam
config=configs/attention_deeplab.yaml
common=(data.num_workers=12 --steps 20 --warmup 5)
run_part bench_train_paper "$(limit 90)" python3 -m hpc_drseg bench train --config "$config" "${common[@]}" \
  train.precision=no train.batch_size=4
run_part bench_train_bf16_eager "$(limit 90)" python3 -m hpc_drseg bench train --config "$config" "${common[@]}" \
  train.precision=bf16 train.channels_last=true train.batch_size=16 model.cbam.impl=eager
run_part bench_train_bf16_triton "$(limit 90)" python3 -m hpc_drseg bench train --config "$config" "${common[@]}" \
  train.precision=bf16 train.channels_last=true train.batch_size=16 model.cbam.impl=triton
run_part bench_train_compile "$(limit 150)" python3 -m hpc_drseg bench train --config "$config" "${common[@]}" \
  train.precision=bf16 train.channels_last=true train.batch_size=32 train.compile=true model.cbam.impl=triton
echo "results in $out (exit $status)"
exit "$status"
