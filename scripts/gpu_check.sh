#!/usr/bin/env bash
# The GPU check, run on the GPU machine over what scripts/gpu_build.sh left in .gpu/. Two
# steps, one device call each, each under 5 minutes with a hard internal budget (what
# does not fit is skipped and reported, never killed halfway without results):
#   bash scripts/gpu_check.sh quick   # every kernel vs the CPU reference, Python GPU tests,
#                                     # compute-sanitizer (4 tools), the main job
#   bash scripts/gpu_check.sh bench   # every op against its peer, headline cases first
# Results: $OUT/quick.{json,log}, $OUT/bench.{json,md,log}; here, turn them into a record
# with `python3 scripts/make_record.py <quick dir> <bench dir>`. Options: --budget S.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_check.py "$@"
