#!/usr/bin/env bash
# Registers, spills and shared memory of every kernel, as ptxas reports them (-Xptxas -v),
# one sorted line per (arch, kernel): the evidence that a refactor did not make a kernel
# slower. Compiles each kernels/**/*.cu with build.rs's flags, for sm_80 and sm_90a.
#   scripts/ptxas_usage.sh [OUT.tsv]          (default: target/ptxas_usage.tsv)
#   diff old.tsv new.tsv                      (no output: nothing changed)
#   scripts/ptxas_usage.sh --hopper-check [OUT.tsv]
#     (CI, about a minute) only the sources that use the Hopper primitives (sm90.cuh), only
#     for sm_90a; fails where a kernel spills or ptxas serializes its wgmma (C7509 / C7510 /
#     C7514: the pipelining the Hopper kernels exist for, silently gone).
# Kernel names are mangled C++ (stable as long as the templates keep their names).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
hopper_check=0
if [ "${1:-}" = --hopper-check ]; then
  hopper_check=1
  shift
fi
out="${1:-target/ptxas_usage.tsv}"
eval "$(bash scripts/bootstrap.sh --env)"
archs="${PTXAS_ARCHS:-sm_80 sm_90a}"
[ "$hopper_check" = 0 ] || archs=sm_90a
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

gencodes=()
for a in $archs; do gencodes+=("-gencode=arch=compute_${a#sm_},code=$a"); done

compile() {
  local src="$1" log
  log="$work/$(echo "$src" | tr '/' '_').log"
  nvcc -std=c++17 --use_fast_math -O3 -Ikernels/include "${gencodes[@]}" -Xptxas -v \
    -c "$src" -o /dev/null >"$log" 2>&1 || { cat "$log" >&2; return 1; }
}
if [ "$hopper_check" = 1 ]; then
  # The sources whose includes reach kernels/common/sm90.cuh (nvcc -M: host preprocessing).
  for src in $(find kernels -name '*.cu' | sort); do
    nvcc -std=c++17 -Ikernels/include -M "$src" 2>/dev/null | grep -q 'common/sm90\.cuh' &&
      echo "$src"
  done >"$work/sources"
else
  find kernels -name '*.cu' | sort >"$work/sources"
fi
# Each source on its own (nvcc is single-threaded); two at a time on small machines.
jobs="${PTXAS_JOBS:-$(nproc)}"
status=0
while read -r src; do
  compile "$src" &
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || status=1; done
done <"$work/sources"
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || status=1; done
[ "$status" = 0 ] || { echo "ptxas_usage: a kernel failed to compile" >&2; exit 1; }

# ptxas prints, per kernel: "Compiling entry function 'NAME' for 'ARCH'", then
# "Used R registers, ... N bytes smem ..." and "B bytes stack frame, S bytes spill stores,
# L bytes spill loads".
cat "$work"/*.log | python3 -c '
import re, sys
rows, cur = {}, None
for line in sys.stdin:
    m = re.search(r"Compiling entry function .(\S+). for .(sm_\w+).", line)
    if m:
        cur = (m.group(2), m.group(1)); rows[cur] = {}
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        rows[cur].update(stack=m.group(1), spill_st=m.group(2), spill_ld=m.group(3))
    m = re.search(r"Used (\d+) registers", line)
    if m:
        rows[cur]["regs"] = m.group(1)
        s = re.search(r"(\d+) bytes smem", line)
        rows[cur]["smem"] = s.group(1) if s else "0"
print("arch\tkernel\tregs\tspill_stores\tspill_loads\tstack\tsmem")
for (arch, name), r in sorted(rows.items()):
    print("\t".join([arch, name, r.get("regs", "?"), r.get("spill_st", "?"),
                     r.get("spill_ld", "?"), r.get("stack", "?"), r.get("smem", "?")]))
' >"$out"
echo "ptxas_usage: $(($(wc -l <"$out") - 1)) kernels -> $out"

if [ "$hopper_check" = 1 ]; then
  bad=0
  if grep -h "serialized" "$work"/*.log; then
    echo "ptxas_usage: ptxas serialized the wgmma of the kernels above" >&2
    bad=1
  fi
  if awk -F'\t' 'NR > 1 && ($4 != 0 || $5 != 0) { print; found = 1 } END { exit !found }' "$out"; then
    echo "ptxas_usage: the kernels above spill (sm_90a)" >&2
    bad=1
  fi
  [ "$bad" = 0 ] || exit 1
  echo "ptxas_usage: $(wc -l <"$work/sources") Hopper sources: no spills, no serialized wgmma"
fi
