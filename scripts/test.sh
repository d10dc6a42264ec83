#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: toolchain set-up (into .toolchain/), lint,
# Rust tests (CUDA build and CPU-only build), the CUDA kernels on a CPU emulator (the C++
# suites, then the Rust path of every op on the emulated device), the Python wheel and
# its tests. GPU tests are reported as ignored/skipped on a machine
# without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test-env
eval "$(bash scripts/bootstrap.sh --env)"

echo "== format and lint"
# Python (every *.py of the repository; config in pyproject.toml's [tool.ruff]): seconds.
ruff check --no-cache .
ruff format --check --no-cache .
# CUDA C++ (config in .clang-format).
find kernels -name '*.cu' -o -name '*.cuh' -o -name '*.h' | sort | xargs clang-format --dry-run -Werror
cargo fmt --check
cargo clippy --all-targets --features python -- -D warnings
# The Hopper kernels' sm_90a code: no spills, and no wgmma that ptxas serialized (about a
# minute; the build only prints those as warnings).
bash scripts/ptxas_usage.sh --hopper-check target/ptxas_hopper.tsv

echo "== Rust tests (with the CUDA kernels built in)"
cargo test --release

echo "== Rust tests, CPU-only build (no nvcc involved)"
cargo test --release --no-default-features --lib --tests

echo "== CUDA kernels on the CPU emulator (tests/emulator, against an f64 reference)"
bash scripts/emulate_kernels.sh

echo "== The Rust CUDA path of every op on the emulated device (feature emulator)"
RUSTFLAGS="-D warnings" bash scripts/emulate_rust_path.sh

echo "== Python wheel and tests"
rm -rf target/wheels
maturin build --release --quiet -o target/wheels
bash scripts/check_wheel.sh target/wheels/*.whl  # manylinux_2_28, installable where torch is
"$FK_TEST_PYTHON" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps target/wheels/*.whl
# Run from python/tests so the installed wheel, not the source folder, is imported. torch is
# there (CPU): autograd, opcheck, torch.compile and the torch.distributed (gloo) tests run.
(cd python/tests && "$FK_TEST_PYTHON" -m pytest -q -rs .)
