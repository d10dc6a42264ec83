"""Every op against its best peer in one run, headline cases first, within a time budget.

    python3 benches/gpu_bench_all.py --out DIR --budget 240 [--rounds 2] [--only OP ...]

The GPU check's bench step (scripts/gpu_check.sh bench). One process, so torch, CUDA and
the compiled peers start once. Cases come from the per-op benches (gpu_bench.py,
gpu_bench_longformer.py, gpu_bench_conv.py, gpu_bench_ffn.py, gpu_bench_linformer.py,
gpu_bench_reformer.py: each checks correctness first, then times the contenders
interleaved over --rounds rounds with CUDA events and takes medians) plus pooling here.
The headline case of every op runs first, then the sweeps that give the plots (TFLOP/s
against sequence length); a case whose estimated cost no longer fits the budget is
skipped and listed, and bench.json is rewritten after every case, so a cut run still has
the headline ratios.

bench.json: {"meta", "rows": [{op, case, series, x_name, x, headline, metric, params,
check: {rel_err, ok}, results: {contender: {ms, tflops | gbps} | {error}}, peer, ratio}],
"skipped": [{op, case, reason}], "failed": [{op, case, error}]}. `peer` is the fastest
peer that ran the case, `ratio` = its ms / our ms (> 1: we are faster); reformer results
also carry `peak_mib` (the contender's peak memory above its inputs; null if not measured)
and their params the issue's `goal`. bench.md: a table.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashkernels  # noqa: E402
import gpu_bench as attn  # noqa: E402
import gpu_bench_conv as conv  # noqa: E402
import gpu_bench_ffn as ffn  # noqa: E402
import gpu_bench_linformer as lin  # noqa: E402
import gpu_bench_longformer as lf  # noqa: E402
import gpu_bench_reformer as ref  # noqa: E402

OURS = "flashkernels"
CHECK_TOL = 2e-2  # bf16 relative error of an attention / conv output vs float32


class Case:
    """One benchmark case: what it is, where it goes in the plots, and how to run it."""

    def __init__(self, op, case, series, x_name, x, run, est_s, headline=False, metric="tflops"):
        self.op, self.case, self.series, self.x_name, self.x = op, case, series, x_name, x
        self.run, self.est_s, self.headline, self.metric = run, est_s, headline, metric


def dense(op, d, n, causal, train=False, headline=False):
    return Case(
        op,
        f"D{d} N{n}{' causal' if causal else ''}",
        f"D{d}{' causal' if causal else ''}",
        "N",
        n,
        lambda r: attn.case_fwd(d, n, causal, r, train=train),
        25 if train else 15,
        headline,
    )


def longformer(layout, train, n=lf.HEADLINE["N"], headline=False):
    shape = dict(lf.HEADLINE, N=n)
    what = "window" if layout == "none" else f"window + {shape['n_global']} {layout} globals"
    op = "longformer_train" if train else "longformer_fwd"
    # FlexAttention compiles per shape and mask (tens of seconds the first time).
    return Case(
        op,
        f"N{n} {what}",
        what,
        "N",
        n,
        lambda r: lf.case_speed(shape, layout, train, r, with_hf=False),
        60 if train else 40,
        headline,
    )


def conv_layer(layer, nhwc, train, headline=False):
    hw, c, k, rs, stride, pad = layer
    name = f"{hw}x{hw} {c}->{k} {rs}x{rs}/{stride}"
    layout = "NHWC" if nhwc else "NCHW"
    return Case(
        "conv_train" if train else "conv_fwd",
        f"{name} {layout}",
        layout,
        "layer",
        name,
        lambda r: conv.run_layer(*layer, nhwc, train, r),
        20 if train else 12,
        headline,
    )


def gemm_case(size):
    """Issue 18's plain GEMM (size^3, bf16) as the 1x1 NHWC convolution whose GEMM it is,
    next to cuBLAS (torch.matmul) on the same data."""
    return Case("gemm", f"{size}^3 as 1x1 NHWC conv", "bf16", "size", size, lambda r: conv.run_gemm(size, r), 15)


def ffn_case(d, gated, train, headline=False):
    """The fused feed-forward block (bf16, 8192 tokens) vs torch eager and torch.compile of
    the same nn.Linear layers; torch.compile's first call (tens of seconds) is in est_s."""
    block = "SwiGLU" if gated else "GELU"
    return Case(
        "ffn_train" if train else "ffn_fwd",
        f"{block} d_model {d} d_hidden {ffn.hidden_of(d, gated)}",
        f"{block} ({'8/3' if gated else '4'}x hidden)",
        "d_model",
        d,
        lambda r: ffn.run_case(d, gated, train, r),
        45 if train else 30,
        headline,
    )


