#!/usr/bin/env bash
# Runs the whole test suite: `bash launch/test.sh [pytest args]`. Creates/reuses .venv and installs what tests need.
# Tests marked `gpu` skip without CUDA; `slurm` tests start a throw-away local SLURM cluster (root + Debian packages).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh "dev,deepspeed,triton,export,mlflow"

set +e
python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when it collected no test at all: that is a broken suite here, never a pass.
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests (exit 5); treating as failure" >&2
  exit 1
fi
exit "$status"
