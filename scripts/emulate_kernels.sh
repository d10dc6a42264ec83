#!/usr/bin/env bash
# Runs the CUDA kernels (kernels/) without a GPU: tests/emulator/ compiles the real kernel
# sources as host C++ against an emulator of CUDA thread blocks (warp-level mma.sync,
# ldmatrix, shuffles, cp.async; Hopper's TMA, mbarriers and wgmma for the sm_90a kernels,
# which the suites run on an emulated Hopper device) and checks them against an f64 reference: the attention
# forward suite, the backward suite (which includes forward-then-backward cases), the
# convolution / pooling suite, the Longformer forward suite, the Longformer backward
# suite, the fused feed-forward suite, the Linformer projection suite and the Reformer
# LSH attention forward suite. Each suite is built three ways (scripts/lib_emulator.sh)
# and run as:
#   plain   every case, threads in order (as the suites always ran); then every case once
#           more under an adversarial schedule: cases 0, 3, 6, ... with a warp running ahead
#           (runahead), 1, 4, 7, ... with the last warp ahead (runahead-last), 2, 5, 8, ...
#           with warps in a random order (random:$EMU_SEED, default 1); and cases 0, 3, 6,
#           ... once more with warps stepped last to first (reverse)
#   race    every case under the shared-memory race check (a missing barrier is a hazard,
#           whatever the schedule)
#   asan    AddressSanitizer + UBSan (alignment included) on cases 0, 3, 6, ... (every case
#           of the cheap conv, ffn, linformer and reformer suites): exact global allocations,
#           poisoned shared-memory tail
# and the negative controls (tests/emulator/negative/controls.cpp): planted bugs that each
# check must catch. A control that passes is a failure of this script.
# Needs g++ and the CUDA headers that scripts/bootstrap.sh installs. Exits non-zero on any
# failure. Usage: scripts/emulate_kernels.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(bash scripts/bootstrap.sh --env)"
source scripts/lib_emulator.sh
obj="$root/target/emulator"
mkdir -p "$obj"
emu_overlay "$root" "$root" "$obj"
suites=(fwd bwd conv longformer longformer_bwd ffn linformer reformer)
seed="${EMU_SEED:-1}"
max_jobs="$(nproc)"

# A small job pool: at most max_jobs commands at once, each with its own log, status file
# (LOG.rc) and seconds taken (LOG.s). Jobs are queued longest first, so the last are short.
pool_run() { # LOG COMMAND...
  local log=$1
  shift
  while [ "$(jobs -rp | wc -l)" -ge "$max_jobs" ]; do wait -n || true; done
  (
    t0=$SECONDS
    status=0
    "$@" >"$log" 2>&1 || status=$?
    echo "$status" >"$log.rc"
    echo "$((SECONDS - t0))" >"$log.s"
  ) &
}
status_of() { cat "$1.rc" 2>/dev/null || echo 1; }
# Runs a program with env assignments: env_run VAR=VALUE... -- PROGRAM ARGS...
env_run() {
  local vars=()
  while [ "$1" != -- ]; do
    vars+=("$1")
    shift
  done
  shift
  env "${vars[@]}" "$@"
}

