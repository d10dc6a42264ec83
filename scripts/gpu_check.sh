#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there) over what scripts/gpu_build.sh left in .gpu/:
# correctness first (Rust GPU tests, Python GPU tests against torch, the CLI), then the
# benchmark against torch's SDPA backends. Everything is logged under $OUT.
#   usage: bash scripts/gpu_check.sh [--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fk-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ==="; }

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/device.txt"
echo "commit: ${FK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" | tee -a "$OUT/device.txt"

step "Rust GPU tests"
for t in .gpu/bin/test-*; do
  echo "--- $t"
  timeout 300 "$t" --ignored --test-threads=1 2>&1 | tail -n 40 | tee -a "$OUT/rust-tests.log" || status=1
done

step "compute-sanitizer (memcheck) on the GPU tests, small cases"
if command -v compute-sanitizer >/dev/null; then
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    .gpu/bin/test-gpu_attention --ignored --test-threads=1 odd_lengths 2>&1 | tail -n 15 | tee "$OUT/sanitizer.log" || status=1
else
  echo "compute-sanitizer not found"
fi

step "CLI"
timeout 120 .gpu/bin/flashkernels 2>&1 | tee "$OUT/cli.log" || status=1

step "Python GPU tests"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheel/*.whl .gpu/pywheels/*.whl
export PYTHONPATH=/tmp/site
timeout 300 python3 -m pytest -q -rs python/tests 2>&1 | tail -n 30 | tee "$OUT/pytest.log" || status=1

if [ "${1:-}" != "--no-bench" ]; then
  step "benchmark"
  # Every suite (fwd, train, gqa, varlen, window); BENCH_ARGS narrows it (e.g. "--suite train").
  timeout 450 python3 benches/gpu_bench.py --out "$OUT" --rounds 2 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1
  timeout 300 python3 benches/gpu_bench_conv.py --out "$OUT" --rounds 2 2>&1 | tee "$OUT/bench_conv.log" || status=1
  timeout 300 python3 benches/gpu_bench_longformer.py --out "$OUT" --rounds 2 2>&1 | tee "$OUT/bench_longformer.log" || status=1
fi
echo
echo "gpu_check status: $status"
exit $status