def linformer_case(n, kp, train, headline=False):
    """Linformer attention (bf16, B1 H12 D64, shared E/F) vs the torch composite (E K, F V
    matmuls + SDPA) and dense SDPA over the same N."""
    return Case(
        "linformer_train" if train else "linformer_fwd",
        f"N{n} k{kp}",
        f"k {kp}",
        "N",
        n,
        lambda r: lin.run_case(n, kp, train, r),
        25 if train else 12,
        headline,
    )


def reformer_case(n, n_hashes, train, headline=False):
    """Reformer LSH attention, the whole layer (bf16, B1 H8 D64, chunk 64, 2N/C buckets:
    the qk / v projections + lsh_attention) vs Hugging Face's LSHSelfAttention in float32
    and bf16 and dense SDPA over the same N; each contender's peak memory in its result."""
    return Case(
        "reformer_train" if train else "reformer_fwd",
        f"N{n} {n_hashes} hash{'es' if n_hashes > 1 else ''}",
        f"{n_hashes} hash{'es' if n_hashes > 1 else ''}",
        "N",
        n,
        lambda r: ref.run_case(n, n_hashes, train, r),
        30 if train else 20,
        headline,
    )


def pool_case(kind, train, headline=False):
    """max/avg pooling 3x3 stride 2 pad 1 on a ResNet stem output, channels-last bf16,
    vs torch (cuDNN / ATen). Memory-bound: GB/s of the tensors each must read and write."""

    def run(rounds):
        gen = torch.Generator(device="cuda").manual_seed(3)
        x = torch.randn(32, 64, 112, 112, device="cuda", dtype=torch.bfloat16, generator=gen)
        x = x.to(memory_format=torch.channels_last).requires_grad_(train)
        ours_f = getattr(flashkernels, f"{kind}_pool2d")
        peer_f = getattr(F, f"{kind}_pool2d")
        fns = {OURS: lambda: ours_f(x, 3, stride=2, padding=1), "torch": lambda: peer_f(x, 3, stride=2, padding=1)}
        with torch.no_grad():
            y, want = fns[OURS](), fns["torch"]()
            err = attn.rel_err(y, want)
        nbytes = (x.numel() + y.numel()) * x.element_size()
        if train:
            dy = torch.randn_like(want)
            fns = {name: attn.train_step(fn, (x,), dy) for name, fn in fns.items()}
            nbytes *= 2  # the backward reads dy (and x or indices) and writes dx
        times, errors = attn.timed(fns, rounds)
        row = {
            "N": 32,
            "C": 64,
            "H": 112,
            "W": 112,
            "window": "3x3/2 pad 1",
            "train": train,
            "rel_err_vs_torch": err,
            "results": {},
        }
        for name, ts in times.items():
            if ts:
                ms = statistics.median(ts)
                row["results"][name] = {"ms": ms, "gbps": nbytes / ms / 1e6, "rounds_ms": ts}
            else:
                row["results"][name] = {"error": errors.get(name, "no timing")}
        return row

    return Case(
        "pool",
        f"{kind} {'fwd+bwd' if train else 'fwd'} 112x112 C64",
        kind,
        "pass",
        "fwd+bwd" if train else "fwd",
        run,
        8,
        headline,
        metric="gbps",
    )


