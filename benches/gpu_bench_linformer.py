"""GPU benchmark: flashkernels' Linformer attention next to the torch composite (E·K and
F·V matmuls + SDPA) and dense SDPA over the same N, timed in the same run (issue 15,
item 7).

Cases: bf16, B 1, H 12, D 64 (the peer figures of ../shared/ANCHORS.md), one E and one F
shared by all heads (lucidrains' layout), N = 4k, 16k, 64k at k = 256, and k = 128, 512,
1024 at N = 16k; forward and forward + backward.
Contenders: flashkernels (`linformer_attention` on torch tensors: the projection kernels
plus the dense attention kernels), the torch composite (kp = E K, vp = F V as batched
matmuls, then scaled_dot_product_attention over the k projected keys), dense SDPA
(torch's flash backend) over all N keys, for scale.
Correctness first: our output (and, for forward + backward, dq, dk, dv, dE, dF) against
the composite in float32 on the bf16 inputs; relative error (Frobenius) <= 2e-2.
Timing: CUDA events through triton.testing.do_bench (median), contenders interleaved over
several rounds, the median of the rounds reported.
FLOPs: the projections 2 · 2·B·H_kv·k·N·D (H_kv = H: torch users project per head) and
the attention 4·B·H·N·k·D; forward + backward counted as 3x the forward. Dense SDPA's
row counts its own 4·B·H·N²·D (3x for forward + backward).
The issue's goal: >= 1.5x the composite at N = 16k and 64k, k = 256 (0.101 ms and 0.347
ms measured there); rows carry it as `goal`.

Writes <out>/linformer.json and <out>/linformer.md.
usage: python3 benches/gpu_bench_linformer.py --out DIR [--rounds 3] [--quick]
       python3 benches/gpu_bench_linformer.py --dry-run --out DIR
--dry-run runs everything but the CUDA timing on the CPU with tiny shapes (wall-clock
medians): a check of this script without a GPU.
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashkernels  # noqa: E402
from bench_common import add_results, cuda_timer, meta_of, rel_err, timed, wall_timer, write_outputs  # noqa: E402

OURS = "flashkernels"
HEADS, HEAD_DIM = 12, 64
CHECK_TOL = 2e-2
GOALS = {  # N -> the goal at k = 256 (composite ms measured there)
    16384: {"vs": "torch_composite", "ratio": 1.5, "issue_peer_ms": 0.101},
    65536: {"vs": "torch_composite", "ratio": 1.5, "issue_peer_ms": 0.347},
}


def composite(q, k, v, e, f):
    """The torch composite on (B, N, H, D) views: kp = E K, vp = F V per head as batched
    matmuls, then SDPA over the k projected keys (flash / efficient backends)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
    kp = torch.matmul(e, kh)  # (1, k, N) @ (B, H, N, D) -> (B, H, k, D)
    vp = torch.matmul(f, vh)
    return F.scaled_dot_product_attention(qh, kp, vp).transpose(1, 2)


def dense_sdpa(q, k, v, e, f):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)


def ours(q, k, v, e, f):
    return flashkernels.linformer_attention(q, k, v, e, f)


def flops(n, kp, train, heads=HEADS, d=HEAD_DIM, batch=1):
    f = 2 * 2.0 * batch * heads * kp * n * d + 4.0 * batch * heads * n * kp * d
    return 3 * f if train else f


def dense_flops(n, train, heads=HEADS, d=HEAD_DIM, batch=1):
    f = 4.0 * batch * heads * n * n * d
    return 3 * f if train else f


