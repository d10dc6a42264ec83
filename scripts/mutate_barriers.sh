#!/usr/bin/env bash
# Mutation test of the emulator's race detection: removes each barrier of the kernels under
# kernels/ (every __syncthreads, __syncwarp and cp_async_wait<N> call: the kernels' spelling
# of cp.async.wait_group), one at a time, in a temporary copy of kernels/ (the real sources
# are never modified), builds the suite(s) of that kernel against the emulator and runs them.
# A removal is "caught" when a suite fails. Detectors, cheapest first, stopping at the first
# that fails (or all of them with --all):
#   race       the race build (shared-memory hazard tracker), every case of the suite
#   runahead, runahead-last, random:1   the plain build under those schedules (NaN poison)
# Prints a table: file:line, barrier kind, caught / missed, by what, and the first report.
# A missed removal is a barrier the suites cannot tell from none: a test gap, or a barrier
# that is redundant (then remove it from the kernel, with the reason in the commit).
# Takes ~1 minute per barrier on 2 cores (about 50 barriers). Not run by CI.
# Usage: scripts/mutate_barriers.sh [--all] [PATH_FILTER]   (e.g. dense_fwd)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(bash scripts/bootstrap.sh --env)"
source scripts/lib_emulator.sh

all=0
filter=""
for a in "$@"; do
  case $a in
  --all) all=1 ;;
  *) filter=$a ;;
  esac
done

out_dir="$root/target/mutation"
mkdir -p "$out_dir"
table="$out_dir/table.txt"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Barrier sites: file, line, kind. Comments are ignored; so is the wrapper's definition in
# kernels/common/mma_sm80.cuh (the emulator replaces that header).
sites="$(python3 - "$filter" <<'EOF'
import pathlib, re, sys
pat = re.compile(r'\b(__syncthreads|__syncwarp|cp_async_wait<\d+>)\s*\(')
for f in sorted(pathlib.Path('kernels').rglob('*')):
    if f.suffix not in ('.cu', '.cuh') or f.name in ('mma_sm80.cuh', 'launch.cuh'):
        continue
    if sys.argv[1] and sys.argv[1] not in str(f):
        continue
    for n, line in enumerate(f.read_text().splitlines(), 1):
        code = line.split('//')[0]
        for m in pat.finditer(code):
            print(f, n, m.group(1))
EOF
)"

# The suites that run a kernel file.
suites_of() {
  case $1 in
  *dense_fwd*) echo fwd ;;
  *dense_bwd*) echo bwd ;;
  *longformer_fwd*) echo longformer ;;
  *longformer_bwd*) echo longformer_bwd ;;
  *gemm_sm80*) echo "conv ffn linformer" ;;
  kernels/conv/*) echo conv ;;
  kernels/ffn/*) echo ffn ;;
  kernels/linformer/*) echo linformer ;;
  *) echo "" ;;
  esac
}

# Runs a suite binary; prints the first line that says why it failed, returns its status.
run_suite() {
  local log=$1
  shift
  local status=0
  timeout 900 "$@" >"$log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    grep -m1 -E "RACE|emu:|FAILED|BAD|ERROR|runtime error" "$log" | cut -c1-150 || echo "exit $status"
  fi
  return "$status"
}

n_caught=0
n_missed=0
n_error=0
{
  printf "%-44s %-18s %-7s %-14s %s\n" "site" "kind" "verdict" "by" "first report"
} | tee "$table"
while read -r file line kind; do
  [ -n "$file" ] || continue
  suites="$(suites_of "$file")"
  tree="$work/tree"
  rm -rf "$tree"
  mkdir -p "$tree"
  cp -r "$root/kernels" "$tree/"
  # Replace the call on that line (the first of that kind) by a no-op.
  python3 - "$tree/$file" "$line" "$kind" <<'EOF'
import re, sys
path, line, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = open(path).read().split('\n')
new, n = re.subn(re.escape(kind) + r'\s*\(\s*\)', '(void)0', lines[line - 1], count=1)
if n != 1:
    sys.exit(f'cannot remove {kind} at {path}:{line}')
lines[line - 1] = new
open(path, 'w').write('\n'.join(lines))
EOF
  obj="$work/obj"
  rm -rf "$obj"
  mkdir -p "$obj"
  emu_overlay "$tree" "$root" "$obj"
  verdict=missed
  by="-"
  report=""
  detectors=(race runahead runahead-last random:1)
  for det in "${detectors[@]}"; do
    flavour=plain
    [ "$det" = race ] && flavour=race
    for s in $suites; do
      bin="$obj/${s}_$flavour"
      if [ ! -x "$bin" ]; then
        if ! emu_build "$flavour" "tests/emulator/${s}_test.cpp" "$bin" "$tree" "$root" "$obj" \
          >"$obj/build.log" 2>&1; then
          verdict=error
          by=build
          report="$(grep -m1 error "$obj/build.log" | cut -c1-150)"
          break 2
        fi
      fi
      sched=inorder
      [ "$det" != race ] && sched=$det
      if r="$(EMU_SCHEDULE=$sched run_suite "$obj/run.log" "$bin")"; then
        :
      else
        if [ "$verdict" = missed ]; then
          verdict=caught
          by="$det ($s)"
          report="$r"
        else
          by="$by, $det"
        fi
        [ "$all" = 1 ] || break 2
        break
      fi
    done
  done
  case $verdict in
  caught) n_caught=$((n_caught + 1)) ;;
  missed) n_missed=$((n_missed + 1)) ;;
  *) n_error=$((n_error + 1)) ;;
  esac
  printf "%-44s %-18s %-7s %-14s %s\n" "$file:$line" "$kind" "$verdict" "$by" "$report" |
    tee -a "$table"
done <<<"$sites"
echo "caught $n_caught, missed $n_missed, errors $n_error (table: $table)" | tee -a "$table"
[ "$n_missed" -eq 0 ] && [ "$n_error" -eq 0 ]