def cases():
    """Headline case of every op first, then the sweeps."""
    r50 = conv.LAYERS
    yield dense("attention_fwd", 128, 8192, False, headline=True)
    yield dense("attention_train", 128, 8192, True, train=True, headline=True)
    yield longformer("none", False, headline=True)
    yield longformer("spread", True, headline=True)
    yield conv_layer(r50[0], True, False, headline=True)
    yield conv_layer(r50[0], True, True, headline=True)
    yield pool_case("max", False, headline=True)
    # Each op's forward headline before any second headline, so a tight budget still
    # measures every op once.
    yield ffn_case(1024, False, False, headline=True)  # the goals: >= 1.15x eager here
    yield linformer_case(16384, 256, False, headline=True)  # the goal: >= 1.5x composite
    yield reformer_case(16384, 4, False, headline=True)  # the goal: >= 20x HF fp32, <= 1/4 its memory
    yield ffn_case(1024, False, True, headline=True)
    yield linformer_case(16384, 256, True, headline=True)
    yield reformer_case(16384, 4, True, headline=True)
    yield longformer("spread", False, headline=True)
    yield longformer("none", True, headline=True)
    yield ffn_case(4096, False, False, headline=True)  # >= 1.0x eager
    for d in (128, 64):
        for n in (512, 2048, 8192, 16384):
            if (d, n) != (128, 8192):
                yield dense("attention_fwd", d, n, False)
        yield dense("attention_fwd", d, 8192 if d == 64 else 16384, True)
    for n in (2048, 16384):
        yield dense("attention_train", 128, n, True, train=True)
    for suite, op in (("gqa", "attention_gqa"), ("varlen", "attention_varlen"), ("window", "attention_window")):
        for i, run in enumerate(attn.suite_cases(suite, quick=False)):
            yield Case(op, f"{suite} #{i}", suite, "case", f"#{i}", run, 30 if suite == "window" else 15)
    for n in (4096, 65536):
        yield longformer("none", False, n=n)
    yield longformer("prefix", False)
    for layer in r50[1:]:
        yield conv_layer(layer, True, False)
    yield gemm_case(8192)
    for layer in r50:
        yield conv_layer(layer, False, False)
    yield pool_case("avg", False)
    yield pool_case("max", True)
    yield pool_case("avg", True)
    for train in (False, True):
        for d in ffn.D_MODELS:
            yield ffn_case(d, True, train)
    yield ffn_case(4096, False, True)
    for n, kp, train in lin.cases():
        if (n, kp) != (16384, 256):
            yield linformer_case(n, kp, train)
    for n, n_hashes, train in ref.cases():
        if (n, n_hashes) != (16384, 4):
            yield reformer_case(n, n_hashes, train)


def check_of(raw):
    """(rel_err, ok) from a per-op bench row's correctness fields."""
    for key in ("rel_err_vs_sdpa_fp32", "rel_err_vs_torch_fp32", "rel_err_vs_torch"):
        if key in raw:
            e = raw[key]
            return {"rel_err": e, "ok": e == e and e <= CHECK_TOL}
    c = raw.get("checks", {})
    e = c.get(f"{OURS}_rel_err_vs_fp32")
    flagged = c.get("flagged") or c.get("grad_flagged")
    return {
        "rel_err": e,
        "ok": e is not None and e <= CHECK_TOL and not flagged,
        **{k: v for k, v in c.items() if k != f"{OURS}_rel_err_vs_fp32"},
    }


def normalize(case, raw):
    """A per-op bench row in the common schema, with the ratio against the fastest peer."""
    results = {
        name: {k: v for k, v in r.items() if k in ("ms", "tflops", "gbps", "peak_mib", "error", "note")}
        for name, r in raw["results"].items()
    }
    params = {k: v for k, v in raw.items() if k not in ("results", "checks") and "rel_err" not in k}
    row = {
        "op": case.op,
        "case": case.case,
        "series": case.series,
        "x_name": case.x_name,
        "x": case.x,
        "headline": case.headline,
        "metric": case.metric,
        "params": params,
        "check": check_of(raw),
        "results": results,
    }
    ours = results.get(OURS, {}).get("ms")
    peers = {n: r["ms"] for n, r in results.items() if not n.startswith(OURS) and "ms" in r and case.metric in r}
    if ours and peers:
        row["peer"] = min(peers, key=peers.get)
        row["ratio"] = peers[row["peer"]] / ours
    return row


