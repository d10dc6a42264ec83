#!/usr/bin/env bash
# Runs the CUDA kernels (kernels/) without a GPU: tests/emulator/ compiles the real kernel
# sources as host C++ against an emulator of CUDA thread blocks (warp-level mma.sync,
# ldmatrix, shuffles, cp.async) and checks them against an f64 reference: the attention
# forward suite, the backward suite (which includes forward-then-backward cases), the
# convolution / pooling suite, the Longformer forward suite and the Longformer backward
# suite.
# Needs g++ and the CUDA headers that scripts/bootstrap.sh installs. Exits non-zero on any
# failure. Usage: scripts/emulate_kernels.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(bash scripts/bootstrap.sh --env)"
cuda_include="$(dirname "$NVCC")/../include"
obj="$root/target/emulator"

# The kernels include "../common/launch.cuh" and "../common/mma_sm80.cuh" relative to
# themselves. To build the real sources against the emulator's versions of those two
# headers without copying anything, the tests see kernels/ through an overlay of symlinks,
# emulated/: attention/*, conv/*, include/ and common/gemm_sm80.cuh are the real files, the
# other common/* are tests/emulator/mock/*. (A quoted include is looked up beside the path
# the including file was opened by, which is the overlay's.)
rm -rf "$obj/emulated"
mkdir -p "$obj/emulated/attention" "$obj/emulated/conv" "$obj/emulated/common"
ln -s "$root"/kernels/attention/* "$obj/emulated/attention/"
ln -s "$root"/kernels/conv/* "$obj/emulated/conv/"
ln -s "$root"/tests/emulator/mock/* "$obj/emulated/common/"
ln -s "$root/kernels/common/gemm_sm80.cuh" "$obj/emulated/common/"
ln -s "$root/kernels/include" "$obj/emulated/include"

# -fno-strict-aliasing: the kernels type-pun through reinterpret_cast, as CUDA code may.
flags=(-std=c++17 -O2 -fno-strict-aliasing -Wall -Wextra -Wno-unknown-pragmas
  -I"$obj" -I"$root/tests/emulator" -I"$root" -isystem "$cuda_include")
suites=(fwd bwd conv longformer longformer_bwd)

start=$SECONDS
pids=()
for s in "${suites[@]}"; do
  g++ "${flags[@]}" "tests/emulator/${s}_test.cpp" -o "$obj/${s}_test" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "emulator built (g++) in $((SECONDS - start)) s"

# The suites run side by side; each one's report is printed once it is complete.
start=$SECONDS
pids=()
for s in "${suites[@]}"; do
  "$obj/${s}_test" >"$obj/${s}_test.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!suites[@]}"; do
  s=${suites[$i]}
  status=0
  wait "${pids[$i]}" || status=$?
  echo "-- ${s} suite (per case: rel. error / max abs. error of each output)"
  cat "$obj/${s}_test.log"
  if [ "$status" -ne 0 ]; then
    echo "${s} suite FAILED (exit status $status); one case again: $obj/${s}_test CASE_INDEX"
    failed=1
  fi
done
echo "emulated suites ran in $((SECONDS - start)) s"
exit "$failed"
