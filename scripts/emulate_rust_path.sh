#!/usr/bin/env bash
# The Rust CUDA path of every op, end to end, without a GPU: the crate built with the
# `emulator` feature (kernels/ compiled as host C++ against tests/emulator's CPU emulator,
# device memory in host memory, streams in order; see rust/device/emulated.rs), so the
# real validation, plans (Longformer work lists and splits, conv plan and workspace,
# varlen offsets), parameter structs and launches drive the real kernel sources. Runs:
#   1. the `smoke` test of each GPU suite (one small case of every kernel and path), and the
#      whole GPU suite of each op with a Hopper path on an emulated Hopper device,
#   2. the emulated device itself (unit tests) and the device-side argument checks
#      (tests/errors*.rs: fake pointers, rejected before anything is launched),
#   3. the main job on its small shapes (every op forward and backward, checked against the
#      CPU reference; non-zero exit on a mismatch).
# With --full, every GPU test of tests/gpu_*.rs instead of the smoke tests (minutes).
# Builds into its own target folder (target/emu) so it neither waits for nor invalidates
# target/. EMU_SCHEDULE (tests/emulator/emu.h) picks the emulator's warp schedule.
# Usage: scripts/emulate_rust_path.sh [--full]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(bash scripts/bootstrap.sh --env)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/emu}"
features=(--release --no-default-features --features emulator)

start=$SECONDS
cargo build "${features[@]}" --lib --bin flashkernels \
  --test gpu_attention_full --test gpu_longformer --test gpu_conv --test gpu_attention \
  --test gpu_ffn --test gpu_linformer --test gpu_reformer --test errors --test errors_device --test errors_conv \
  --test limits_device
echo "emulated crate built in $((SECONDS - start)) s"

start=$SECONDS
if [ "${1:-}" = "--full" ]; then
  cargo test "${features[@]}" --test gpu_attention_full --test gpu_longformer --test gpu_conv \
    --test gpu_attention --test gpu_ffn --test gpu_linformer --test gpu_reformer -- --ignored
else
  cargo test "${features[@]}" --test gpu_attention_full --test gpu_longformer --test gpu_conv \
    --test gpu_ffn --test gpu_linformer --test gpu_reformer -- --ignored smoke
fi
# The ops with an sm_90a path again on an emulated Hopper device (EMU_ARCH=sm90: the C
# entries take their TMA + wgmma kernels).
EMU_ARCH=sm90 cargo test "${features[@]}" --test gpu_ffn -- --ignored
EMU_ARCH=sm90 cargo test "${features[@]}" --test gpu_attention_full --test gpu_conv -- --ignored smoke
cargo test "${features[@]}" --lib --test errors --test errors_device --test errors_conv \
  --test limits_device
echo "GPU tests on the emulator ran in $((SECONDS - start)) s"

start=$SECONDS
"$CARGO_TARGET_DIR/release/flashkernels" --quick
echo "main job on the emulator ran in $((SECONDS - start)) s"
