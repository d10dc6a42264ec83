"""GPU benchmark: flashkernels' conv2d next to cuDNN (through torch), in the same run.

Layers: the ResNet-50 layers of ../shared/ANCHORS.md, batch 32, bf16, in NHWC
(channels_last) and NCHW memory. For each: ours with the plan's algorithm and with each
algorithm forced (im2col, implicit GEMM), with the im2col workspace size; cuDNN via
torch.nn.functional.conv2d on the same tensors. Also forward + backward (autograd) for
the 3x3 layers. Each case is checked against torch in float32 before timing. Without
--quick, also the plain GEMM 8192^3 (as a 1x1 NHWC convolution) next to cuBLAS.
Timing: CUDA events (triton.testing.do_bench, median), contenders interleaved over
several rounds, median of the rounds. FLOPs: 2 * N * K * P * Q * (C / groups) * R * S.

Writes <out>/conv.json and <out>/conv.md.
usage: python3 benches/gpu_bench_conv.py --out DIR [--rounds 3] [--quick]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import flashkernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SM80_PATH, sm80_path  # noqa: E402

# (H = W, C, K, R = S, stride, padding)
LAYERS = [
    (56, 64, 64, 3, 1, 1),
    (56, 64, 256, 1, 1, 0),
    (28, 128, 128, 3, 1, 1),
    (14, 256, 256, 3, 1, 1),
    (7, 512, 512, 3, 1, 1),
    (224, 3, 64, 7, 2, 3),
]
BATCH = 32


def rel_err(got, want):
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def timed(fns, rounds):
    times, errors = {n: [] for n in fns}, {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except Exception as e:  # record why a contender cannot run this case
                errors[name] = f"{type(e).__name__}: {e}"[:200]
    return times, errors


def add_results(row, times, errors, flops, peer):
    """row["results"]: each contender's median ms and TFLOP/s (or why it did not run), and
    vs_<peer> = the peer's ms / its ms."""
    row["results"] = {}
    for name, ts in times.items():
        if ts:
            ms = statistics.median(ts)
            row["results"][name] = {"ms": ms, "tflops": flops / ms / 1e9, "rounds_ms": ts}
        else:
            row["results"][name] = {"error": errors.get(name, "no timing")}
    peer_ms = row["results"][peer].get("ms")
    for name, r in row["results"].items():
        if name != peer and peer_ms and r.get("ms"):
            r[f"vs_{peer}"] = peer_ms / r["ms"]
    return row


def md_cells(results, peer):
    cells = []
    for name, x in results.items():
        if "tflops" in x:
            ratio = f" (x{x[f'vs_{peer}']:.2f})" if f"vs_{peer}" in x else ""
            cells.append(f"{name} {x['ms']:.3f} ms {x['tflops']:.0f}{ratio}")
        else:
            cells.append(f"{name}: {x['error']}")
    return "; ".join(cells)


