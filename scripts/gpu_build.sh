#!/usr/bin/env bash
# Builds everything the GPU machine runs into .gpu/ (git-ignored), for the device tool to
# carry: the Rust test binaries (release), the CLI, the abi3 wheel, and the Python tests
# and benchmark scripts travel with the working tree. The GPU machine has no Rust.
#   scripts/gpu_build.sh && (device) bash scripts/gpu_check.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
eval "$(bash scripts/bootstrap.sh --env)"

rm -rf .gpu && mkdir -p .gpu/bin .gpu/wheel
# Test executables: cargo prints their paths as JSON messages.
cargo test --release --no-run --message-format=json 2>/dev/null \
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
cp target/release/flashkernels .gpu/bin/flashkernels
maturin build --release --quiet -o .gpu/wheel >/dev/null
# The GPU machine's Python has torch, cupy and jax but no pytest: bring it as wheels.
python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .gpu/pywheels \
  pytest iniconfig pluggy packaging pygments
ls -la .gpu/bin .gpu/wheel
du -sh .gpu
