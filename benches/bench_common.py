"""What the per-op GPU benches share: the error measure, the timers (CUDA events on a GPU,
wall clock for --dry-run on the CPU), interleaved timing of contenders, the run's
metadata and writing <out>/<name>.json and .md.

Used by gpu_bench_ffn.py and gpu_bench_linformer.py (the older gpu_bench*.py predate it).
"""

import datetime
import json
import os
import statistics
import subprocess
import time

import torch


def rel_err(got, want):
    """Relative Frobenius error of `got` against `want`, in float32."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def cuda_timer(fn):
    """Median ms of fn over CUDA events (triton's do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def wall_timer(fn, reps=3):
    """--dry-run: a wall-clock median (ms) of a few calls, after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def timed(fns, rounds, timer):
    """Median-of-rounds times (ms), contenders interleaved; failures recorded as text."""
    times, errors = {n: [] for n in fns}, {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times[name].append(timer(fn))
            except Exception as e:  # e.g. a compile failure: recorded, the others still run
                errors[name] = f"{type(e).__name__}: {e}"[:200]
    return times, errors


def add_results(row, fns, times, errors, flops_of, ours):
    """row["results"][name] = {ms, tflops, rounds_ms} or {error}, for each contender in
    `fns` (flops_of(name): its FLOPs), then each peer's `ours_speedup` = its ms / ours."""
    row["results"] = {}
    for name in fns:
        ts = times.get(name)
        if not ts:
            row["results"][name] = {"error": errors.get(name, "no timing")}
            continue
        ms = statistics.median(ts)
        row["results"][name] = {"ms": ms, "tflops": flops_of(name) / ms / 1e9, "rounds_ms": ts}
    ours_ms = row["results"][ours].get("ms")
    for name, r in row["results"].items():
        if name != ours and ours_ms and r.get("ms"):
            r["ours_speedup"] = r["ms"] / ours_ms
    return row


def meta_of(device_name, dry_run):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "commit": commit or os.environ.get("FK_COMMIT", "unknown"),
        "torch": torch.__version__,
        "dry_run": dry_run,
    }


def write_outputs(out_dir, name, meta, rows, failed, md):
    """<out_dir>/<name>.json ({meta, rows, failed}) and <out_dir>/<name>.md; prints the table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "failed": failed}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)


# Our kernels kept on the sm80 (mma.sync) path: on an H100 / H200 the C entries otherwise
# take their TMA + wgmma kernels where they have them; FLASHKERNELS_NO_SM90 is read per call.
SM80_PATH = "flashkernels_sm80_path"


def sm80_path(fn):
    def run(*args, **kwargs):
        old = os.environ.get("FLASHKERNELS_NO_SM90")
        os.environ["FLASHKERNELS_NO_SM90"] = "1"
        try:
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ["FLASHKERNELS_NO_SM90"]
            else:
                os.environ["FLASHKERNELS_NO_SM90"] = old

    return run
