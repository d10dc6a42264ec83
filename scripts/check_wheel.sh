#!/usr/bin/env bash
# Checks that a built wheel installs where torch's wheels do: its platform tag, in the file
# name and as `auditwheel show` reads the extension's symbol versions, must be
# manylinux_2_28 or older (glibc <= 2.28: RHEL 8, Ubuntu 20.04 and newer).
#   scripts/check_wheel.sh target/wheels/flashkernels-*.whl
# Needs auditwheel (PyPI, installed by scripts/bootstrap.sh into .toolchain/venv).
# FK_MAX_GLIBC=2.28 sets the newest glibc allowed.
set -euo pipefail
max="${FK_MAX_GLIBC:-2.28}"
[ "$#" -ge 1 ] || { echo "usage: $0 WHEEL..." >&2; exit 2; }
command -v auditwheel >/dev/null || {
  echo "check_wheel: auditwheel not found; run scripts/bootstrap.sh and" \
       'eval "$(scripts/bootstrap.sh --env)"' >&2
  exit 2
}
python="$(command -v python3 || command -v python)"
for whl in "$@"; do
  report="$(auditwheel show "$whl" 2>&1)" || { echo "$report" >&2; exit 1; }
  echo "$report"
  "$python" - "$whl" "$max" "$report" <<'EOF'
import os, re, sys
whl, max_glibc, report = sys.argv[1], sys.argv[2], sys.argv[3]
limit = tuple(int(x) for x in max_glibc.split("."))
legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}

def glibc(tag):
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag)
    if m:
        return int(m[1]), int(m[2])
    m = re.fullmatch(r"(manylinux\d+)_\w+", tag)
    return legacy.get(m[1]) if m else None

def check(where, tags):
    if not tags:
        sys.exit(f"check_wheel: {whl}: no platform tag found in {where}")
    for tag in tags:
        v = glibc(tag)
        if v is None or v > limit:
            sys.exit(f"check_wheel: {whl}: {where} says {tag}, need manylinux glibc <= {max_glibc}")

# The file name: name-version(-build)?-python-abi-platform.whl, platforms joined by '.'.
check("its file name", os.path.basename(whl)[: -len(".whl")].split("-")[-1].split("."))
# auditwheel: 'is consistent with the following platform tag: "manylinux_2_28_x86_64".'
flat = " ".join(report.split())
check("auditwheel show", re.findall(r'consistent with the following platform tag: "([^"]+)"', flat))
print(f"check_wheel: {os.path.basename(whl)}: manylinux, glibc <= {max_glibc}: ok")
EOF
done
