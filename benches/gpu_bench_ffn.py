"""GPU benchmark: flashkernels' fused feed-forward block next to torch eager and
torch.compile, timed in the same run (issue 14, item 6).

Cases: bf16, 8192 tokens, d_model 1024 and 4096, forward and forward + backward, for
- GELU: d_hidden = 4 d_model (4096, 16384), with biases; y = W2 gelu(W1 x + b1) + b2.
- SwiGLU (gated): d_hidden = 8/3 d_model rounded up to a multiple of 256 (2816 for 1024,
  11008 for 4096: Llama's sizes), no biases, as Llama's MLP: W2 (silu(W1 x) * W3 x).
Contenders: flashkernels (the `FeedForward` module: torch autograd over the fused
kernels), torch eager (the same nn.Linear layers with F.gelu / F.silu), torch.compile of
that eager module. All three share one set of weights.
Correctness first: every contender's output (and, for forward + backward, dx, dW1, dW2)
against the same math in float32 on the bf16 inputs; relative error (Frobenius) <= 2e-2.
Timing: CUDA events through triton.testing.do_bench (median), contenders interleaved over
several rounds (A, B, C, A, B, C, ...), the median of the rounds reported.
FLOPs: 2 * tokens * d_model * d_hidden per GEMM, 2 GEMMs (3 gated); forward + backward 3x.
The issue's goal: >= 1.15x torch eager at d_model 1024 (eager measured 0.243 ms, GELU
forward), >= 1.0x at 4096 (3.40 ms); rows carry it as `goal`.

Writes <out>/ffn.json and <out>/ffn.md.
usage: python3 benches/gpu_bench_ffn.py --out DIR [--rounds 3] [--quick]
       python3 benches/gpu_bench_ffn.py --dry-run --out DIR
--dry-run runs everything but the CUDA timing on the CPU with tiny shapes (torch.compile
with the aot_eager backend, wall-clock medians): a check of this script without a GPU.
gpu_bench_all.py runs these cases in the GPU check's bench step (ops ffn_fwd, ffn_train).
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashkernels  # noqa: E402
from bench_common import (  # noqa: E402
    SM80_PATH,
    add_results,
    cuda_timer,
    meta_of,
    rel_err,
    sm80_path,
    timed,
    wall_timer,
    write_outputs,
)

OURS = "flashkernels"
TOKENS = 8192
D_MODELS = (1024, 4096)
CHECK_TOL = 2e-2  # bf16 relative error against float32
# The speed goals against torch eager (GELU forward): ratio, eager ms measured there.
GOALS = {
    1024: {"vs": "torch_eager", "ratio": 1.15, "issue_eager_ms": 0.243},
    4096: {"vs": "torch_eager", "ratio": 1.0, "issue_eager_ms": 3.40},
}


def gated_hidden(d_model):
    """8/3 d_model rounded up to a multiple of 256 (1024 -> 2816, 4096 -> 11008)."""
    return -(-8 * d_model // (3 * 256)) * 256


def hidden_of(d_model, gated):
    return gated_hidden(d_model) if gated else 4 * d_model


def flops(tokens, d_model, d_hidden, gated, train):
    f = 2.0 * tokens * d_model * d_hidden * (3 if gated else 2)
    return 3 * f if train else f


class EagerFFN(torch.nn.Module):
    """The block as torch users write it, over given nn.Linear layers: w2(gelu(w1(x))),
    or Llama's MLP w2(silu(w1(x)) * w3(x))."""

    def __init__(self, w1, w2, w3=None):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x):
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def reference(x, m, train, dy):
    """float32 (y, dx, dW1, dW2) of the block on the bf16 inputs and weights."""
    xf = x.detach().float().requires_grad_(train)
    lin = {n: getattr(m, n) for n in ("w1", "w2", "w3") if getattr(m, n) is not None}
    w = {n: layer.weight.detach().float().requires_grad_(train) for n, layer in lin.items()}
    b = {n: None if layer.bias is None else layer.bias.detach().float() for n, layer in lin.items()}
    u = F.linear(xf, w["w1"], b["w1"])
    h = F.gelu(u) if "w3" not in w else F.silu(u) * F.linear(xf, w["w3"], b["w3"])
    y = F.linear(h, w["w2"], b["w2"])
    if not train:
        return (y.detach(),)
    y.backward(dy.float())
    return y.detach(), xf.grad, w["w1"].grad, w["w2"].grad


def step(fn, x, params, dy):
    """forward + backward of fn(x) with upstream gradient dy, gradients cleared first."""

    def run():
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).backward(dy)

    return run


