#!/usr/bin/env bash
# Creates or reuses the project's virtual environment and installs hpc_drseg with the given extras.
# Usage (sourced by demo.sh / test.sh):  source launch/setup_env.sh [EXTRAS]      e.g. "dev,deepspeed,triton"
# Environment: DRSEG_VENV (default .venv), DRSEG_PYTHON (default python3), DRSEG_TORCH_SPEC (pip spec for torch,
# e.g. "torch==2.6.0" or a wheel path; default: CUDA build when a GPU is visible, else a CPU build).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="${DRSEG_VENV:-$repo_root/.venv}"
python="${DRSEG_PYTHON:-python3}"
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: hpc_drseg needs Python >= 3.10; set DRSEG_PYTHON to one (found: $("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

# torch first: installed by anything that depends on it, pip would pick a multi-GB CUDA build even on CPU-only
# machines. Once a build is present, the package's "torch>=2.4" is satisfied and pip leaves it alone.
install_torch() {
  if [ -n "${DRSEG_TORCH_SPEC:-}" ]; then
    "${pip[@]}" "$DRSEG_TORCH_SPEC"
  elif has_gpu; then
    echo "[setup] GPU visible: installing a CUDA build of torch"
    "${pip[@]}" torch
  else
    echo "[setup] no GPU: installing a CPU build of torch"
    # 1. a CPU wheel pip can already see (e.g. find-links, as on the project's CI machines; the "+cpu" local version
    #    never matches a CUDA build); 2. PyTorch's CPU index; 3. last resort.
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" --timeout 30 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch \
      || "${pip[@]}" torch
  fi
}
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  install_torch
fi

# Reinstall the package only when pyproject.toml or the extras changed (a stamp in the venv remembers).
stamp="$venv/.hpc_drseg-install"
want="$(sha256sum "$repo_root/pyproject.toml" | cut -c1-16) extras=[$extras]"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  echo "[setup] installing hpc_drseg${extras:+[$extras]} into $venv"
  spec="$repo_root"
  [ -n "$extras" ] && spec="$repo_root[$extras]"
  "${pip[@]}" -e "$spec" 2> >(grep -v '^WARNING: Location' >&2)
  echo "$want" >>"$stamp"
fi
export PATH="$venv/bin:$PATH"
