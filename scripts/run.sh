#!/usr/bin/env bash
# The main job: every op (attention, Longformer, Linformer, Reformer, conv2d, pooling, the
# FFN; forward and backward) over a fixed set of shapes, on the GPU when there is one
# (checked against the CPU reference, timed), otherwise on the CPU reference. Options:
# --json, --op, --quick, --cpu.
# Installs the toolchain into .toolchain/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
eval "$(bash scripts/bootstrap.sh --env)"
cargo run --release --quiet --bin flashkernels -- "$@"