def run_case(
    d_model, gated, train, rounds, tokens=TOKENS, device="cuda", timer=cuda_timer, backend="inductor", goal_of=None
):
    """One case: correctness of every contender first, then interleaved timings. A row in
    the per-op bench schema (gpu_bench_all.normalize reads it). `goal_of`: the d_model
    whose goal the row carries (the dry run's stand-in widths), d_model by default."""
    d_hidden = hidden_of(d_model, gated)
    dtype = torch.bfloat16
    torch.manual_seed(d_model + gated + 2 * train)
    ours = flashkernels.FeedForward(
        d_model,
        d_hidden,
        activation="silu" if gated else "gelu",
        gated=gated,
        bias=not gated,
        dtype=dtype,
        device=device,
    )
    eager = EagerFFN(ours.w1, ours.w2, ours.w3)  # the same parameters
    fns = {
        OURS: ours,
        SM80_PATH: sm80_path(ours),
        "torch_eager": eager,
        "torch_compile": torch.compile(eager, backend=backend),
    }
    x = torch.randn(tokens, d_model, device=device, dtype=dtype).requires_grad_(train)
    dy = torch.randn(tokens, d_model, device=device, dtype=dtype)
    params = list(ours.parameters())
    want = reference(x, ours, train, dy)
    checks, errors = {}, {}
    for name, fn in fns.items():
        try:
            if train:
                x.grad = None
                for p in params:
                    p.grad = None
                y = fn(x)
                y.backward(dy)
                got = (y.detach(), x.grad, ours.w1.weight.grad, ours.w2.weight.grad)
            else:
                with torch.no_grad():
                    got = (fn(x),)
            errs = [rel_err(g, w) for g, w in zip(got, want)]
            checks[f"{name}_rel_err_vs_fp32"] = max(errs)
        except Exception as e:  # a contender that cannot run the case is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"[:200]
    if OURS in errors:
        raise RuntimeError(f"{OURS} failed the correctness run: {errors[OURS]}")
    err = checks[f"{OURS}_rel_err_vs_fp32"]
    fns = {n: f for n, f in fns.items() if n not in errors}
    if train:
        fns = {n: step(f, x, params, dy) for n, f in fns.items()}
    else:
        fns = {n: (lambda f=f: f(x)) for n, f in fns.items()}
    with torch.set_grad_enabled(train):
        times, terrors = timed(fns, rounds, timer)
    errors.update(terrors)
    fl = flops(tokens, d_model, d_hidden, gated, train)
    row = {
        "tokens": tokens,
        "d_model": d_model,
        "d_hidden": d_hidden,
        "block": "SwiGLU" if gated else "GELU",
        "bias": not gated,
        "train": train,
        "dtype": "bfloat16",
        "rel_err_vs_torch_fp32": err,
        "checks": {**checks, "flagged": [n for n, e in checks.items() if not e <= CHECK_TOL]},
        "results": {},
    }
    goal = GOALS.get(goal_of or d_model)
    if goal and not gated and not train:
        row["goal"] = goal
    return add_results(row, (OURS, SM80_PATH, "torch_eager", "torch_compile"), times, errors, lambda _: fl, OURS)


def cases(quick=False):
    """(d_model, gated, train), the GELU d_model 1024 forward (the issue's goal) first."""
    ds = D_MODELS[:1] if quick else D_MODELS
    return [(d, g, t) for t in (False, True) for g in (False, True) for d in ds]


def markdown(rows, meta):
    lines = [
        f"# Fused feed-forward block, bf16, {rows[0]['tokens'] if rows else TOKENS} tokens — {meta['device']} — "
        f"{meta['date']} — commit {meta['commit']}",
        "",
        "TFLOP/s (median of interleaved rounds); x = peer time / ours (> 1: we are faster). "
        "'ours, sm80 kernels': our forward with FLASHKERNELS_NO_SM90=1 (the mma.sync path; on "
        "Hopper the default is TMA + wgmma). "
        "GELU: d_hidden 4 d_model, biases; SwiGLU: d_hidden 8/3 d_model rounded up to 256, no biases.",
        "",
        "| block | d_model | d_hidden | pass | flashkernels | ours, sm80 kernels | torch eager | torch.compile "
        "| err | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for name in (OURS, SM80_PATH, "torch_eager", "torch_compile"):
            x = r["results"].get(name, {"error": "not run"})
            if "ms" in x:
                ratio = f" (x{x['ours_speedup']:.2f})" if "ours_speedup" in x else ""
                cells.append(f"{x['ms']:.3f} ms {x['tflops']:.0f} TF/s{ratio}")
            else:
                cells.append(x["error"][:60])
        goal = "-"
        if "goal" in r:
            peer = r["results"][r["goal"]["vs"]].get("ours_speedup")
            met = "met" if peer is not None and peer >= r["goal"]["ratio"] else "NOT met"
            goal = f">= {r['goal']['ratio']}x {r['goal']['vs']}: {met}"
        lines.append(
            f"| {r['block']} | {r['d_model']} | {r['d_hidden']} | {'fwd+bwd' if r['train'] else 'fwd'} | "
            + " | ".join(cells)
            + f" | {r['rel_err_vs_torch_fp32']:.1e} | {goal} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="d_model 1024 only")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no CUDA timing")
    args = ap.parse_args()
    if args.dry_run:
        # Tiny shapes whose widths keep the real ones' rules (gated hidden a multiple of 256).
        kw = dict(tokens=64, device="cpu", timer=wall_timer, backend="aot_eager")
        dims, device_name = (64, 128), "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU (or --dry-run)")
        kw, dims, device_name = {}, D_MODELS, torch.cuda.get_device_name()
    import torch._dynamo as dynamo

    for knob in ("cache_size_limit", "recompile_limit"):  # recompiles must not fall to eager
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, 64)
    meta = meta_of(device_name, args.dry_run)
    rows, failed = [], []
    for real_d, gated, train in cases(args.quick):
        d = dims[D_MODELS.index(real_d)]
        try:
            rows.append(run_case(d, gated, train, args.rounds, goal_of=real_d, **kw))
        except Exception as e:  # one broken case must not hide the others
            failed.append({"d_model": d, "gated": gated, "train": train, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"d_model {d} gated={gated} train={train}: FAILED {failed[-1]['error']}", flush=True)
            continue
        r = rows[-1]
        print(
            f"{r['block']} d_model {d} {'fwd+bwd' if train else 'fwd'}: "
            + ", ".join(f"{n} {x.get('ms', math.nan):.3f} ms" for n, x in r["results"].items())
            + f", err {r['rel_err_vs_torch_fp32']:.1e}",
            flush=True,
        )
    write_outputs(args.out, "ffn", meta, rows, failed, markdown(rows, meta))
    return 1 if failed or any(r["checks"]["flagged"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