# ---- Build: 8 suites x 3 flavours, and the controls in 3 flavours.
start=$SECONDS
total_start=$SECONDS
rm -f "$obj"/*.log "$obj"/*.rc "$obj"/*.s
for flavour in asan race plain; do
  for s in longformer_bwd bwd longformer fwd linformer reformer conv ffn; do
    bin="$obj/${s}_test"
    [ "$flavour" = plain ] || bin="$obj/${s}_test_$flavour"
    pool_run "$obj/build_${s}_$flavour.log" \
      emu_build "$flavour" "tests/emulator/${s}_test.cpp" "$bin" "$root" "$root" "$obj"
  done
  pool_run "$obj/build_controls_$flavour.log" \
    emu_build "$flavour" tests/emulator/negative/controls.cpp "$obj/controls_$flavour" \
    "$root" "$root" "$obj"
done
wait
build_failed=0
for log in "$obj"/build_*.log; do
  if [ "$(status_of "$log")" -ne 0 ]; then
    echo "BUILD FAILED: $(basename "$log" .log)"
    cat "$log"
    build_failed=1
  fi
done
echo "emulator built (g++, 3 flavours) in $((SECONDS - start)) s"
[ "$build_failed" -eq 0 ] || exit 1

# ---- Runs. Each: a name (SUITE:VARIANT), its log, and the command, kept for the report.
start=$SECONDS
runs=()
declare -A command_of
queue() { # NAME ENV... -- PROGRAM ARGS...
  local name=$1
  shift
  runs+=("$name")
  command_of[$name]="$*"
  pool_run "$obj/run_$name.log" env_run "$@"
}
for s in longformer longformer_bwd fwd bwd linformer reformer conv ffn; do
  queue "$s:race" EMU_SCHEDULE=inorder -- "$obj/${s}_test_race"
  if [ "$s" = conv ] || [ "$s" = ffn ] || [ "$s" = linformer ] || [ "$s" = reformer ]; then
    queue "$s:asan" EMU_SCHEDULE=inorder -- "$obj/${s}_test_asan"
  else
    queue "$s:asan" EMU_SCHEDULE=inorder EMU_CASES=3:0 -- "$obj/${s}_test_asan"
  fi
  queue "$s:inorder" EMU_SCHEDULE=inorder -- "$obj/${s}_test"
  queue "$s:runahead" EMU_SCHEDULE=runahead EMU_CASES=3:0 -- "$obj/${s}_test"
  queue "$s:runahead-last" EMU_SCHEDULE=runahead-last EMU_CASES=3:1 -- "$obj/${s}_test"
  queue "$s:random" EMU_SCHEDULE="random:$seed" EMU_CASES=3:2 -- "$obj/${s}_test"
  # Warps last to first: how a Hopper kernel's consumer released an mbarrier phase before
  # all its threads had waited on it (a late thread then missed the phase) was found.
  queue "$s:reverse" EMU_SCHEDULE=reverse EMU_CASES=3:0 -- "$obj/${s}_test"
done
# Negative controls: flavour, mode, what the failure must say.
controls=(
  "asan global-overread AddressSanitizer: heap-buffer-overflow"
  "asan global-overwrite AddressSanitizer: heap-buffer-overflow"
  "asan smem-overwrite AddressSanitizer: use-after-poison"
  "asan misaligned-uint4 misaligned address"
  "plain global-overread emu: invalid memory access"
  "plain global-overwrite emu: invalid memory access"
  "race smem-overwrite RACE access past the launch's dynamic shared memory"
  "race missing-syncthreads RACE read-after-write"
  "race refill-while-read RACE"
  "race missing-syncwarp RACE read-after-write"
  "race missing-cp-async-wait RACE read of a cp.async destination before its wait"
  "plain wgmma-before-tma-lands emu: wgmma read shared memory whose TMA has not landed"
  "plain wgmma-accumulator-in-flight emu: wgmma accumulator written while the wgmma was in flight"
  "plain mbarrier-phase-never-completes emu: deadlock: threads wait at a barrier that the others never reach (waiting in: mbarrier.try_wait"
  "plain setmaxnreg-over-register-file emu: deadlock: threads wait at a barrier that the others never reach (waiting in: setmaxnreg.inc"
)
for c in "${controls[@]}"; do
  read -r flavour mode _ <<<"$c"
  pool_run "$obj/control_${flavour}_$mode.log" "$obj/controls_$flavour" "$mode"
done
pool_run "$obj/control_selftest.log" "$obj/controls_asan" selftest
wait

failed=0
for s in "${suites[@]}"; do
  echo "-- ${s} suite (per case: rel. error / max abs. error of each output)"
  cat "$obj/run_$s:inorder.log"
done
echo "-- race check, sanitizers, adversarial schedules (last line; the whole log on failure)"
for name in "${runs[@]}"; do
  log="$obj/run_$name.log"
  st="$(status_of "$log")"
  if [ "$st" -ne 0 ]; then
    failed=1
    echo "$name FAILED (exit status $st): ${command_of[$name]}"
    echo "  (one case again: the same with EMU_CASES dropped and the case index appended)"
    cat "$log"
  elif [ "${name#*:}" != inorder ]; then
    printf "%-28s %s\n" "$name" "$(tail -n 1 "$log")"
  fi
done
echo "-- negative controls (each must fail, saying what it caught)"
for c in "${controls[@]}"; do
  read -r flavour mode want <<<"$c"
  log="$obj/control_${flavour}_$mode.log"
  if [ "$(status_of "$log")" -ne 0 ] && grep -qF -- "$want" "$log"; then
    printf "%-34s caught: %s\n" "$flavour $mode" "$(grep -m1 -F -- "$want" "$log" | cut -c1-110)"
  else
    failed=1
    echo "$flavour $mode: NOT CAUGHT (wanted a failure saying \"$want\"):"
    cat "$log"
  fi
done
if [ "$(status_of "$obj/control_selftest.log")" -eq 0 ]; then
  echo "emulator self-test: $(tail -n 1 "$obj/control_selftest.log")"
else
  failed=1
  echo "emulator self-test FAILED:"
  cat "$obj/control_selftest.log"
fi
echo "slowest jobs (s): $(for f in "$obj"/*.log.s; do echo "$(cat "$f") $(basename "$f" .log.s)"; done |
  sort -rn | head -n 6 | tr '\n' ' ')"
echo "emulated suites ran in $((SECONDS - start)) s; emulate_kernels.sh took $((SECONDS - total_start)) s"
exit "$failed"
