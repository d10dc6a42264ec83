# Shared by scripts/emulate_kernels.sh and scripts/mutate_barriers.sh: how a source tree's
# kernels are built against the CPU emulator (tests/emulator/). Source it after
# `eval "$(bash scripts/bootstrap.sh --env)"` (the CUDA headers come from there).

# The kernels include "../common/launch.cuh" and "../common/mma_sm80.cuh" relative to
# themselves (kernels/attention/common/* one level further up). To build the real sources
# against the emulator's versions of those two headers without copying anything, the tests
# see kernels/ through an overlay of symlinks, OBJ/emulated/: every file of
# KERNELS_ROOT/kernels, linked one by one at the same relative path (the folders are real,
# so `..` stays inside the overlay), except common/launch.cuh and common/mma_sm80.cuh, which
# are tests/emulator/mock/*. (A quoted include is looked up beside the path the including
# file was opened by, which is the overlay's.)
# Usage: emu_overlay KERNELS_ROOT TESTS_ROOT OBJ
emu_overlay() {
  local kroot=$1 troot=$2 obj=$3 f
  rm -rf "$obj/emulated"
  while IFS= read -r f; do
    mkdir -p "$obj/emulated/$(dirname "$f")"
    ln -s "$kroot/kernels/$f" "$obj/emulated/$f"
  done < <(cd "$kroot/kernels" && find . -type f -printf '%P\n' | sort)
  mkdir -p "$obj/emulated/common"
  for f in "$troot"/tests/emulator/mock/*; do
    ln -sfn "$f" "$obj/emulated/common/$(basename "$f")"
  done
}

# Builds one emulator program in one of three flavours:
#   plain  -O2, the suites as they always ran (schedules chosen at run time: EMU_SCHEDULE)
#   race   the shared-memory race check: GCC's -fsanitize=thread instrumentation calls
#          the hooks in tests/emulator/emu_race.h (-DEMU_RACECHECK); linked without the TSan
#          runtime, with -rdynamic so that reports can name the kernel
#   asan   -fsanitize=address,undefined (alignment included), any report aborts
# Usage: emu_build FLAVOUR SOURCE OUTPUT KERNELS_ROOT TESTS_ROOT OBJ
# -fno-strict-aliasing: the kernels type-pun through reinterpret_cast, as CUDA code may.
emu_build() {
  local flavour=$1 src=$2 out=$3 kroot=$4 troot=$5 obj=$6
  local cuda_include
  cuda_include="$(dirname "$NVCC")/../include"
  local flags=(-std=c++17 -fno-strict-aliasing -Wall -Wextra -Wno-unknown-pragmas -Wno-psabi
    -I"$obj" -I"$troot/tests/emulator" -I"$kroot" -isystem "$cuda_include")
  case $flavour in
  plain) g++ "${flags[@]}" -O2 "$src" -o "$out" ;;
  race)
    g++ "${flags[@]}" -O2 -DEMU_RACECHECK -fsanitize=thread \
      --param tsan-instrument-func-entry-exit=0 -c "$src" -o "$out.o" &&
      g++ -rdynamic "$out.o" -o "$out" && rm -f "$out.o"
    ;;
  asan)
    g++ "${flags[@]}" -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
      -fno-sanitize-recover=all "$src" -o "$out"
    ;;
  *)
    echo "emu_build: unknown flavour $flavour" >&2
    return 2
    ;;
  esac
}
