"""The GPU check, in two steps that each fit one device call (see scripts/gpu_check.sh).

    python3 scripts/gpu_check.py quick [--budget 270] [--out DIR]
    python3 scripts/gpu_check.py bench [--budget 270] [--out DIR]

Runs on the GPU machine over what scripts/gpu_build.sh left in .gpu/ (no Rust there).
Each step has a hard time budget: phases run in priority order, the steps of a phase run
side by side (16 cores, one GPU), every step gets a timeout that leaves room for the
phases after it, and a step that no longer fits is skipped and reported, so the command
always ends with its results written instead of being killed.

quick: correctness of every kernel family.
  1. smoke: one small case of every kernel (the `smoke` test of each Rust GPU suite).
  2. the Rust GPU suites (all their ignored tests) and a covering subset of the Python
     GPU tests (every op, dtype and option value at least once; torch autograd and
     torch.compile on CUDA included), side by side.
  3. compute-sanitizer memcheck, racecheck, synccheck and initcheck over the smoke tests,
     and the main job (the CLI: every op checked against the CPU reference and timed).
bench: benches/gpu_bench_all.py, every op against its peer, headline cases first.

Writes into --out (default $OUT): <step>.json (the schema scripts/make_record.py reads)
and <step>.log; bench also bench.md. Then, here: python3 scripts/make_record.py DIRS.
"""

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "/tmp/fk-site"
LOG_LIMIT = 1 << 20  # bytes kept of each step's output (the tail): 14 steps stay under 16 MiB
RUST_SUITES = [
    "gpu_attention",
    "gpu_attention_full",
    "gpu_longformer",
    "gpu_conv",
    "gpu_ffn",
    "gpu_linformer",
    "gpu_reformer",
]
SMOKE_SUITES = ["gpu_attention_full", "gpu_longformer", "gpu_conv", "gpu_ffn", "gpu_linformer", "gpu_reformer"]
SANITIZERS = ["memcheck", "racecheck", "synccheck", "initcheck"]


class Step:
    """One command with a name, a one-line title, and a cap on its run time (seconds)."""

    def __init__(self, name, title, cmd, cap, env=None):
        self.name, self.title, self.cmd, self.cap, self.env = name, title, cmd, cap, env or {}


class Runner:
    """Runs phases of steps against one deadline and collects their results."""

    def __init__(self, budget, min_step=10, after_phase=None):
        self.start = time.time()
        self.deadline = self.start + budget
        self.min_step = min_step
        self.results = []
        self.logs = []
        self.after_phase = after_phase  # saves what is known so far (a kill loses little)

    def left(self):
        return self.deadline - time.time()

    def phase(self, steps, reserve=0.0):
        """Runs `steps` side by side, each within min(cap, time left - reserve)."""
        allowed = self.left() - reserve
        todo = []
        for s in steps:
            if allowed < self.min_step:
                self._record(s, "skipped", 0.0, "", f"budget: {allowed:.0f} s left for this phase")
            else:
                todo.append(s)
        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            for s, (status, secs, out) in zip(todo, pool.map(lambda s: self._run(s, min(s.cap, allowed)), todo)):
                self._record(s, status, secs, out, None)
        if self.after_phase:
            self.after_phase()

    def _run(self, step, timeout):
        env = dict(os.environ, **step.env)
        t0 = time.time()
        with tempfile.TemporaryFile() as f:
            try:
                p = subprocess.Popen(
                    step.cmd, shell=True, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
                try:
                    rc = p.wait(timeout=timeout)
                    status = "pass" if rc == 0 else "fail"
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.wait()
                    status = "timeout"
            except OSError as e:
                status = "fail"
                f.write(f"could not start: {e}\n".encode())
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_LIMIT))
            out = f.read().decode("utf-8", "replace")
        if status == "timeout":
            out += f"\n[cut: the step's {timeout:.0f} s ran out]\n"
        return status, time.time() - t0, out

    def _record(self, step, status, secs, out, reason):
        counts = count_tests(out)
        if status == "pass" and counts.get("failed"):
            status = "fail"
        tail = reason or "\n".join(out.strip().splitlines()[-6:])
        self.results.append(
            {
                "name": step.name,
                "title": step.title,
                "status": status,
                "seconds": round(secs, 1),
                "counts": counts,
                "summary": tail,
                "command": step.cmd,
            }
        )
        self.logs.append(f"===== {step.name} [{status}, {secs:.0f} s]: {step.cmd}\n{out}\n")
        print(f"{step.name:<24} {status:<8} {secs:6.0f} s  {counts}", flush=True)


