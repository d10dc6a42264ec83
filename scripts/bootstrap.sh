#!/usr/bin/env bash
# Installs what the build and the tests need into a project-local, reused folder
# (.toolchain/), from PyPI only. Idempotent: a second run only checks stamp files.
#   scripts/bootstrap.sh              the build toolchain (.toolchain/venv): nvcc 13.0 and
#                                     CUDA headers, libclang for bindgen, maturin,
#                                     auditwheel (the wheel's manylinux tag), ruff (Python
#                                     lint and format), clang-format (kernels/ style)
#   scripts/bootstrap.sh --test-env   also the Python the tests run in (.toolchain/pyenv):
#                                     numpy, pytest, jax[cpu], torch (its CPU path, for the
#                                     autograd / torch.compile / torch.distributed tests;
#                                     ~5 GB, ~2 min once), matplotlib (GPU records)
#   scripts/bootstrap.sh --env        prints the environment to export
# torch sits in its own venv because its CUDA 13.2 runtime pins clash with nvcc 13.0's.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tc="$root/.toolchain"
venv="$tc/venv"
pyenv="$tc/pyenv"

env_lines() {
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  local cu="$site/nvidia/cu13"
  echo "export PATH=\"$cu/bin:$venv/bin:\$PATH\""
  echo "export NVCC=\"$cu/bin/nvcc\""
  echo "export LIBCLANG_PATH=\"$site/clang/native\""
  echo "export FLASHKERNELS_KERNEL_CACHE=\"$tc/kernel-cache\""
  echo "export VIRTUAL_ENV=\"$venv\""
  echo "export FK_TEST_PYTHON=\"$pyenv/bin/python\""
}

install() {  # install VENV STAMP PACKAGES...
  local env="$1" stamp="$2"
  shift 2
  [ -f "$stamp" ] && return 0
  mkdir -p "$tc"
  [ -x "$env/bin/python" ] || python3 -m venv "$env"
  "$env/bin/pip" install -q --disable-pip-version-check "$@" >&2
  touch "$stamp"
}

# Bump the stamp's number when this list changes, so that existing venvs get the change.
# ruff and clang-format are pinned exactly: another version formats differently.
install "$venv" "$tc/.stamp-v3" \
  "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
  "libclang==18.1.1" "maturin>=1.7,<2" "auditwheel>=6,<7" \
  "ruff==0.17.6" "clang-format==22.1.8"

case "${1:-}" in
  --test-env)
    echo "bootstrap: the test Python (.toolchain/pyenv; torch is ~5 GB the first time)" >&2
    install "$pyenv" "$tc/.stamp-pyenv-v1" \
      "numpy" "pytest" "jax[cpu]" "torch==2.15.*" "matplotlib" ;;
  --env) env_lines ;;
esac
