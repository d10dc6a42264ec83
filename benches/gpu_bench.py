"""GPU benchmark: flashkernels' dense attention forward next to torch's SDPA backends
(flash = FlashAttention-2, cuDNN, memory-efficient), timed in the same run.

Each case is checked for correctness against torch SDPA (float32 math) before timing.
Timing: CUDA events through triton.testing.do_bench (median), contenders interleaved
over several rounds (A, B, C, D, A, B, ...) and the median of the rounds reported, as
../shared/ANCHORS.md recommends. FLOPs: 4*B*H*N*N*D, halved when causal.

Writes <out>/attention_fwd.json and <out>/attention_fwd.md; prints the table last.
usage: python3 benches/gpu_bench.py --out DIR [--rounds 3] [--quick]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flashkernels

# (D, N, causal) with B*N = 16384 tokens and H*D = 2048, as in ANCHORS.md.
CASES = [
    (64, 512, False), (64, 2048, False), (64, 8192, False), (64, 16384, False), (64, 8192, True),
    (128, 512, False), (128, 2048, False), (128, 8192, False), (128, 16384, False),
    (128, 8192, True), (128, 16384, True),
]
QUICK = [(128, 8192, False), (128, 8192, True), (64, 8192, False)]

PEERS = {
    "torch_flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def flops(b, h, n, d, causal):
    f = 4.0 * b * h * n * n * d
    return f / 2 if causal else f


def rel_err(got, want):
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def run_case(d, n, causal, rounds):
    b, h = 16384 // n, 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(n * d + causal)
    # (B, N, H, D) storage, as flash-attn; torch gets (B, H, N, D) views of it (no copy).
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    ours = lambda: flashkernels.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
    fns = {"flashkernels": ours}
    for name, backend in PEERS.items():
        def peer(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        fns[name] = peer

    # Correctness first: ours against SDPA in float32 math (on a slice when huge).
    nb = max(1, min(b, 2))
    ref = F.scaled_dot_product_attention(qt[:nb].float(), kt[:nb].float(), vt[:nb].float(),
                                         is_causal=causal).transpose(1, 2)
    err = rel_err(ours()[:nb], ref)

    times = {name: [] for name in fns}
    errors = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except Exception as e:  # a backend may not support a shape: record why
                errors[name] = f"{type(e).__name__}: {e}"[:200]
    f = flops(b, h, n, d, causal)
    row = {"B": b, "H": h, "N": n, "D": d, "causal": causal, "rel_err_vs_sdpa_fp32": err,
           "results": {}}
    for name, ts in times.items():
        if ts:
            ms = statistics.median(ts)
            row["results"][name] = {"ms": ms, "tflops": f / ms / 1e9, "rounds_ms": ts}
        else:
            row["results"][name] = {"error": errors.get(name, "no timing")}
    ours_ms = row["results"]["flashkernels"].get("ms")
    for name in PEERS:
        peer_ms = row["results"][name].get("ms")
        if ours_ms and peer_ms:
            row["results"][name]["ours_speedup"] = peer_ms / ours_ms
    return row


def markdown(rows, meta):
    lines = [
        f"# Dense attention forward, bf16 — {meta['device']} — {meta['date']} — commit {meta['commit']}",
        "",
        "TFLOP/s (median of interleaved rounds, CUDA events). Ratio = peer time / our time "
        "(>1: we are faster). B·N = 16384 tokens, H·D = 2048.",
        "",
        "| D | N | causal | ours ms | ours TFLOP/s | FA2 TFLOP/s | ours/FA2 | cuDNN TFLOP/s | ours/cuDNN "
        "| mem-eff TFLOP/s | ours/mem-eff | rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = r["results"]

        def tf(name):
            x = res[name]
            return f"{x['tflops']:.0f}" if "tflops" in x else "n/a"

        def ratio(name):
            x = res[name]
            return f"{x['ours_speedup']:.2f}" if "ours_speedup" in x else "n/a"

        ours = res["flashkernels"]
        lines.append(
            f"| {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
            f"{ours.get('ms', float('nan')):.3f} | {tf('flashkernels')} | {tf('torch_flash')} | "
            f"{ratio('torch_flash')} | {tf('cudnn')} | {ratio('cudnn')} | {tf('mem_efficient')} | "
            f"{ratio('mem_efficient')} | {r['rel_err_vs_sdpa_fp32']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or os.environ.get("FK_COMMIT", "unknown")
    except OSError:
        commit = os.environ.get("FK_COMMIT", "unknown")
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }
    rows = []
    for d, n, causal in (QUICK if args.quick else CASES):
        rows.append(run_case(d, n, causal, args.rounds))
        r = rows[-1]["results"]
        print(f"D{d} N{n} causal={causal}: ours {r['flashkernels'].get('tflops', 0):.0f} TFLOP/s, "
              f"FA2 {r['torch_flash'].get('tflops', 0):.0f}, err {rows[-1]['rel_err_vs_sdpa_fp32']:.1e}",
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_fwd.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = markdown(rows, meta)
    with open(os.path.join(args.out, "attention_fwd.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