def run_layer(hw, c, k, rs, stride, pad, channels_last, train, rounds):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator(device="cuda").manual_seed(hw * c + k)
    x = torch.randn(BATCH, c, hw, hw, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(k, c, rs, rs, device="cuda", dtype=torch.bfloat16, generator=gen) / (c * rs * rs) ** 0.5
    b = torch.randn(k, device="cuda", dtype=torch.bfloat16, generator=gen)
    x, w = x.to(memory_format=fmt).requires_grad_(train), w.to(memory_format=fmt).requires_grad_(train)
    b.requires_grad_(train)
    kw = dict(stride=stride, padding=pad)

    def ours(algo=None):
        return lambda: flashkernels.conv2d(x, w, b, algo=algo, **kw)

    fns = {
        "flashkernels": ours(),
        "flashkernels_im2col": ours("im2col"),
        "flashkernels_implicit": ours("implicit_gemm"),
        # On Hopper the forward takes the wgmma mainloop; this is its sm80 kernel.
        SM80_PATH: sm80_path(ours()),
        "cudnn": lambda: F.conv2d(x, w, b, **kw),
    }
    with torch.no_grad():
        ref = F.conv2d(x.float(), w.float(), b.float(), **kw)
        err = rel_err(fns["flashkernels"](), ref)
    p = (hw + 2 * pad - rs) // stride + 1
    flops = 2.0 * BATCH * k * p * p * c * rs * rs
    if train:
        dy = torch.randn_like(ref, dtype=torch.bfloat16).to(memory_format=fmt)

        def step(fn):
            def run():
                x.grad = w.grad = b.grad = None
                fn().backward(dy)

            return run

        fns = {name: step(fn) for name, fn in fns.items()}
        flops *= 3.0  # dX and dW are one forward's GEMM each
    times, errors = timed(fns, rounds)
    row = {
        "H": hw,
        "C": c,
        "K": k,
        "R": rs,
        "stride": stride,
        "padding": pad,
        "layout": "NHWC" if channels_last else "NCHW",
        "train": train,
        "rel_err_vs_torch_fp32": err,
    }
    add_results(row, times, errors, flops, "cudnn")
    try:
        row["im2col_workspace_bytes"] = flashkernels.conv2d_workspace_bytes(x, w, algo="im2col", **kw)
    except (AttributeError, TypeError):
        pass  # older API without the query: not recorded
    return row


def run_gemm(size, rounds):
    """The plain GEMM of issue 18's speed goal, size^3, as the 1x1 convolution whose GEMM it
    is (NHWC x of N H W = size pixels by C = size channels, K = size filters): our tile GEMM
    core through the conv entry (on Hopper the gathering producer, not TMA) next to cuBLAS
    (torch.matmul on the same bf16 data) in the same run."""
    gen = torch.Generator(device="cuda").manual_seed(size)
    side = 32
    n = size // (side * side)
    x = torch.randn(n, size, side, side, device="cuda", dtype=torch.bfloat16, generator=gen)
    x = x.to(memory_format=torch.channels_last)
    w = torch.randn(size, size, 1, 1, device="cuda", dtype=torch.bfloat16, generator=gen) / size**0.5
    w = w.to(memory_format=torch.channels_last)
    a = x.permute(0, 2, 3, 1).reshape(size, size)  # the NHWC memory as (pixels, C)
    bt = w.reshape(size, size).t()
    fns = {
        "flashkernels": lambda: flashkernels.conv2d(x, w),
        SM80_PATH: sm80_path(lambda: flashkernels.conv2d(x, w)),
        "cublas": lambda: torch.matmul(a, bt),
    }
    with torch.no_grad():
        ref = torch.matmul(a.float(), bt.float())
        got = fns["flashkernels"]().permute(0, 2, 3, 1).reshape(size, size)
        err = rel_err(got, ref)
    flops = 2.0 * size**3
    times, errors = timed(fns, rounds)
    return add_results({"gemm": size, "rel_err_vs_torch_fp32": err}, times, errors, flops, "cublas")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip() or os.environ.get("FK_COMMIT", "unknown")
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }
    rows = []
    layers = LAYERS[:1] + LAYERS[-1:] if args.quick else LAYERS
    for layer in layers:
        for channels_last in (True, False):
            for train in (False, True) if layer[3] == 3 else (False,):
                try:
                    rows.append(run_layer(*layer, channels_last, train, args.rounds))
                except Exception as e:  # one broken case must not hide the others
                    print(f"{layer} channels_last={channels_last}: failed: {e}", flush=True)
                    continue
                r = rows[-1]["results"]
                print(
                    f"{layer} {rows[-1]['layout']} train={train}: ours "
                    f"{r['flashkernels'].get('tflops', 0):.0f} TF/s, cuDNN "
                    f"{r['cudnn'].get('tflops', 0):.0f}",
                    flush=True,
                )
    gemm_rows = []
    if not args.quick:
        try:
            gemm_rows.append(run_gemm(8192, args.rounds))
            r = gemm_rows[-1]["results"]
            print(
                f"GEMM 8192^3: ours {r['flashkernels'].get('tflops', 0):.0f} TF/s, cuBLAS "
                f"{r['cublas'].get('tflops', 0):.0f}",
                flush=True,
            )
        except Exception as e:
            print(f"GEMM 8192^3: failed: {e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "conv.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "gemm_rows": gemm_rows}, f, indent=1)
    lines = [
        f"# conv2d, bf16, batch {BATCH} — {meta['device']} — {meta['date']} — commit {commit}",
        "",
        "TFLOP/s (median of interleaved rounds); x = cuDNN time / ours (> 1: we are faster).",
        "",
    ]
    for r in rows:
        lines.append(
            f"- {r['H']}x{r['H']} {r['C']}->{r['K']} {r['R']}x{r['R']}/{r['stride']} "
            f"{r['layout']} train={r['train']} err {r['rel_err_vs_torch_fp32']:.1e}: " + md_cells(r["results"], "cudnn")
        )
    for r in gemm_rows:
        lines.append(
            f"- plain GEMM {r['gemm']}^3 as a 1x1 NHWC conv (x = cuBLAS time / ours) "
            f"err {r['rel_err_vs_torch_fp32']:.1e}: " + md_cells(r["results"], "cublas")
        )
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "conv.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
