"""GPU benchmark: flashkernels' dense attention next to its peers, timed in the same run.

Suites (--suite, default all):
- fwd: forward vs torch's SDPA backends (flash = FlashAttention-2, cuDNN, memory-efficient).
- train: forward + backward (autograd, dO of ones-like random) vs the same backends;
  FLOPs 3.5x the forward's (the convention of ../shared/ANCHORS.md).
- gqa: 32 query heads over 8 kv heads, forward and forward + backward, vs SDPA with
  enable_gqa=True (each backend that takes it).
- varlen: a ragged batch, ours packed (flash_attn_varlen_func) vs the peers on the
  zero-padded dense batch (what a user without varlen runs); FLOPs count real tokens only.
- window: sliding window (w, w) and causal window (w, 0) vs FlexAttention (block mask,
  compiled) and SDPA with a dense band mask; FLOPs count the visible pairs only.

Each case is checked for correctness against torch SDPA (float32 math) before timing.
Timing: CUDA events through triton.testing.do_bench (median), contenders interleaved
over several rounds (A, B, C, D, A, B, ...) and the median of the rounds reported, as
../shared/ANCHORS.md recommends.

Writes <out>/attention_<suite>.json and <out>/attention_<suite>.md; prints the tables.
usage: python3 benches/gpu_bench.py --out DIR [--suite all] [--rounds 3] [--quick]
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flashkernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SM80_PATH, sm80_path  # noqa: E402

PEERS = {
    "torch_flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
BF16 = torch.bfloat16

# (D, N, causal) with B*N = 16384 tokens and H*D = 2048, as in ANCHORS.md.
FWD_CASES = [
    (64, 512, False),
    (64, 2048, False),
    (64, 8192, False),
    (64, 16384, False),
    (64, 8192, True),
    (128, 512, False),
    (128, 2048, False),
    (128, 8192, False),
    (128, 16384, False),
    (128, 8192, True),
    (128, 16384, True),
]
TRAIN_CASES = [(d, n, c) for d in (64, 128) for n in (2048, 8192, 16384) for c in (False, True)]
QUICK = {"fwd": [(128, 8192, False), (128, 8192, True)], "train": [(128, 8192, True)]}


def rel_err(got, want):
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def randn(*shape, seed, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", dtype=BF16, generator=gen)
    return x.requires_grad_(requires_grad)


def sdpa_peer(backend, qt, kt, vt, **kw):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, **kw)

    return run


try:  # FlashAttention-3 (Hopper), where installed: the peer the sm_90a kernels aim at
    from flash_attn_interface import flash_attn_func as fa3_func
except ImportError:
    fa3_func = None


def fa3_peer(q, k, v, causal):
    """FA3 on the (B, N, H, D) tensors, or None where it is not installed."""
    if fa3_func is None:
        return None

    def run():
        out = fa3_func(q, k, v, causal=causal)
        return out[0] if isinstance(out, tuple) else out

    return run


def train_step(fwd, grad_inputs, dout):
    """forward + backward of fwd() with upstream gradient dout."""

    def run():
        for x in grad_inputs:
            x.grad = None
        fwd().backward(dout)

    return run


def timed(fns, rounds):
    """Median-of-rounds times (ms), contenders interleaved; failures recorded as text."""
    times = {name: [] for name in fns}
    errors = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except Exception as e:  # a backend may not support a case: record why
                errors[name] = f"{type(e).__name__}: {e}"[:200]
    return times, errors


def result_row(case, fns, flops, err, rounds):
    times, errors = timed(fns, rounds)
    row = dict(case, rel_err_vs_sdpa_fp32=err, results={})
    for name, ts in times.items():
        if ts:
            ms = statistics.median(ts)
            row["results"][name] = {"ms": ms, "tflops": flops / ms / 1e9, "rounds_ms": ts}
        else:
            row["results"][name] = {"error": errors.get(name, "no timing")}
    ours_ms = row["results"]["flashkernels"].get("ms")
    for name, r in row["results"].items():
        if name != "flashkernels" and ours_ms and r.get("ms"):
            r["ours_speedup"] = r["ms"] / ours_ms
    return row


def dense_flops(b, h, nq, nk, d, causal):
    f = 4.0 * b * h * nq * nk * d
    return f / 2 if causal else f


def case_fwd(d, n, causal, rounds, train=False, hkv=None):
    b, h = 16384 // n, 2048 // d
    hkv = hkv or h
    seed = n * d + causal + 7 * hkv
    # (B, N, H, D) storage, as flash-attn; torch gets (B, H, N, D) views of it (no copy).
    q = randn(b, n, h, d, seed=seed, requires_grad=train)
    k = randn(b, n, hkv, d, seed=seed + 1, requires_grad=train)
    v = randn(b, n, hkv, d, seed=seed + 2, requires_grad=train)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    kw = {"is_causal": causal}
    if hkv != h:
        kw["enable_gqa"] = True
    ours = lambda: flashkernels.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
    peers = {name: sdpa_peer(be, qt, kt, vt, **kw) for name, be in PEERS.items()}
    # Correctness first: ours against SDPA in float32 math (on a slice when huge).
    nb = max(1, min(b, 2))
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(qt[:nb].float(), kt[:nb].float(), vt[:nb].float(), **kw).transpose(1, 2)
        err = rel_err(ours()[:nb], ref)
    flops = dense_flops(b, h, n, n, d, causal)
    # Our forward on its sm80 kernel too: on Hopper the default is the TMA + wgmma one.
    fns = {"flashkernels": ours, SM80_PATH: sm80_path(ours), **peers}
    fa3 = fa3_peer(q, k, v, causal)
    if fa3 is not None:
        fns["flash_attn_3"] = fa3
    if train:
        dout = randn(b, n, h, d, seed=seed + 3)
        doutt = dout.transpose(1, 2)
        fns = {"flashkernels": train_step(ours, (q, k, v), dout)}
        for name, fn in peers.items():
            fns[name] = train_step(fn, (q, k, v), doutt)
        flops *= 3.5
    case = {"B": b, "H": h, "H_kv": hkv, "N": n, "D": d, "causal": causal}
    return result_row(case, fns, flops, err, rounds)


def case_varlen(d, lengths, causal, rounds, train):
    h = 2048 // d
    total, longest = sum(lengths), max(lengths)
    seed = total + d
    q = randn(total, h, d, seed=seed, requires_grad=train)
    k = randn(total, h, d, seed=seed + 1, requires_grad=train)
    v = randn(total, h, d, seed=seed + 2, requires_grad=train)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")

    def ours():
        return flashkernels.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal)

    # Peers: the same sequences zero-padded to the longest (B, H, N, D), key padding masked
    # by running each on the padded batch (a user without varlen runs exactly this).
    b = len(lengths)
    pad = [torch.zeros(b, longest, h, d, device="cuda", dtype=BF16) for _ in range(3)]
    for i, n in enumerate(lengths):
        for p, x in zip(pad, (q, k, v)):
            p[i, :n] = x.detach()[offsets[i] : offsets[i] + n]
    mask = torch.zeros(b, 1, longest, longest, dtype=torch.bool, device="cuda")
    for i, n in enumerate(lengths):
        mask[i, :, :, :n] = True
        if causal:
            mask[i] &= torch.ones(longest, longest, dtype=torch.bool, device="cuda").tril()
    pt = [p.transpose(1, 2).requires_grad_(train) for p in pad]
    peers = {
        "torch_flash_padded": sdpa_peer(SDPBackend.FLASH_ATTENTION, *pt, is_causal=causal),
        "cudnn_padded_masked": sdpa_peer(SDPBackend.CUDNN_ATTENTION, *pt, attn_mask=mask),
        "mem_efficient_padded_masked": sdpa_peer(SDPBackend.EFFICIENT_ATTENTION, *pt, attn_mask=mask),
    }
    with torch.no_grad():
        got = ours()
        errs = []
        for i, n in enumerate(lengths[:4]):
            sl = slice(offsets[i], offsets[i] + n)
            ref = F.scaled_dot_product_attention(
                *(x.detach()[sl].transpose(0, 1)[None].float() for x in (q, k, v)), is_causal=causal
            )
            errs.append(rel_err(got[sl], ref[0].transpose(0, 1)))
    flops = sum(dense_flops(1, h, n, n, d, causal) for n in lengths)
    fns = {"flashkernels": ours, **peers}
    if train:
        dout = randn(total, h, d, seed=seed + 3)
        doutp = torch.zeros(b, h, longest, d, device="cuda", dtype=BF16)
        fns = {"flashkernels": train_step(ours, (q, k, v), dout)}
        for name, fn in peers.items():
            fns[name] = train_step(fn, pt, doutp)
        flops *= 3.5
    case = {"lengths": lengths, "H": h, "D": d, "causal": causal, "train": train}
    return result_row(case, fns, flops, max(errs), rounds)


def case_window(d, n, w, causal, rounds, train):
    b, h = 1, 12
    seed = n + w + causal
    q = randn(b, n, h, d, seed=seed, requires_grad=train)
    k = randn(b, n, h, d, seed=seed + 1, requires_grad=train)
    v = randn(b, n, h, d, seed=seed + 2, requires_grad=train)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    right = 0 if causal else w
    ours = lambda: flashkernels.flash_attn_func(q, k, v, window_size=(w, right))  # noqa: E731
    i = torch.arange(n, device="cuda")
    band = (i[None, :] >= i[:, None] - w) & (i[None, :] <= i[:, None] + right)
    peers = {"sdpa_band_mask": sdpa_peer(SDPBackend.EFFICIENT_ATTENTION, qt, kt, vt, attn_mask=band)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def band_mod(b_, h_, qi, kj):
            return (kj >= qi - w) & (kj <= qi + right)

        block_mask = create_block_mask(band_mod, None, None, n, n, device="cuda")
        flex = torch.compile(flex_attention)
        peers["flex_attention"] = lambda: flex(qt, kt, vt, block_mask=block_mask)
    except Exception as e:  # recorded in the row, the rest still runs
        print(f"FlexAttention unavailable: {e}")
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), attn_mask=band).transpose(1, 2)
        err = rel_err(ours(), ref)
    pairs = band.sum().item()
    flops = 4.0 * b * h * pairs * d
    fns = {"flashkernels": ours, **peers}
    if train:
        dout = randn(b, n, h, d, seed=seed + 3)
        fns = {"flashkernels": train_step(ours, (q, k, v), dout)}
        for name, fn in peers.items():
            fns[name] = train_step(fn, (q, k, v), dout.transpose(1, 2))
        flops *= 3.5
    case = {"B": b, "H": h, "N": n, "D": d, "window": [w, right], "train": train}
    return result_row(case, fns, flops, err, rounds)


def suite_cases(suite, quick):
    if suite == "fwd":
        for d, n, c in QUICK["fwd"] if quick else FWD_CASES:
            yield lambda r, d=d, n=n, c=c: case_fwd(d, n, c, r)
    elif suite == "train":
        for d, n, c in QUICK["train"] if quick else TRAIN_CASES:
            yield lambda r, d=d, n=n, c=c: case_fwd(d, n, c, r, train=True)
    elif suite == "gqa":
        # 32 query heads over 8 kv heads at D128 (ANCHORS.md's GQA case).
        for train in (False, True):
            yield lambda r, t=train: case_fwd(128, 4096, True, r, train=t, hkv=8)
    elif suite == "varlen":
        lengths = [4096, 3000, 1000, 517, 2048, 129, 3500, 1800]
        for d in (64, 128):
            for train in (False, True):
                yield lambda r, d=d, t=train: case_varlen(d, lengths, True, r, t)
    elif suite == "window":
        for n in (4096, 16384):
            for causal in (False, True):
                for train in (False, True):
                    yield lambda r, n=n, c=causal, t=train: case_window(64, n, 256, c, r, t)


def markdown(suite, rows, meta):
    lines = [
        f"# Attention ({suite}), bf16 — {meta['device']} — {meta['date']} — commit {meta['commit']}",
        "",
        "TFLOP/s (median of interleaved rounds, CUDA events); x = peer time / our time (> 1: we are faster).",
        "",
    ]
    for r in rows:
        case = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("results", "rel_err_vs_sdpa_fp32"))
        cells = []
        for name, x in r["results"].items():
            if "tflops" in x:
                ratio = f" (x{x['ours_speedup']:.2f})" if "ours_speedup" in x else ""
                cells.append(f"{name} {x['ms']:.3f} ms {x['tflops']:.0f} TF/s{ratio}")
            else:
                cells.append(f"{name}: {x['error']}")
        lines.append(f"- {case}, err {r['rel_err_vs_sdpa_fp32']:.1e}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--suite", default="all", choices=["all", "fwd", "train", "gqa", "varlen", "window"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip() or os.environ.get("FK_COMMIT", "unknown")
    except OSError:
        commit = os.environ.get("FK_COMMIT", "unknown")
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }
    os.makedirs(args.out, exist_ok=True)
    suites = ["fwd", "train", "gqa", "varlen", "window"] if args.suite == "all" else [args.suite]
    for suite in suites:
        rows = []
        for run in suite_cases(suite, args.quick):
            try:
                rows.append(run(args.rounds))
            except Exception as e:  # one broken case must not hide the others
                print(f"{suite}: case failed: {type(e).__name__}: {e}", flush=True)
                continue
            r = rows[-1]["results"]["flashkernels"]
            print(
                f"{suite}: ours {r.get('tflops', 0):.0f} TFLOP/s, err {rows[-1]['rel_err_vs_sdpa_fp32']:.1e}",
                flush=True,
            )
        with open(os.path.join(args.out, f"attention_{suite}.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        md = markdown(suite, rows, meta)
        with open(os.path.join(args.out, f"attention_{suite}.md"), "w") as f:
            f.write(md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
