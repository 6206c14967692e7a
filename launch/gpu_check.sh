#!/usr/bin/env bash
# Every GPU figure in one run: installs the wheels in .whl/ (see launch/gpu_wheels.sh), checks the imports, then runs
# `drseg bench gpu --out OUT_DIR` (hpc_drseg/gpu_check: environment, GPU tests, project vs plain-PyTorch throughput,
# loader, CBAM, a short full run, sync debug) under one deadline, writing OUT_DIR/results.jsonl row by row.
# Usage, from the repo root on the GPU machine:  bash launch/gpu_check.sh [OUT_DIR] [drseg bench gpu options]
#   (OUT_DIR default: $OUT/gpu, else gpu_check). It uses the machine's python3 (its CUDA torch and Triton) and the
#   repo in place (PYTHONPATH). The driver's deadline (--deadline-s, default 510 s) plus this script's start-up stay
#   inside a 600-s command limit; DRSEG_GPU_CHECK_LIMIT_S (default 585) is the hard stop around it all.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:+$OUT/gpu}"
out="${out:-gpu_check}"
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is no option is OUT_DIR
  out="$1"
  shift
fi
site=/tmp/drseg-site

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_check: error: installing .whl/*.whl failed (two versions of one package? rebuild with launch/gpu_wheels.sh)" >&2; exit 1; }
  export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

# Before any GPU time: torch and the package must import (else nothing can run); a missing optional package only
# skips the parts that need it (the driver says which), so it is reported here, not fatal.
python3 - <<'PY' || exit 1
import importlib.util, sys
try:
    import torch
    import hpc_drseg.gpu_check  # noqa: F401
except Exception as exc:
    sys.exit(f"gpu_check: error: {type(exc).__name__}: {exc}")
wanted = ("triton", "accelerate", "albumentations", "webdataset", "submitit", "pytest", "sklearn", "tensorboard", "cv2")
missing = [name for name in wanted if importlib.util.find_spec(name) is None]
print(f"gpu_check: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}; "
      f"missing: {', '.join(missing) or 'none'}" + (" (bash launch/gpu_wheels.sh, carry .whl/)" if missing else ""))
PY

exec timeout --signal=TERM --kill-after=10 "${DRSEG_GPU_CHECK_LIMIT_S:-585}" \
  python3 -m hpc_drseg bench gpu --out "$out" "$@"
