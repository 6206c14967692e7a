#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels that `launch/gpu_check.sh` needs on a bare GPU image (Python 3.12,
# CUDA torch, Triton, Accelerate, OpenCV, pytest, scikit-learn, TensorBoard, but no network): what the GPU tests'
# modules and the drseg bench gpu parts import that the image lacks — albumentations with its needs (albucore,
# pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions ≥ 4.16 for pydantic-core,
# stringzilla, simsimd), webdataset (braceexpand) and submitit. About 8 MB; the check refuses more than 60 MB.
# Usage (on a machine with pip access):  bash launch/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12, the GPU image's)
# DeepSpeed is left out (source-only on PyPI; its tests skip without it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${1:-3.12}"
max_mb=60
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# Pinned to what the test suite ran with here; pure-Python ones resolve for any interpreter. One version of each:
# two versions of one package in .whl/ stop the whole install on the GPU machine.
packages=(
  albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 stringzilla==5.3.2 simsimd==6.5.16 webdataset==1.0.2
  braceexpand==0.1.7 submitit==1.5.4
)
rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" -d .whl "${packages[@]}"
ls -1 .whl
size_mb=$(du -sm .whl | cut -f1)
echo "${size_mb} MB in .whl/ (the device tool carries at most 64 MiB with the working tree: name .whl in carry)"
[ "$size_mb" -le "$max_mb" ] || { echo "gpu_wheels: error: .whl/ holds ${size_mb} MB, more than ${max_mb} MB" >&2; exit 1; }
