#!/usr/bin/env python3
"""Mutation test of the test suites: plants one known bug at a time (in the CPU references
and in a few kernels) in a temporary copy of the committed tree, runs the suites that must
see it, and prints whether they did. The real sources are never modified.

Each mutation is a literal replacement that must match its file exactly once (a pattern
that no longer matches is reported as "stale", and the run fails: update the table when the
code moves). Suites, cheapest first; a mutation is "caught" when any of its suites fails
(every suite is run with --all, so the table shows which ones see it):
  rust:T1,T2   cargo test --release (CPU-only build) of those test targets (and --lib)
  py:F1,F2     the pyo3 module built CPU-only (cargo, feature python) beside the Python
               sources, then pytest on those files of python/tests
  emu:S        tests/emulator/S_test.cpp built against the mutated kernels (plain build,
               in-order schedule), as scripts/emulate_kernels.sh does
Before any mutation the unmutated tree must pass every suite named in the table.

Takes ~2-4 minutes per mutation on 2 cores (builds are incremental). Not run by CI.
Usage: scripts/mutate_suites.py [--all] [--only SUBSTRING] [--skip-baseline]
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    suites: list
    every: bool = False  # replace every occurrence (at least one) instead of exactly one
    append: str = ""  # code added at the end of the file (a helper the replacement calls)


# What each mutation breaks, in words a reviewer can check against the diff it makes.
MUTATIONS = [
    # --- CPU references (rust/ops/*/reference.rs, problem.rs, tensor.rs)
    Mutation(
        "ref: causal/window diagonal aligned top-left instead of bottom-right",
        "rust/ops/attention/problem.rs",
        "let diag = i + nk - nq;",
        "let diag = i + nk - nk;",
        ["rust:reference_props,attention_variants", "py:test_attention_cpu.py"],
    ),
    Mutation(
        "ref: default softmax scale 1/D instead of 1/sqrt(D)",
        "rust/ops/common.rs",
        "1.0 / (head_dim as f32).sqrt()",
        "1.0 / (head_dim as f32)",
        ["rust:reference_props,attention_variants", "py:test_attention_cpu.py"],
    ),
    Mutation(
        "ref: GQA maps query head h to kv head h % heads_kv instead of h / group",
        "rust/ops/attention/reference.rs",
        "let hk = h / p.group_size();",
        "let hk = h % p.heads_kv;",
        ["rust:reference_props,attention_variants", "py:test_attention_cpu.py"],
    ),
    Mutation(
        "ref: Longformer global rows use the local projections",
        "rust/ops/longformer/reference.rs",
        "let (q, k, v) = if p.is_global(b, i) {",
        "let (q, k, v) = if false && p.is_global(b, i) {",
        ["rust:longformer", "py:test_longformer_api.py"],
    ),
    Mutation(
        "ref: conv padding shifts the window the wrong way (+pad)",
        "rust/ops/conv/reference.rs",
        "let i = (o * stride + t * dil).checked_sub(pad)?;",
        "let i = (o * stride + t * dil + pad).checked_sub(2 * pad)?.checked_add(pad)?;",
        ["rust:conv", "py:test_conv_cpu.py"],
    ),
    Mutation(
        "ref: max pooling ties go to the last maximum, not the first",
        "rust/ops/pool/reference.rs",
        "v > best",
        "v >= best",
        ["rust:conv", "py:test_conv_cpu.py"],
    ),
    Mutation(
        "ref: Linformer keeps padded keys in the projection",
        "rust/ops/linformer/reference.rs",
        "                    if p.padded(b, j) {\n"
        "                        continue;\n"
        "                    }\n"
        "                    let xr",
        "                    if false && p.padded(b, j) {\n"
        "                        continue;\n"
        "                    }\n"
        "                    let xr",
        ["rust:linformer", "py:test_linformer_cpu.py"],
    ),
    Mutation(
        "ref: Linformer with F = E drops dV's share of dE",
        "rust/ops/linformer/reference.rs",
        "project_backward(p, x.e, |hk| p.e_head(hk), x.v, &dvp, &mut dv, &mut de)?;",
        "project_backward(p, x.e, |hk| p.e_head(hk), x.v, &dvp, &mut dv, &mut vec![0.0; de.len()])?;",
        ["rust:linformer", "py:test_linformer_cpu.py"],
    ),
    Mutation(
        "ref: FFN tanh GELU without its cubic term",
        "rust/ops/ffn/reference.rs",
        "(x + GELU_CUBIC * x * x * x)",
        "(x)",
        ["rust:ffn", "py:test_ffn_cpu.py"],
        every=True,
    ),
    Mutation(
        "ref: bf16 outputs rounded by truncation instead of to nearest",
        "rust/tensor.rs",
        "bf16::from_f32",
        "bf16_truncated",
        ["py:test_attention_cpu.py,test_backward_cpu.py,test_longformer_api.py"],
        every=True,
        append="fn bf16_truncated(x: f32) -> bf16 {\n    bf16::from_bits((x.to_bits() >> 16) as u16)\n}\n",
    ),
    # --- kernels, on the emulator
    Mutation(
        "kernel: forward's causal/window band one key too wide on the right",
        "kernels/attention/dense_fwd_sm80.cuh",
        "rel > p.window_right",
        "rel > p.window_right + 1",
        ["emu:fwd"],
    ),
    Mutation(
        "kernel: backward's causal/window band one key too wide (the shared visible())",
        "kernels/attention/common/mask.cuh",
        "if (wr >= 0) ok = ok && j <= i + diag + wr;",
        "if (wr >= 0) ok = ok && j <= i + diag + wr + 1;",
        ["emu:bwd"],
    ),
    Mutation(
        "kernel: forward softmax scale applied in natural log instead of log2",
        "kernels/attention/dense_fwd_sm80.cuh",
        "softmax_scale * attn::kLog2e;",
        "softmax_scale;",
        ["emu:fwd"],
    ),
    Mutation(
        "kernel: GQA maps query head h to kv head h % group instead of h / group",
        "kernels/attention/dense_fwd_sm80.cuh",
        "const int head_kv = head / (",
        "const int head_kv = head % (",
        ["emu:fwd"],
    ),
    Mutation(
        "kernel: Longformer forward's local rows do not see global keys outside their band",
        "kernels/attention/longformer_fwd_sm80.cuh",
        "if (!packed && is_glob) key_any |=",
        "if (false && is_glob) key_any |=",
        ["emu:longformer"],
    ),
    Mutation(
        "kernel: Longformer backward's local rows do not see global keys (the shared pair())",
        "kernels/attention/common/mask.cuh",
        "return pass == FK_LONGFORMER_LOCAL ? (band || k_glob)",
        "return pass == FK_LONGFORMER_LOCAL ? (band)",
        ["emu:longformer_bwd"],
    ),
    Mutation(
        "kernel: conv input window off by one column of padding",
        "kernels/conv/conv_gemm_sm80.cuh",
        "w0 = q * op.stride_w - op.pad_w;",
        "w0 = q * op.stride_w - op.pad_w + 1;",
        ["emu:conv"],
    ),
    Mutation(
        "kernel: max pooling ties go to the last maximum",
        "kernels/conv/pool.cu",
        "if (v > best || v != v)",
        "if (v >= best || v != v)",
        ["emu:conv"],
    ),
    Mutation(
        "kernel: Linformer projection reads E's head 0 for every K/V head",
        "kernels/linformer/linformer_sm80.cuh",
        "a.group_map = IndexMap3{H, splits, 0, e_heads > 1 ? es.head : 0, 0};",
        "a.group_map = IndexMap3{H, splits, 0, 0, 0};",
        ["emu:linformer"],
    ),
    Mutation(
        "kernel: FFN second GEMM drops the residual",
        "kernels/ffn/ffn_sm80.cuh",
        "if (ep.residual != nullptr && col_in && m0 + m < ep.rows)",
        "if (false && ep.residual != nullptr && col_in && m0 + m < ep.rows)",
        ["emu:ffn"],
    ),
]


def sh(cmd, cwd, env=None, log=None, timeout=1800):
    """Runs cmd; returns (ok, last lines of its output)."""
    try:
        r = subprocess.run(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, "timeout"
    if log:
        Path(log).write_text(r.stdout)
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    # The first line that names what failed (pytest, cargo test, the emulator), else the tail.
    why = [ln for ln in lines if re.match(r"FAILED |test .* FAILED|.*(panicked at|: FAILED|error\[)", ln)]
    return r.returncode == 0, (why[0] if why else " | ".join(lines[-3:]))[:200]


class Runner:
    def __init__(self, work):
        self.work = work
        self.tree = work / "tree"
        self.env = dict(os.environ)
        # The toolchain (nvcc headers for the emulator, the test Python) of the checkout.
        dump = subprocess.run(
            ["bash", "-c", 'eval "$(bash scripts/bootstrap.sh --env)" && env -0'],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            check=True,
        ).stdout
        self.env.update(kv.split("=", 1) for kv in dump.decode().split("\0") if "=" in kv)
        self.env["CARGO_TARGET_DIR"] = str(ROOT / "target" / "mutation-suites")
        self.python = self.env.get("FK_TEST_PYTHON", sys.executable)

    def fresh_tree(self):
        if self.tree.exists():
            shutil.rmtree(self.tree)
        self.tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(self.tree)], input=archive, check=True)
        (self.tree / ".toolchain").symlink_to(ROOT / ".toolchain")

    def run_suite(self, suite, log):
        kind, _, what = suite.partition(":")
        names = what.split(",")
        if kind == "rust":
            targets = [a for n in names for a in ("--test", n)]
            return sh(
                ["cargo", "test", "--release", "--no-default-features", "--lib", *targets],
                self.tree,
                self.env,
                log,
            )
        if kind == "py":
            ok, out = sh(
                ["cargo", "build", "--release", "--no-default-features", "--features", "python", "--lib"],
                self.tree,
                self.env,
                log,
            )
            if not ok:
                return False, "build failed: " + out
            site = self.work / "site"
            if site.exists():
                shutil.rmtree(site)
            shutil.copytree(self.tree / "python" / "flashkernels", site / "flashkernels")
            lib = Path(self.env["CARGO_TARGET_DIR"]) / "release" / "libflashkernels.so"
            shutil.copy(lib, site / "flashkernels" / "_native.abi3.so")
            env = dict(self.env, PYTHONPATH=str(site))
            return sh(
                [self.python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *names],
                self.tree / "python" / "tests",
                env,
                log,
            )
        if kind == "emu":
            obj = self.work / "emu"
            if obj.exists():
                shutil.rmtree(obj)
            obj.mkdir()
            lib = ROOT / "scripts" / "lib_emulator.sh"
            binary = obj / f"{what}_plain"
            script = (
                f'source "{lib}" && emu_overlay "{self.tree}" "{self.tree}" "{obj}" && '
                f'emu_build plain "{self.tree}/tests/emulator/{what}_test.cpp" "{binary}" '
                f'"{self.tree}" "{self.tree}" "{obj}" && EMU_SCHEDULE=inorder "{binary}"'
            )
            return sh(["bash", "-c", script], self.tree, self.env, log)
        raise SystemExit(f"unknown suite {suite}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="run every suite of a mutation, not just to the first catch")
    ap.add_argument("--only", default="", help="only mutations whose name contains this")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated suites first")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m.name]
    out_dir = ROOT / "target" / "mutation-suites"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mutate-suites-"))
    runner = Runner(work)
    runner.fresh_tree()
    status = 0
    if not args.skip_baseline:
        for suite in dict.fromkeys(s for m in chosen for s in m.suites):
            ok, out = runner.run_suite(suite, out_dir / "baseline.log")
            print(f"baseline {suite}: {'pass' if ok else 'FAIL ' + out}", flush=True)
            if not ok:
                raise SystemExit("the unmutated tree fails a suite; fix that first")
    rows = []
    for m in chosen:
        path = runner.tree / m.path
        pristine = path.read_text()
        count = pristine.count(m.old)
        if count == 0 or (count > 1 and not m.every):
            rows.append((m.name, "STALE", f"pattern found {count} times in {m.path}", 0))
            status = 1
            continue
        path.write_text(pristine.replace(m.old, m.new) + m.append)
        verdict, by = "MISSED", []
        start = time.time()
        for suite in m.suites:
            ok, out = runner.run_suite(suite, out_dir / "last.log")
            if not ok:
                verdict = "caught"
                by.append(f"{suite} ({out[-120:]})")
                if not args.all:
                    break
        path.write_text(pristine)
        if verdict == "MISSED":
            status = 1
        rows.append((m.name, verdict, "; ".join(by) or "every suite passed", int(time.time() - start)))
        print(f"{verdict:7} {m.name} :: {rows[-1][2]}", flush=True)
    table = ["| mutation | verdict | failed suite (first lines of its report) |", "|---|---|---|"]
    table += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    (out_dir / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