def driver_version():
    try:
        return (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
            or None
        )
    except OSError:
        return None


def markdown(doc):
    m = doc["meta"]
    lines = [
        f"# Every op vs its best peer — {m['device']} — {m['date']} — commit {m['commit']}",
        "",
        "ratio = peer ms / our ms against the fastest peer of the case (> 1: we are faster); "
        "TFLOP/s or GB/s; medians of interleaved rounds (CUDA events).",
        "",
        "| op | case | ours ms | ours | best peer | peer ms | peer | ratio | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        unit = "TF/s" if r["metric"] == "tflops" else "GB/s"
        o = r["results"].get(OURS, {})
        p = r["results"].get(r.get("peer"), {})
        fmt = lambda x, k, f: f.format(x[k]) if k in x else x.get("error", "-")[:40]  # noqa: E731
        err = r["check"].get("rel_err")
        check = ("ok" if r["check"]["ok"] else "MISMATCH") + (f" {err:.1e}" if err is not None else "")
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(
            f"| {r['op']}{' (headline)' if r['headline'] else ''} | {r['case']} | "
            f"{fmt(o, 'ms', '{:.3f}')} | {fmt(o, r['metric'], '{:.0f} ' + unit)} | "
            f"{r.get('peer', '-')} | {fmt(p, 'ms', '{:.3f}')} | "
            f"{fmt(p, r['metric'], '{:.0f} ' + unit)} | {ratio} | {check} |"
        )
    for what in ("skipped", "failed"):
        if doc[what]:
            lines += ["", f"{what.capitalize()}:"] + [
                f"- {x['op']} {x['case']}: {x.get('reason') or x.get('error')}" for x in doc[what]
            ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=240, help="seconds for all cases")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="ops to run (e.g. attention_fwd pool)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU")
    start = time.time()
    deadline = start + args.budget
    import torch._dynamo as dynamo

    for knob in ("cache_size_limit", "recompile_limit"):  # recompiles must not fall to eager
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, 64)
    meta = {
        "kind": "bench",
        "device": torch.cuda.get_device_name(),
        "driver": driver_version(),
        "commit": os.environ.get("FK_COMMIT") or "unknown",  # gpu_check.py fills it in
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rounds": args.rounds,
        "budget_s": args.budget,
    }
    doc = {"meta": meta, "rows": [], "skipped": [], "failed": []}
    os.makedirs(args.out, exist_ok=True)

    def write():
        meta["elapsed_s"] = round(time.time() - start, 1)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(markdown(doc))

    for case in cases():
        if args.only and case.op not in args.only:
            continue
        left = deadline - time.time()
        if left < case.est_s:
            doc["skipped"].append(
                {"op": case.op, "case": case.case, "reason": f"budget: {left:.0f} s left, needs ~{case.est_s} s"}
            )
            continue
        t0 = time.time()
        try:
            row = normalize(case, case.run(args.rounds))
        except Exception as e:  # one broken case must not hide the others
            doc["failed"].append({"op": case.op, "case": case.case, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{case.op} {case.case}: FAILED {doc['failed'][-1]['error']}", flush=True)
            lf.free()
            write()
            continue
        doc["rows"].append(row)
        ratio = f"{row['ratio']:.2f}x {row['peer']}" if "ratio" in row else "no peer time"
        print(
            f"{case.op:<18} {case.case:<36} {ratio:<24} check "
            f"{'ok' if row['check']['ok'] else 'MISMATCH'} ({time.time() - t0:.0f} s)",
            flush=True,
        )
        lf.free()
        write()
    write()
    print(markdown(doc), flush=True)


if __name__ == "__main__":
    main()