def count_tests(out):
    """Passed / failed / skipped counts from cargo test, pytest and compute-sanitizer."""
    counts = {}
    if re.search(r"^test \S+ \.\.\. ", out, re.M):  # cargo's per-test lines survive a cut
        counts["passed"] = len(re.findall(r"^test \S+ \.\.\. ok$", out, re.M))
        counts["failed"] = len(re.findall(r"^test \S+ \.\.\. FAILED$", out, re.M))
    # pytest's closing line: "3 failed, 120 passed, 4 skipped, 500 deselected in 61.2s"
    for line in re.findall(r"^=*\s*((?:\d+ \w+,? ?)+) in [\d.]+s", out, re.M):
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", line):
            what = "failed" if what.startswith("error") else what
            counts[what] = counts.get(what, 0) + int(n)
    errs = [int(e) for e in re.findall(r"ERROR SUMMARY: (\d+) error", out)]
    if errs:
        counts["sanitizer_errors"] = sum(errs)
        counts["failed"] = counts.get("failed", 0) + sum(errs)
    return counts


def built_commit():
    """The commit .gpu/ was built from (gpu_build.sh writes it: the device has no .git)."""
    try:
        with open(os.path.join(ROOT, ".gpu", "COMMIT")) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def meta(kind, budget):
    smi = subprocess.run(
        "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader", shell=True, capture_output=True, text=True
    )
    name, _, driver = (smi.stdout.strip().splitlines() or ["none (no nvidia-smi output)"])[0].partition(", ")
    commit = os.environ.get("FK_COMMIT") or built_commit()
    return {
        "kind": kind,
        "device": name,
        "driver": driver or None,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "budget_s": budget,
    }


def python_env():
    """Installs the wheel and pytest into SITE (the GPU machine has no registry)."""
    wheels = " ".join(
        shlex.quote(os.path.join(".gpu", d, w))
        for d in ("wheel", "pywheels")
        if os.path.isdir(os.path.join(ROOT, ".gpu", d))
        for w in sorted(os.listdir(os.path.join(ROOT, ".gpu", d)))
    )
    return (
        f"python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade --target {SITE} {wheels}"
    )


def sanitizer():
    """compute-sanitizer from PATH, else from a CUDA toolkit folder."""
    found = shutil.which("compute-sanitizer") or next(
        iter(
            sorted(
                glob.glob("/usr/local/cuda*/compute-sanitizer/compute-sanitizer")
                + glob.glob("/usr/local/cuda*/bin/compute-sanitizer")
            )
        ),
        None,
    )
    return shlex.quote(found) if found else "compute-sanitizer"


def rust_test(suite, args):
    return f".gpu/bin/test-{suite} --ignored {args}"


