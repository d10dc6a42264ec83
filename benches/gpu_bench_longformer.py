"""GPU benchmark: flashkernels' Longformer attention next to its peers, timed in the same run.

Contenders (bf16, B=1, H=12, D=64, one-sided window w=256; headline N=16384):
- flashkernels: fk.longformer_attention(q, k, v, w[, global_tokens=...]) on (B, N, H, D).
- flex_attention: torch.nn.attention.flex_attention, compiled with torch.compile, block mask
  from create_block_mask with the same semantics: (a) window only, |i - j| <= w;
  (b) window + 16 global tokens (global rows see every key, every row sees the global keys).
- sdpa_band_mask: F.scaled_dot_product_attention (memory-efficient backend) with the same
  rule as a materialized N x N boolean mask (skipped where the mask would not fit).
- hf_longformer_layer: Hugging Face's LongformerSelfAttention (transformers), eval, dropout 0,
  bf16 when it runs in bf16 (else fp32, recorded). It is a whole LAYER: its Q/K/V (and global
  Q/K/V) projections are inside the timing, on hidden states (B, N, H*D). Its global rows
  use separate projections, so only its time is comparable, not its output.
Global tokens: 16 per sequence, "spread" (evenly spaced, the headline; a block-sparse peer
pays for each one it meets) and "prefix" (the first 16, as a CLS + question; cheap for
block-sparse peers). Both layouts are timed.

Suites (--suite, default all):
- speed: forward, and forward + backward (autograd, random dO), at the headline shape, for
  window only and window + globals. Before timing: ours vs FlexAttention (max abs diff of the
  output, and of dq/dk/dv in the train cases; flagged if > 2e-2) and ours vs a float32
  dense masked SDPA on 2 heads (relative error).
- memory: extra peak memory of one forward (window only) at N = 16k, 64k, 256k for ours,
  FlexAttention and SDPA-band; HF's layer at 16k only. Extra = torch.cuda.max_memory_allocated
  (after reset_peak_memory_stats) minus memory allocated with only the inputs alive; it
  includes the output and any mask the approach has to build (SDPA's N x N mask, Flex's
  block mask). OOM is caught, recorded, and memory freed between cases.

Useful FLOPs: 4 * D * (allowed (query, key) pairs) * H * B for the forward, 2.5x that for
forward + backward (the convention of the Longformer issue; note gpu_bench.py uses 3.5x for
dense). Pairs are counted exactly (vectorized): a window row i sees min(N-1, i+w) -
max(0, i-w) + 1 keys, plus the global keys outside its window; a global row sees all N.
Timing: CUDA events through triton.testing.do_bench (median), contenders interleaved over
--rounds rounds (A, B, C, A, B, C, ...), median of the rounds reported (../shared/ANCHORS.md).
Goals checked at the headline: window only >= 2x FlexAttention, window + 16 (spread) globals
>= 5x FlexAttention (speedup = Flex ms / our ms, the same useful FLOPs for both).

Writes <out>/longformer.json and <out>/longformer.md (rewritten after every case, so a
run cut short keeps what it measured); prints the tables.
usage: python3 benches/gpu_bench_longformer.py --out DIR [--suite all|speed|memory]
       [--rounds 3] [--no-hf] [--smoke [--mock-ours]]
--smoke: tiny shapes on the CPU (FlexAttention eager, no compile, no memory figures), to
check the script's logic where there is no GPU; also cross-checks the masks of the peers
against each other, the closed-form pair count against the masks, and the mask rule against
HF's layer (global projections set equal to the local ones, float64). --mock-ours (smoke
only) stands in a dense reference for our op so that its code path runs too.

The peers (masks, FlexAttention, SDPA, HF's layer) and the device and timing helpers are in
gpu_bench_longformer_peers.py next to this file.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import gpu_bench_longformer_peers as peers
from gpu_bench_longformer_peers import (
    allowed_pairs,
    dense_mask,
    flex_block_mask,
    flex_fn,
    free,
    global_positions,
    hf_layer,
    hf_runner,
    hf_semantics_check,
    log,
    max_abs,
    mock_longformer_attention,
    randn,
    rel_err,
    sdpa_call,
    sdpa_mask_fits,
    sync,
    timed,
)

try:
    import flashkernels as fk

    OURS = getattr(fk, "longformer_attention", None)
except Exception as e:  # noqa: BLE001 — the bench still measures the peers
    print(f"flashkernels import failed: {type(e).__name__}: {e}")
    OURS = None
OURS_MISSING = "skipped: flashkernels.longformer_attention not available"

FLEX_TOL = 2e-2  # max abs diff ours vs FlexAttention, bf16
HEADLINE = {"B": 1, "N": 16384, "H": 12, "D": 64, "w": 256, "n_global": 16}
SMOKE = {"B": 1, "N": 256, "H": 2, "D": 16, "w": 16, "n_global": 4}
MEM_NS = (16384, 65536, 262144)
SMOKE_MEM_NS = (256, 512)
GOALS = {"window": 2.0, "global_spread": 5.0}


# ---------------------------------------------------------------- speed cases


def train_step(fwd, grad_inputs, dout):
    def run():
        for x in grad_inputs:
            x.grad = None
        fwd().backward(dout)

    return run


def grads_of(fwd, inputs, dout):
    for x in inputs:
        x.grad = None
    fwd().backward(dout)
    g = [x.grad.detach().clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return g


def case_speed(shape, layout, train, rounds, with_hf):
    b, n, h, d, w = (shape[k] for k in ("B", "N", "H", "D", "w"))
    glob = global_positions(n, shape["n_global"], layout) if layout != "none" else []
    seed = n + w + 31 * len(glob) + (7 if layout == "prefix" else 0)
    q = randn(b, n, h, d, seed=seed, requires_grad=train)
    k = randn(b, n, h, d, seed=seed + 1, requires_grad=train)
    v = randn(b, n, h, d, seed=seed + 2, requires_grad=train)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    is_global_bn = None
    if glob:
        is_global_bn = torch.zeros(b, n, dtype=torch.bool, device=peers.DEV)
        is_global_bn[:, glob] = True
    pairs = allowed_pairs(n, w, glob)
    flops = 4.0 * d * pairs * h * b * (2.5 if train else 1.0)
    case = {
        "B": b,
        "N": n,
        "H": h,
        "D": d,
        "window_one_sided": w,
        "globals": len(glob),
        "global_layout": layout if glob else None,
        "train": train,
        "allowed_pairs_per_head": pairs,
        "density": pairs / (n * n),
    }
    checks, notes = {}, {}
    fns = {}

    # ours
    if OURS is None:
        notes["flashkernels"] = OURS_MISSING
        log(OURS_MISSING)
    else:
        # Host index lists: a CUDA mask would be copied to the host (a sync) every call.
        kw = {"global_tokens": [row.nonzero().flatten().tolist() for row in is_global_bn]} if glob else {}
        fns["flashkernels"] = lambda: OURS(q, k, v, w, **kw)  # noqa: E731

    # FlexAttention
    try:
        bm = flex_block_mask(b, n, w, is_global_bn)
        flex = flex_fn()
        fns["flex_attention"] = lambda: flex(qt, kt, vt, block_mask=bm)  # noqa: E731
    except Exception as e:  # noqa: BLE001
        notes["flex_attention"] = f"{type(e).__name__}: {e}"[:300]
        log(f"FlexAttention unavailable: {notes['flex_attention']}")

    # SDPA with a dense boolean mask
    fits, need = sdpa_mask_fits(n)
    if fits:
        try:
            band = dense_mask(n, w, is_global_bn[0] if glob else None)
            if peers.DEV != "cuda":
                assert int(band.sum()) == pairs, (int(band.sum()), pairs)
            fns["sdpa_band_mask"] = lambda: sdpa_call(qt, kt, vt, band)  # noqa: E731
        except torch.cuda.OutOfMemoryError as e:
            notes["sdpa_band_mask"] = f"OOM building the N x N mask: {str(e)[:120]}"
            free()
    else:
        notes["sdpa_band_mask"] = f"skipped: N x N mask needs ~{need / 2**30:.1f} GiB"

    # Correctness before timing. Outputs are (B, N, H, D) for ours, (B, H, N, D) for peers.
    # Grad mode as in the timing (train cases: one compiled Flex graph, not two).
    outs = {}
    with torch.set_grad_enabled(train):
        for name, fn in fns.items():
            try:
                o = fn().detach()
                outs[name] = o if name == "flashkernels" else o.transpose(1, 2)
            except Exception as e:  # noqa: BLE001
                notes[name] = f"{type(e).__name__}: {e}"[:300]
                log(f"{name} failed its first call: {notes[name]}")
                free()
    for name in notes:
        fns.pop(name, None)
    with torch.no_grad():
        # float32 dense reference on 2 heads (all rows at the smoke size, 2048 rows at scale)
        hs = min(h, 2)
        rows = slice(None) if n <= 4096 else slice(n // 2 - 1024, n // 2 + 1024)
        refmask = dense_mask(n, w, is_global_bn[0] if glob else None, rows=rows)
        ref = F.scaled_dot_product_attention(
            qt[:, :hs, rows].float(), kt[:, :hs].float(), vt[:, :hs].float(), attn_mask=refmask
        )
        ref = ref.transpose(1, 2)
        del refmask
        for name, o in outs.items():
            checks[f"{name}_rel_err_vs_fp32"] = rel_err(o[:, rows, :hs], ref)
        if "flashkernels" in outs and "flex_attention" in outs:
            diff = max_abs(outs["flashkernels"], outs["flex_attention"])
            checks["max_abs_diff_ours_vs_flex"] = diff
            checks["flagged"] = diff > FLEX_TOL or not math.isfinite(diff)
        if "sdpa_band_mask" in outs and "flex_attention" in outs:
            checks["max_abs_diff_sdpa_vs_flex"] = max_abs(outs["sdpa_band_mask"], outs["flex_attention"])
        del outs, ref

    if train:
        dout = randn(b, n, h, d, seed=seed + 3)
        fwds = fns
        fns = {}
        for name, fn in fwds.items():
            fns[name] = train_step(fn, (q, k, v), dout if name == "flashkernels" else dout.transpose(1, 2))
        peer = "flex_attention" if "flex_attention" in fwds else "sdpa_band_mask"
        if "flashkernels" in fwds and peer in fwds:  # sdpa only where Flex cannot (CPU smoke)
            try:
                go = grads_of(fwds["flashkernels"], (q, k, v), dout)
                gf = grads_of(fwds[peer], (q, k, v), dout.transpose(1, 2))
                diffs = [max_abs(a, c) for a, c in zip(go, gf)]
                short = "flex" if peer == "flex_attention" else "sdpa"
                checks[f"grad_max_abs_diff_ours_vs_{short}"] = dict(zip(("dq", "dk", "dv"), diffs))
                # gradients are larger than outputs: relative to the Flex gradient's max
                rel = max(dd / max(c.abs().max().item(), 1e-6) for dd, c in zip(diffs, gf))
                checks["grad_flagged"] = rel > FLEX_TOL or not math.isfinite(rel)
                del go, gf
            except Exception as e:  # noqa: BLE001
                checks["grad_check_error"] = f"{type(e).__name__}: {e}"[:300]
    if train:  # warm-up (compiles Flex's backward) outside the timing; drop what fails
        for name in list(fns):
            try:
                fns[name]()
                sync()
            except Exception as e:  # noqa: BLE001
                notes[name] = f"{type(e).__name__}: {e}"[:300]
                log(f"{name} failed its first fwd+bwd: {notes[name]}")
                del fns[name]
                free()
    if with_hf:
        try:
            fn, dt = hf_runner(b, n, h, d, w, glob, train, seed + 10)
            fns["hf_longformer_layer"] = fn
            case["hf_dtype"] = dt
        except Exception as e:  # noqa: BLE001
            notes["hf_longformer_layer"] = f"{type(e).__name__}: {e}"[:300]
    free()
    return result_row(case, fns, flops, checks, notes, rounds)


def result_row(case, fns, flops, checks, notes, rounds):
    times, errors = timed(fns, rounds)
    row = dict(case, checks=checks, results={})
    for name, ts in times.items():
        if ts:
            ms = statistics.median(ts)
            r = {"ms": ms, "rounds_ms": ts}
            if name == "hf_longformer_layer":
                r["note"] = "whole layer incl. Q/K/V (+ global Q/K/V) projections"
            else:
                r["tflops"] = flops / ms / 1e9
            row["results"][name] = r
        else:
            row["results"][name] = {"error": errors.get(name, "no timing")}
    for name, why in notes.items():
        row["results"].setdefault(name, {"error": why})
    ours_ms = row["results"].get("flashkernels", {}).get("ms")
    for name, r in row["results"].items():
        if name != "flashkernels" and ours_ms and r.get("ms"):
            r["ours_speedup"] = r["ms"] / ours_ms  # peer ms / our ms (= our TF/s / peer TF/s)
    return row


# ---------------------------------------------------------------- memory cases


def peak_extra(build_and_run):
    """Extra peak bytes of build_and_run() over what is allocated now (the inputs)."""
    sync()
    base = torch.cuda.memory_allocated() if peers.DEV == "cuda" else 0
    if peers.DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = build_and_run()
    sync()
    peak = torch.cuda.max_memory_allocated() - base if peers.DEV == "cuda" else None
    del out
    return peak


def mem_entry(fn):
    try:
        p = peak_extra(fn)
        return {"peak_extra_mib": None if p is None else p / 2**20}
    except torch.cuda.OutOfMemoryError as e:
        return {"error": f"OOM: {str(e)[:160]}"}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        free()


def case_memory(shape, n, with_hf):
    b, h, d, w = (shape[k] for k in ("B", "H", "D", "w"))
    row = {"B": b, "N": n, "H": h, "D": d, "window_one_sided": w, "results": {}}
    res = row["results"]
    q, k, v = (randn(b, n, h, d, seed=n + i) for i in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    row["inputs_mib"] = 3 * q.numel() * q.element_size() / 2**20
    row["output_mib"] = q.numel() * q.element_size() / 2**20
    with torch.no_grad():
        if OURS is None:
            res["flashkernels"] = {"error": OURS_MISSING}
        else:
            try:
                OURS(q, k, v, w)  # warm-up (module load) outside the measurement
                free()
                res["flashkernels"] = mem_entry(lambda: OURS(q, k, v, w))
            except Exception as e:  # noqa: BLE001
                res["flashkernels"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                free()
        try:
            flex = flex_fn()
            flex(qt, kt, vt, block_mask=flex_block_mask(b, n, w))  # compile outside
            free()
            res["flex_attention"] = mem_entry(lambda: flex(qt, kt, vt, block_mask=flex_block_mask(b, n, w)))
            res["flex_attention"]["note"] = "includes building the block mask"
        except Exception as e:  # noqa: BLE001
            res["flex_attention"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            free()
        fits, need = sdpa_mask_fits(n)
        if fits:
            res["sdpa_band_mask"] = mem_entry(lambda: sdpa_call(qt, kt, vt, dense_mask(n, w)))
            res["sdpa_band_mask"]["note"] = "includes the N x N bool mask"
        else:
            res["sdpa_band_mask"] = {"error": f"skipped: N x N mask needs ~{need / 2**30:.0f} GiB"}
    # Release the inputs before HF's layer is measured. Rebound rather than `del`eted: the
    # lambdas above close over these names (pyflakes reports a deleted closed-over name).
    q = k = v = qt = kt = vt = None
    free()
    if with_hf and n <= 16384:
        try:
            if "dtype" not in peers._HF_DTYPE:  # --suite memory alone: find the dtype it runs in
                hf_runner(b, 1024 if n > 1024 else n, h, d, w, [], False, 1)
            layer = hf_layer(h, d, w, peers._HF_DTYPE.get("dtype", torch.float32))
            dt = next(layer.parameters()).dtype
            x = randn(b, n, h * d, seed=n, dtype=dt)
            m = torch.zeros(b, n, device=peers.DEV)
            kw = dict(attention_mask=m, is_index_masked=m < 0, is_index_global_attn=m > 0, is_global_attn=False)
            with torch.no_grad():
                layer(x, **kw)
                free()
                res["hf_longformer_layer"] = mem_entry(lambda: layer(x, **kw))
            res["hf_longformer_layer"]["note"] = (
                f"layer in {str(dt).replace('torch.', '')}, input = hidden states (B, N, H*D)"
            )
            del layer, x
        except Exception as e:  # noqa: BLE001
            res["hf_longformer_layer"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        free()
    elif with_hf:
        res["hf_longformer_layer"] = {"error": "skipped: HF's layer measured at 16k only"}
    return row


# ---------------------------------------------------------------- output


def goals(rows):
    out = {}
    for r in rows:
        if r["N"] != HEADLINE["N"] and peers.DEV == "cuda":
            continue
        key = "window" if not r["globals"] else f"global_{r['global_layout']}"
        target = GOALS.get(key)
        sp = r["results"].get("flex_attention", {}).get("ours_speedup")
        name = f"{key}_{'fwd_bwd' if r['train'] else 'fwd'}"
        out[name] = {
            "speedup_vs_flex": sp,
            "target": target,
            "met": None if sp is None or target is None else sp >= target,
        }
    return out


def markdown(meta, rows, mem, gl):
    lines = [
        f"# Longformer attention, bf16 — {meta['device']} — {meta['date']} — commit "
        f"{meta['commit']} — torch {meta['torch']}, transformers {meta.get('transformers')}",
        "",
        "Useful TFLOP/s = 4·D·(allowed pairs)·H·B / time (x2.5 for fwd+bwd); median of "
        "interleaved rounds, CUDA events; x = peer time / our time (> 1: we are faster). "
        "HF = LongformerSelfAttention LAYER (includes its projections): ms only.",
        "",
        "| case | pass | flashkernels | flex_attention | sdpa_band_mask | hf_longformer_layer "
        "| ours vs flex max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = f"w + {r['globals']} {r['global_layout']} globals" if r["globals"] else "window only"
        cells = []
        for name in ("flashkernels", "flex_attention", "sdpa_band_mask", "hf_longformer_layer"):
            x = r["results"].get(name)
            if x is None:
                cells.append("-")
            elif "ms" in x:
                tf = f" {x['tflops']:.0f} TF/s" if "tflops" in x else ""
                ratio = f" (x{x['ours_speedup']:.2f})" if "ours_speedup" in x else ""
                dt = f" [{r.get('hf_dtype')}]" if name == "hf_longformer_layer" else ""
                cells.append(f"{x['ms']:.3f} ms{tf}{ratio}{dt}")
            else:
                cells.append(x["error"][:80].replace("|", "/"))
        c = r["checks"]
        diff = c.get("max_abs_diff_ours_vs_flex")
        diff = "-" if diff is None else f"{diff:.1e}" + (" FLAGGED" if c.get("flagged") else "")
        if c.get("grad_flagged"):
            diff += " (grad FLAGGED)"
        lines.append(f"| N={r['N']} {g} | {'fwd+bwd' if r['train'] else 'fwd'} | " + " | ".join(cells) + f" | {diff} |")
    if gl:
        lines += ["", "Goals (speedup vs FlexAttention at the headline):", ""]
        for k, x in gl.items():
            sp = "n/a" if x["speedup_vs_flex"] is None else f"x{x['speedup_vs_flex']:.2f}"
            tgt = "-" if x["target"] is None else f">= x{x['target']:.0f}"
            lines.append(f"- {k}: {sp} (goal {tgt}: {x['met']})")
    if mem:
        lines += [
            "",
            "Extra peak memory of one forward, window only, MiB (max_memory_allocated "
            "minus the inputs; includes the output and masks built):",
            "",
            "| N | inputs | flashkernels | flex_attention | sdpa_band_mask | hf_longformer_layer |",
            "|---|---|---|---|---|---|",
        ]
        for r in mem:
            cells = []
            for name in ("flashkernels", "flex_attention", "sdpa_band_mask", "hf_longformer_layer"):
                x = r["results"].get(name)
                if x is None:
                    cells.append("-")
                elif "peak_extra_mib" in x:
                    p = x["peak_extra_mib"]
                    cells.append("n/a (cpu)" if p is None else f"{p:.0f}")
                else:
                    cells.append(x["error"][:60].replace("|", "/"))
            lines.append(f"| {r['N']} | {r['inputs_mib']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out, meta, rows, mem):
    gl = goals(rows)
    with open(os.path.join(out, "longformer.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "memory": mem, "goals": gl}, f, indent=1)
    md = markdown(meta, rows, mem, gl)
    with open(os.path.join(out, "longformer.md"), "w") as f:
        f.write(md)
    return md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--suite", default="all", choices=["all", "speed", "memory"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="leave out Hugging Face's layer")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, no compile")
    ap.add_argument(
        "--mock-ours", action="store_true", help="with --smoke: stand in a dense reference for our op (logic check)"
    )
    args = ap.parse_args()
    global OURS
    if args.mock_ours:
        if not args.smoke:
            raise SystemExit("--mock-ours only with --smoke")
        OURS = mock_longformer_attention
    t_start = time.time()
    if args.smoke:
        peers.DEV, peers.COMPILE = "cpu", False
        shape, mem_ns = SMOKE, SMOKE_MEM_NS
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for a CPU logic check")
        shape, mem_ns = HEADLINE, MEM_NS
        import torch._dynamo as dynamo

        for knob in ("cache_size_limit", "recompile_limit"):  # recompiles must not fall to eager
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, 64)
    with_hf = not args.no_hf
    commit = os.environ.get("FK_COMMIT")
    if not commit:
        try:
            commit = (
                subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
                or "unknown"
            )
        except OSError:
            commit = "unknown"
    try:
        import transformers

        tv = transformers.__version__
    except Exception:  # noqa: BLE001
        tv, with_hf = None, False
    meta = {
        "device": torch.cuda.get_device_name() if peers.DEV == "cuda" else "cpu (smoke)",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
        "transformers": tv,
        "dtype": "bfloat16",
        "flex_compiled": peers.COMPILE,
        "flops_convention": "fwd 4*D*pairs*H*B, fwd+bwd 2.5x",
        "ours_available": OURS is not None,
    }
    os.makedirs(args.out, exist_ok=True)
    if args.smoke and with_hf:
        hf_semantics_check(shape)
    rows, mem = [], []
    if args.suite in ("all", "speed"):
        for layout in ("none", "spread", "prefix"):
            for train in (False, True):
                label = f"speed N={shape['N']} {layout} {'fwd+bwd' if train else 'fwd'}"
                t0 = time.time()
                try:
                    rows.append(case_speed(shape, layout, train, args.rounds, with_hf))
                except Exception as e:  # one broken case must not hide the others
                    log(f"{label}: case failed: {type(e).__name__}: {e}")
                    free()
                    continue
                r = rows[-1]["results"]
                summary = "; ".join(
                    f"{k} {x['ms']:.3f} ms" + (f" x{x['ours_speedup']:.2f}" if "ours_speedup" in x else "")
                    if "ms" in x
                    else f"{k}: {x['error'][:60]}"
                    for k, x in r.items()
                )
                log(f"{label} ({time.time() - t0:.0f} s): {summary}; checks {rows[-1]['checks']}")
                write(args.out, meta, rows, mem)
    if args.suite in ("all", "memory"):
        for n in mem_ns:
            t0 = time.time()
            try:
                mem.append(case_memory(shape, n, with_hf))
            except Exception as e:  # noqa: BLE001
                log(f"memory N={n}: case failed: {type(e).__name__}: {e}")
                free()
                continue
            log(f"memory N={n} ({time.time() - t0:.0f} s): {mem[-1]['results']}")
            write(args.out, meta, rows, mem)
    meta["elapsed_s"] = time.time() - t_start
    md = write(args.out, meta, rows, mem)
    print(md, flush=True)


if __name__ == "__main__":
    main()