def run_case(n, kp, train, rounds, heads=HEADS, d=HEAD_DIM, device="cuda", timer=cuda_timer, goal_of=None):
    """One case: correctness of ours against the float32 composite first, then interleaved
    timings of the three contenders. A row in the per-op bench schema."""
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(n + kp)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, dtype=torch.float32, generator=gen)).to(dtype)

    # (B, H, N, D) storage seen as (B, N, H, D), as SDPA users hold their tensors.
    q, k, v = (rnd(1, heads, n, d).transpose(1, 2).requires_grad_(train) for _ in range(3))
    e, f = (rnd(1, kp, n, scale=1 / math.sqrt(n)).requires_grad_(train) for _ in range(2))
    inputs = (q, k, v, e, f)
    dout = rnd(1, n, heads, d)
    fp32 = [t.detach().float().requires_grad_(train) for t in inputs]
    want_o = composite(*fp32)
    want = [want_o.detach()]
    if train:
        want_o.backward(dout.float())
        want += [t.grad for t in fp32]
    got_o = ours(*inputs)
    got = [got_o.detach()]
    if train:
        got_o.backward(dout)
        got += [t.grad for t in inputs]
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    err = max(errs)
    fns = {OURS: ours, "torch_composite": composite, "dense_sdpa": dense_sdpa}

    def call(fn):
        if not train:
            return lambda: fn(*inputs)

        def step():
            for t in inputs:
                t.grad = None
            fn(*inputs).backward(dout)

        return step

    with torch.set_grad_enabled(train):
        times, errors = timed({name: call(fn) for name, fn in fns.items()}, rounds, timer)
    row = {
        "N": n,
        "k": kp,
        "heads": heads,
        "head_dim": d,
        "train": train,
        "dtype": "bfloat16",
        "rel_err_vs_torch_fp32": err,
        "rel_errs": errs,
    }
    goal = GOALS.get(goal_of or n)
    if goal and kp == 256 and not train:
        row["goal"] = goal
    return add_results(
        row,
        fns,
        times,
        errors,
        lambda name: dense_flops(n, train, heads, d) if name == "dense_sdpa" else flops(n, kp, train, heads, d),
        OURS,
    )


def cases(quick=False):
    """(N, k, train): the goal cases first."""
    first = [(16384, 256, False), (65536, 256, False), (16384, 256, True)]
    if quick:
        return first
    rest = [(4096, 256, False), (4096, 256, True), (65536, 256, True)]
    rest += [(16384, kp, t) for kp in (128, 512, 1024) for t in (False, True)]
    return first + rest


def markdown(rows, meta):
    lines = [
        f"# Linformer attention, bf16, B1 H{HEADS} D{HEAD_DIM}, shared E/F — {meta['device']} — {meta['date']} — "
        f"commit {meta['commit']}",
        "",
        "Time and TFLOP/s (median of interleaved rounds); x = peer time / ours (> 1: we are faster).",
        "",
        "| N | k | pass | flashkernels | torch composite | dense SDPA | err | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for name in (OURS, "torch_composite", "dense_sdpa"):
            x = r["results"][name]
            if "ms" in x:
                ratio = f" (x{x['ours_speedup']:.2f})" if "ours_speedup" in x else ""
                cells.append(f"{x['ms']:.3f} ms {x['tflops']:.0f} TF/s{ratio}")
            else:
                cells.append(x["error"][:60])
        goal = "-"
        if "goal" in r:
            peer = r["results"][r["goal"]["vs"]].get("ours_speedup")
            met = "met" if peer is not None and peer >= r["goal"]["ratio"] else "NOT met"
            goal = f">= {r['goal']['ratio']}x composite: {met}"
        lines.append(
            f"| {r['N']} | {r['k']} | {'fwd+bwd' if r['train'] else 'fwd'} | "
            + " | ".join(cells)
            + f" | {r['rel_err_vs_torch_fp32']:.1e} | {goal} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the goal cases only")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no CUDA timing")
    args = ap.parse_args()
    if args.dry_run:
        kw = dict(heads=2, d=16, device="cpu", timer=wall_timer)
        shrink, device_name = (lambda n, kp: (n // 64, kp // 16)), "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU (or --dry-run)")
        kw, shrink, device_name = {}, (lambda n, kp: (n, kp)), torch.cuda.get_device_name()
    meta = meta_of(device_name, args.dry_run)
    rows, failed = [], []
    for real_n, real_k, train in cases(args.quick):
        n, kp = shrink(real_n, real_k)
        try:
            rows.append(run_case(n, kp, train, args.rounds, goal_of=real_n, **kw))
        except Exception as e:  # one broken case must not hide the others
            failed.append({"N": n, "k": kp, "train": train, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"N {n} k {kp} train={train}: FAILED {failed[-1]['error']}", flush=True)
            continue
        r = rows[-1]
        print(
            f"N {n} k {kp} {'fwd+bwd' if train else 'fwd'}: "
            + ", ".join(f"{name} {x.get('ms', math.nan):.3f} ms" for name, x in r["results"].items())
            + f", err {r['rel_err_vs_torch_fp32']:.1e}",
            flush=True,
        )
    write_outputs(args.out, "linformer", meta, rows, failed, markdown(rows, meta))
    return 1 if failed or any(not r["rel_err_vs_torch_fp32"] <= CHECK_TOL for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
