#!/usr/bin/env bash
# Installs everything the build and the tests need into a project-local, reused folder
# (.toolchain/): nvcc 13.0 and CUDA headers from PyPI, libclang for bindgen, maturin,
# and the Python test dependencies. Idempotent: a second run only checks a stamp file.
# Prints the environment to export (eval "$(scripts/bootstrap.sh --env)").
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tc="$root/.toolchain"
venv="$tc/venv"
stamp="$tc/.stamp-v1"

env_lines() {
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  local cu="$site/nvidia/cu13"
  echo "export PATH=\"$cu/bin:$venv/bin:\$PATH\""
  echo "export NVCC=\"$cu/bin/nvcc\""
  echo "export LIBCLANG_PATH=\"$site/clang/native\""
  echo "export FLASHKERNELS_KERNEL_CACHE=\"$tc/kernel-cache\""
  echo "export VIRTUAL_ENV=\"$venv\""
}

if [ ! -f "$stamp" ]; then
  mkdir -p "$tc"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "libclang==18.1.1" "maturin>=1.7,<2" \
    "numpy" "pytest" "jax[cpu]" >&2
  touch "$stamp"
fi

if [ "${1:-}" = "--env" ]; then env_lines; fi