def quick_steps():
    smoke = [
        Step(
            f"smoke-{s}", f"{s}: one small case of every kernel vs the CPU reference", rust_test(s, "--exact smoke"), 45
        )
        for s in SMOKE_SUITES
    ]
    # On an H100 / H200 the dense attention forward, the conv forward and the FFN take their
    # Hopper kernels (every GPU step above and below tests those); their sm80 kernels once
    # more on the same device.
    smoke += [
        Step(
            f"smoke-{s}-sm80",
            f"{s} on the sm80 kernels (FLASHKERNELS_NO_SM90=1)",
            rust_test(s, "--exact smoke"),
            45,
            {"FLASHKERNELS_NO_SM90": "1"},
        )
        for s in ("gpu_attention_full", "gpu_conv", "gpu_ffn")
    ]
    suites = [
        Step(
            f"rust-{s}",
            f"{s}: every Rust GPU test vs the CPU reference",
            rust_test(s, "--skip smoke --test-threads 4"),
            110,
        )
        for s in RUST_SUITES
    ]
    # Two pytest processes side by side (16 cores, one GPU), so that neither outgrows its
    # timeout as the ops grow.
    py = [
        Step(
            name,
            f"Python GPU tests of {what}, a covering subset (every dtype and option; torch autograd and "
            "torch.compile on CUDA)",
            # from python/tests, so the installed wheel is imported, not the sources
            "cd python/tests && python3 -m pytest -q -rs -p no:cacheprovider --fk-quick --fk-require-gpu " + files,
            110,
            {"PYTHONPATH": SITE},
        )
        for name, what, files in (
            (
                "python-gpu",
                "dense attention, convolution, Longformer",
                "test_attention_gpu.py test_conv_gpu.py test_longformer_gpu.py",
            ),
            (
                "python-gpu-2",
                "the FFN, Linformer, Reformer",
                "test_ffn_gpu.py test_linformer_gpu.py test_reformer_gpu.py",
            ),
        )
    ]
    sanitizers = [
        Step(
            f"sanitizer-{tool}",
            f"compute-sanitizer {tool} over the smoke tests",
            " && ".join(
                f"{sanitizer()} --tool {tool} --error-exitcode 1 " + rust_test(s, "--exact smoke") for s in SMOKE_SUITES
            ),
            90,
        )
        for tool in SANITIZERS
    ]
    # A main job that fell back to the CPU reference has proven nothing here: fail it.
    cli = Step(
        "main-job",
        "the main job (--quick: small shapes): every op vs the CPU reference",
        ".gpu/bin/flashkernels --quick > /tmp/fk-main.txt; rc=$?; cat /tmp/fk-main.txt; "
        "[ $rc -eq 0 ] && ! head -n 1 /tmp/fk-main.txt | grep -q 'CPU reference'",
        60,
    )
    env = Step("python-env", "install the wheel and pytest", python_env(), 60)
    # (steps, seconds kept for the phases after them)
    return [([env], 240), (smoke, 200), (suites + py, 90), (sanitizers + [cli], 0)]


def run_quick(runner):
    for steps, reserve in quick_steps():
        # A short budget still gives every phase a minute before it is cut.
        runner.phase(steps, min(reserve, max(0.0, runner.left() - 60)))


def run_bench(args, runner):
    runner.phase([Step("python-env", "install the wheel", python_env(), 60)], min(60, max(0.0, runner.left() - 60)))
    left = runner.left() - 15
    runner.phase(
        [
            Step(
                "bench",
                "every op against its peer (benches/gpu_bench_all.py)",
                f"python3 benches/gpu_bench_all.py --out {shlex.quote(args.out)} "
                f"--budget {max(0, left - 20):.0f} --rounds {args.rounds}",
                left,
                {"PYTHONPATH": SITE},
            )
        ]
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["quick", "bench"])
    ap.add_argument("--budget", type=float, default=270, help="seconds for the whole step")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/fk-out"))
    ap.add_argument("--rounds", type=int, default=2, help="bench: interleaved rounds")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    doc = {}

    def save():
        if args.step == "bench":  # the driver writes bench.json; keep its rows
            path = os.path.join(args.out, "bench.json")
            if os.path.exists(path):
                with open(path) as f:
                    doc.update(json.load(f))
        doc["steps"] = runner.results
        doc["meta"] = {
            **doc.get("meta", {}),
            **meta(args.step, args.budget),
            "elapsed_s": round(time.time() - runner.start, 1),
        }
        doc["status"] = "pass" if all(s["status"] == "pass" for s in runner.results) else "fail"
        with open(os.path.join(args.out, f"{args.step}.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(args.out, f"{args.step}.log"), "w") as f:
            f.write("".join(runner.logs))

    runner = Runner(args.budget, after_phase=save)
    if args.step == "quick":
        run_quick(runner)
    else:
        run_bench(args, runner)
    ok = doc["status"] == "pass"
    print(
        f"gpu_check {args.step}: {doc['status']} in {doc['meta']['elapsed_s']:.0f} s "
        f"({sum(s['status'] == 'pass' for s in runner.results)}/{len(runner.results)} steps passed)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
