#!/usr/bin/env bash
# Builds everything the GPU machine runs into .gpu/ (git-ignored), for the device tool to
# carry (64 MiB at most): the Rust GPU test binaries and the CLI (release, stripped), the
# abi3 wheel, and pytest as wheels; the Python tests and bench scripts travel with the
# working tree. The GPU machine has no Rust and no registry.
#   scripts/gpu_build.sh, then on the device: bash scripts/gpu_check.sh quick / bench
# Kernels are compiled for FLASHKERNELS_CUDA_ARCHS (default here sm_90a: the lent GPUs are
# H100/H200; the full list would not fit the carry limit), in their own target folder so
# the usual builds keep their artifacts.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
eval "$(bash scripts/bootstrap.sh --env)"
export FLASHKERNELS_CUDA_ARCHS="${FLASHKERNELS_CUDA_ARCHS:-sm_90a}"
export CARGO_TARGET_DIR="$root/target/gpu"

rm -rf .gpu && mkdir -p .gpu/bin .gpu/wheel
# The GPU test executables: cargo prints their paths as JSON messages.
cargo test --release --no-run --message-format=json --test 'gpu_*' 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' \
  | while read -r exe; do
      name="$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
      cp "$exe" ".gpu/bin/test-$name"
    done
cargo build --release --bin flashkernels
cp "$CARGO_TARGET_DIR/release/flashkernels" .gpu/bin/flashkernels
strip .gpu/bin/*
maturin build --release --quiet -o .gpu/wheel >/dev/null
# The GPU machine's Python has torch, cupy and jax but no pytest: bring it as wheels.
python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .gpu/pywheels \
  pytest iniconfig pluggy packaging pygments
# The commit the results belong to (the device's copy of the tree has no .git).
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!benches/results' || echo -dirty)" > .gpu/COMMIT
ls -la .gpu/bin .gpu/wheel
size=$(du -sm .gpu | cut -f1)
echo ".gpu: ${size} MiB (carry limit 64 MiB)"
[ "$size" -lt 64 ] || { echo "too large to carry" >&2; exit 1; }
