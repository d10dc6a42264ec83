"""GPU benchmark: flashkernels' Reformer LSH attention next to Hugging Face's
LSHSelfAttention layer (float32, the issue's peer, and bfloat16) and dense SDPA over the
same N, timed in the same run, with each contender's peak memory (issue 16, item 7).

What is timed: the whole layer as Hugging Face's ``LSHSelfAttention`` computes it, from
the hidden states x (B, N, H·D) to the attention output before the output dense
(``ReformerSelfOutput``'s dense is not part of LSHSelfAttention), so for every contender:
- flashkernels: the two bias-free projections qk = x W_qkᵀ and v = x W_vᵀ as torch
  ``nn.Linear`` in bf16 (the same weights as the HF layer), then
  ``flashkernels.lsh_attention`` (bf16; it hashes on the device with the given rotations);
- hf_lsh_fp32: ``LSHSelfAttention`` in float32 (its query_key / value Linears, hashing,
  sort, chunked attention, round combination): the issue's peer;
- hf_lsh_bf16: the same layer cast to bfloat16 (a failure is recorded as an error row
  entry; the others still run; its output on HF's float32 buckets against the float32
  layer is recorded as checks.hf_lsh_bf16_rel_err_vs_fp32, for information);
  both HF layers in eval() with lsh_attention_probs_dropout_prob 0;
- dense_sdpa: the same two bf16 projections, then ``scaled_dot_product_attention`` over
  all N keys with q = k = qk (shared QK, no key normalisation nor self mask): for scale.
Forward cases run under ``torch.no_grad()``; forward + backward ("train") cases run the
forward and ``out.backward(dout)`` (dout a fixed random tensor: the cost of
``out.sum().backward()``), with gradients for x (the input hidden states) and both
projection weights, as a training step would; the gradients are cleared before each step.

Cases: bf16, B 1, H 8, D 64 (hidden 512), chunk C 64, chunks_before 1, chunks_after 0, not
causal, no padding; N in {4096, 16384, 65536} x n_hashes in {1, 4}; forward and forward +
backward. Bucket count: an explicit ``num_buckets = 2·N/C`` (128, 512, 2048; powers of 2)
for HF and ours alike. This is the count HF's own rule (``num_buckets=None``) starts from
(the paper's recommendation); that rule then factorizes counts above
2·max(sqrt(max_position_embeddings/C), C) into two factors, which flashkernels does not
implement, so the bench states the count rather than letting HF pick it.

Hashing identically: HF draws its rotations at every call as ``torch.manual_seed(
hash_seed); torch.randn((H, D, n_hashes, num_buckets/2), device, dtype)`` (SPECS.md); the
bench draws ours the same way, on the same device in float32, so the float32 layer and
ours use the same rotations. The correctness run checks that by recomputing HF's buckets
from its own qk and our rotations (``checks.rotations_match_hf``); it also records the
fraction of ours hashed in bf16 that agree with HF's float32 buckets (informational).
The bf16 HF layer draws its rotations in bf16 (HF's behaviour), so it hashes differently.

Correctness first: HF's float32 layer on the same (bf16-exact) x and weights is the
reference; ours runs with HF's buckets given (so both attend over the same chunks) and
its output (and, forward + backward, dx, dW_qk, dW_v) must be within a relative
Frobenius error of 2e-2. Without transformers (CI's dry run) HF's contenders record
"transformers not installed" and the reference is flashkernels' CPU path on float32
copies (float64 inside) with our own buckets. A failed check flags the row.
Timing: CUDA events through triton.testing.do_bench (median), contenders interleaved over
several rounds, the median of the rounds reported.
Peak memory: per contender, after its timings, torch.cuda.max_memory_allocated() over one
call (gradients cleared first, peak stats reset) minus the memory allocated just before
it, in MiB: what the call allocates above its inputs and weights (its output included).
results[name]["peak_mib"]; null on the CPU.
FLOPs: the attention 4·B·H·n_hashes·N·(chunks_before + chunks_after + 1)·C·D, plus the
two projections 2·2·B·N·hidden·H·D (hashing, sorting and the round combination are not
counted); forward + backward counted as 3x the forward. Dense SDPA's row counts its own
4·B·H·N²·D plus the same projections (3x for forward + backward).
The issue's goal (ANCHORS.md): at N = 16384, 4 hashes, forward, >= 20x HF's float32 layer
(5.36 ms measured there) with at most a quarter of its peak memory (1757 MiB measured);
that row carries it as `goal`, judged against HF measured in the same run.

Writes <out>/reformer.json and <out>/reformer.md.
usage: python3 benches/gpu_bench_reformer.py --out DIR [--rounds 3] [--quick]
       python3 benches/gpu_bench_reformer.py --dry-run --out DIR
--dry-run runs everything but the CUDA timing on the CPU with tiny shapes (N / 64, chunk
16, H 2, D 16; wall-clock medians, peak memory null): a check of this script without a GPU.
gpu_bench_all.py runs these cases in the GPU check's bench step (ops reformer_fwd,
reformer_train).
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
CONTENDERS = (OURS, "hf_lsh_fp32", "hf_lsh_bf16", "dense_sdpa")
HEADS, HEAD_DIM, CHUNK = 8, 64, 64
CHUNKS_BEFORE, CHUNKS_AFTER = 1, 0
HASH_SEED = 1234
CHECK_TOL = 2e-2
GOALS = {  # (N, n_hashes) -> the goal, forward (HF float32 figures measured there)
    (16384, 4): {
        "vs": "hf_lsh_fp32",
        "ratio": 20,
        "issue_peer_ms": 5.36,
        "memory_ratio_max": 0.25,
        "issue_peer_mib": 1757,
    },
}


def n_buckets_of(n, chunk):
    """2·N/C buckets (the paper's and HF's starting rule), the same for HF and ours."""
    return 2 * n // chunk


def flops(n, n_hashes, train, heads=HEADS, d=HEAD_DIM, chunk=CHUNK, batch=1):
    hidden = heads * d
    f = 4.0 * batch * heads * n_hashes * n * (CHUNKS_BEFORE + CHUNKS_AFTER + 1) * chunk * d
    f += 2 * 2.0 * batch * n * hidden * heads * d
    return 3 * f if train else f


def dense_flops(n, train, heads=HEADS, d=HEAD_DIM, batch=1):
    f = 4.0 * batch * heads * n * n * d + 2 * 2.0 * batch * n * heads * d * heads * d
    return 3 * f if train else f


class Ours(torch.nn.Module):
    """flashkernels: HF's two projections as torch nn.Linear, then lsh_attention; output
    (B, N, H·D) as HF's hidden_states."""

    def __init__(self, query_key, value, rotations, heads, chunk, n_buckets):
        super().__init__()
        self.query_key, self.value, self.rotations = query_key, value, rotations
        self.heads, self.chunk, self.n_buckets = heads, chunk, n_buckets

    def forward(self, x, buckets=None, return_buckets=False):
        b, n, _ = x.shape
        qk = self.query_key(x).view(b, n, self.heads, -1)
        v = self.value(x).view(b, n, self.heads, -1)
        out = flashkernels.lsh_attention(
            qk,
            v,
            self.rotations,
            chunk_length=self.chunk,
            chunks_before=CHUNKS_BEFORE,
            chunks_after=CHUNKS_AFTER,
            n_buckets=self.n_buckets,
            buckets=buckets,
            return_buckets=return_buckets,
        )
        if return_buckets:
            return out[0].reshape(b, n, -1), out[1]
        return out.reshape(b, n, -1)


class DenseSDPA(torch.nn.Module):
    """The same projections, then SDPA over all N keys with q = k = qk (for scale)."""

    def __init__(self, query_key, value, heads):
        super().__init__()
        self.query_key, self.value, self.heads = query_key, value, heads

    def forward(self, x):
        b, n, _ = x.shape
        qk = self.query_key(x).view(b, n, self.heads, -1).transpose(1, 2)
        v = self.value(x).view(b, n, self.heads, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(qk, qk, v).transpose(1, 2).reshape(b, n, -1)


class HF(torch.nn.Module):
    """Hugging Face's LSHSelfAttention, called as a training loop would: x -> hidden_states."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, buckets=None):
        return self.layer(x, buckets=buckets).hidden_states


def hf_layer(heads, d, chunk, n_hashes, n_buckets, w_qk, w_v, dtype):
    """LSHSelfAttention (eval, dropout 0) with the given projection weights, in dtype, on
    their device. ImportError "transformers not installed" without transformers."""
    try:
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention
    except ImportError as e:
        raise ImportError(f"transformers not installed ({e})") from None
    config = ReformerConfig(
        attn_layers=["lsh"],
        hidden_size=heads * d,
        num_attention_heads=heads,
        attention_head_size=d,
        lsh_attn_chunk_length=chunk,
        num_hashes=n_hashes,
        num_buckets=n_buckets,
        lsh_num_chunks_before=CHUNKS_BEFORE,
        lsh_num_chunks_after=CHUNKS_AFTER,
        is_decoder=False,
        hash_seed=HASH_SEED,
        lsh_attention_probs_dropout_prob=0.0,
    )
    try:
        layer = LSHSelfAttention(config, layer_idx=0)
    except TypeError:  # releases without layer_idx
        layer = LSHSelfAttention(config)
    layer = layer.to(device=w_qk.device, dtype=dtype).eval()
    with torch.no_grad():
        layer.query_key.weight.copy_(w_qk)
        layer.value.weight.copy_(w_v)
    return HF(layer)


def hf_buckets_from(qk, rotations, n_buckets):
    """HF's hashing of qk (B, N, H, D) with the given rotations, computed as HF does it
    (same einsum on the same layout): (B, H, n_hashes, N), offset per round."""
    b, n, h, d = qk.shape
    vectors = qk.reshape(b, n, h, d).transpose(1, 2)  # HF's _split_hidden_size_dim
    rotated = torch.einsum("bmtd,mdhr->bmhtr", vectors, rotations)
    buckets = torch.argmax(torch.cat([rotated, -rotated], dim=-1), dim=-1)
    offsets = (torch.arange(rotations.shape[2], device=qk.device) * n_buckets).view(1, 1, -1, 1)
    return buckets + offsets


def peak_mib(fn, reset, device):
    """MiB that one call of fn allocates at its peak above what was allocated just before
    it (inputs, weights excluded; gradients cleared by reset() first); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


def correctness(mods, ours, x, x32, dout, dout32, rot, train, errors):
    """(checks, errs): ours (with the reference's buckets) against HF's float32 layer, or,
    without it, our CPU path on float32 copies with our own buckets; errs lists the output's
    (and for train dx's, dW_qk's, dW_v's) relative errors. HF in bf16 on the same buckets
    is compared to HF in float32 for information (a failure removes it from mods)."""
    n, heads, d = x.shape[1], ours.heads, x.shape[2] // ours.heads

    def grads(m, inp):
        return [inp.grad, m.query_key.weight.grad, m.value.weight.grad]

    checks = {}
    with torch.no_grad():
        _, own_buckets = ours(x, return_buckets=True)
    if "hf_lsh_fp32" in mods:
        ref_name, hf32 = "hf_lsh_fp32", mods["hf_lsh_fp32"]
        with torch.set_grad_enabled(train):
            res = hf32.layer(x32)
        want_o, buckets = res.hidden_states, res.buckets
        with torch.no_grad():
            qk32 = hf32.layer.query_key(x32).view(1, n, heads, d)
            checks["rotations_match_hf"] = bool(torch.equal(hf_buckets_from(qk32, rot, ours.n_buckets), buckets))
            checks["hf_bucket_agreement"] = (own_buckets == buckets).double().mean().item()
        want = [want_o.detach()]
        if train:
            want_o.backward(dout32)
            want += grads(hf32.layer, x32)
    else:
        # Our own CPU path (float64 inside) on float32 copies, with the buckets we hashed.
        ref_name, buckets = "flashkernels_cpu_fp32", own_buckets
        xc = x.detach().float().cpu().requires_grad_(train)
        lins = [torch.nn.Linear(heads * d, heads * d, bias=False) for _ in range(2)]
        with torch.no_grad():
            for lin, src in zip(lins, (ours.query_key, ours.value)):
                lin.weight.copy_(src.weight)
        cpu = Ours(*lins, rot.cpu(), heads, ours.chunk, ours.n_buckets)
        with torch.set_grad_enabled(train):
            want_o = cpu(xc, buckets=buckets.cpu())
        want = [want_o.detach()]
        if train:
            want_o.backward(dout32.cpu())
            want += grads(cpu, xc)
    with torch.set_grad_enabled(train):
        got_o = ours(x, buckets=buckets)
    got = [got_o.detach()]
    if train:
        got_o.backward(dout)
        got += grads(ours, x)
    errs = [rel_err(g.to(w.device), w) for g, w in zip(got, want)]
    err = max(errs)
    checks[f"{OURS}_rel_err_vs_fp32"] = err
    checks["reference"] = ref_name
    if "hf_lsh_bf16" in mods and ref_name == "hf_lsh_fp32":
        try:
            with torch.no_grad():
                checks["hf_lsh_bf16_rel_err_vs_fp32"] = rel_err(mods["hf_lsh_bf16"](x, buckets=buckets), want[0])
        except Exception as e:  # HF in bf16 failing is recorded; the others still run
            errors["hf_lsh_bf16"] = f"{type(e).__name__}: {e}"[:200]
            del mods["hf_lsh_bf16"]
    checks["flagged"] = [] if err <= CHECK_TOL else [f"{OURS}_rel_err_vs_fp32"]
    if checks.get("rotations_match_hf") is False:
        checks["flagged"].append("rotations_match_hf")
    return checks, errs


def run_case(
    n,
    n_hashes,
    train,
    rounds,
    heads=HEADS,
    d=HEAD_DIM,
    chunk=CHUNK,
    device="cuda",
    timer=cuda_timer,
    goal_of=None,
):
    """One case: correctness of ours against HF's float32 layer first (our CPU path in
    float32 without transformers), then interleaved timings and each contender's peak
    memory. A row in the per-op bench schema (gpu_bench_all.normalize reads it). goal_of:
    the real (N, n_hashes) whose goal the row carries (the dry run's stand-in sizes)."""
    dtype = torch.bfloat16
    hidden = heads * d
    nb = n_buckets_of(n, chunk)
    gen = torch.Generator(device=device).manual_seed(n + 7 * n_hashes)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, dtype=torch.float32, generator=gen)).to(dtype)

    # bf16 weights and input: every contender holds the same values (HF fp32 their float32 copies).
    w_qk, w_v = (rnd(hidden, hidden, scale=1 / math.sqrt(hidden)) for _ in range(2))
    x = rnd(1, n, hidden).requires_grad_(train)
    dout = rnd(1, n, hidden)
    x32, dout32 = x.detach().float().requires_grad_(train), dout.float()
    torch.manual_seed(HASH_SEED)  # as HF draws them in its float32 layer (SPECS.md)
    rot = torch.randn((heads, d, n_hashes, nb // 2), device=device, dtype=torch.float32)

    def linear(w):
        lin = torch.nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin

    ours = Ours(linear(w_qk), linear(w_v), rot, heads, chunk, nb)
    mods = {OURS: ours, "dense_sdpa": DenseSDPA(ours.query_key, ours.value, heads)}
    errors = {}
    for name, dt in (("hf_lsh_fp32", torch.float32), ("hf_lsh_bf16", dtype)):
        try:
            mods[name] = hf_layer(heads, d, chunk, n_hashes, nb, w_qk, w_v, dt)
        except Exception as e:  # transformers missing or incompatible: recorded, the others run
            errors[name] = f"{type(e).__name__}: {e}"[:200]
    inputs = {name: (x32, dout32) if name == "hf_lsh_fp32" else (x, dout) for name in mods}

    def clear():
        for t in [x, x32] + [p for m in mods.values() for p in m.parameters()]:
            t.grad = None

    checks, errs = correctness(mods, ours, x, x32, dout, dout32, rot, train, errors)
    clear()

    def call(name):
        m, (inp, dy) = mods[name], inputs[name]
        if not train:
            return lambda: m(inp)

        def step():
            for t in [inp] + list(m.parameters()):
                t.grad = None
            m(inp).backward(dy)

        return step

    fns = {name: call(name) for name in CONTENDERS if name in mods}
    with torch.set_grad_enabled(train):
        times, terrors = timed(fns, rounds, timer)
        errors.update(terrors)
        peaks, peak_errors = {}, {}
        for name, fn in fns.items():
            if times[name] and name not in errors:
                try:
                    peaks[name] = peak_mib(fn, clear, device)
                except Exception as e:  # e.g. out of memory: the timing stands, no figure
                    peaks[name] = None
                    peak_errors[name] = f"{type(e).__name__}: {e}"[:200]
        clear()
    row = {
        "N": n,
        "n_hashes": n_hashes,
        "n_buckets": nb,
        "chunk_length": chunk,
        "chunks_before": CHUNKS_BEFORE,
        "chunks_after": CHUNKS_AFTER,
        "causal": False,
        "batch": 1,
        "heads": heads,
        "head_dim": d,
        "train": train,
        "dtype": "bfloat16",
        "rel_errs": errs,
        "checks": checks,
    }
    goal = GOALS.get(goal_of or (n, n_hashes))
    if goal and not train:
        row["goal"] = goal
    add_results(
        row,
        CONTENDERS,
        times,
        errors,
        lambda name: (
            dense_flops(n, train, heads, d) if name == "dense_sdpa" else flops(n, n_hashes, train, heads, d, chunk)
        ),
        OURS,
    )
    for name, r in row["results"].items():
        if "ms" in r:
            r["peak_mib"] = peaks.get(name)
            if name in peak_errors:
                r["note"] = f"peak memory: {peak_errors[name]}"
    return row


def goal_verdict(r):
    """'met' / 'NOT met' for a row's goal: the speed ratio against the peer measured in the
    same run and, where both peaks were measured, our peak at most memory_ratio_max of its."""
    g = r["goal"]
    peer, ours = r["results"][g["vs"]], r["results"][OURS]
    fast = peer.get("ours_speedup") is not None and peer["ours_speedup"] >= g["ratio"]
    if peer.get("peak_mib") is None or ours.get("peak_mib") is None:
        return f">= {g['ratio']}x {g['vs']}: {'met' if fast else 'NOT met'} (memory not measured)"
    small = ours["peak_mib"] <= g["memory_ratio_max"] * peer["peak_mib"]
    met = "met" if fast and small else "NOT met"
    return f">= {g['ratio']}x {g['vs']}, <= {g['memory_ratio_max']} of its memory: {met}"


def cases(quick=False):
    """(N, n_hashes, train): the goal cases first."""
    first = [(16384, 4, False), (16384, 4, True)]
    if quick:
        return first
    rest = [(n, h, t) for n in (4096, 16384, 65536) for h in (1, 4) for t in (False, True)]
    return first + [c for c in rest if c not in first]


def markdown(rows, meta):
    r0 = rows[0] if rows else {"heads": HEADS, "head_dim": HEAD_DIM, "chunk_length": CHUNK}
    lines = [
        f"# Reformer LSH attention layer, bf16, B1 H{r0['heads']} D{r0['head_dim']} chunk {r0['chunk_length']} "
        f"({CHUNKS_BEFORE} before, {CHUNKS_AFTER} after), 2N/C buckets — {meta['device']} — {meta['date']} — "
        f"commit {meta['commit']}",
        "",
        "Whole layer from the hidden states (qk and v projections + LSH attention, no output dense); "
        "time (median of interleaved rounds), x = peer time / ours (> 1: we are faster), peak memory above "
        "the inputs and weights. err: ours against the float32 reference on its buckets.",
        "",
        "| N | hashes | pass | flashkernels | HF fp32 | HF bf16 | dense SDPA | err | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for name in CONTENDERS:
            x = r["results"][name]
            if "ms" in x:
                ratio = f" (x{x['ours_speedup']:.2f})" if "ours_speedup" in x else ""
                mem = f", {x['peak_mib']:.0f} MiB" if x.get("peak_mib") is not None else ""
                cells.append(f"{x['ms']:.3f} ms{ratio}{mem}")
            else:
                cells.append(x["error"][:60])
        goal = goal_verdict(r) if "goal" in r else "-"
        err = r["checks"][f"{OURS}_rel_err_vs_fp32"]
        flag = " FLAGGED " + ",".join(r["checks"]["flagged"]) if r["checks"]["flagged"] else ""
        lines.append(
            f"| {r['N']} | {r['n_hashes']} | {'fwd+bwd' if r['train'] else 'fwd'} | "
            + " | ".join(cells)
            + f" | {err:.1e} vs {r['checks']['reference']}{flag} | {goal} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the goal cases only (N 16384, 4 hashes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no CUDA timing")
    args = ap.parse_args()
    if args.dry_run:
        kw = dict(heads=2, d=16, chunk=16, device="cpu", timer=wall_timer)
        shrink, device_name = (lambda n: n // 64), "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU (or --dry-run)")
        kw, shrink, device_name = {}, (lambda n: n), torch.cuda.get_device_name()
    meta = meta_of(device_name, args.dry_run)
    rows, failed = [], []
    for real_n, n_hashes, train in cases(args.quick):
        n = shrink(real_n)
        try:
            rows.append(run_case(n, n_hashes, train, args.rounds, goal_of=(real_n, n_hashes), **kw))
        except Exception as e:  # one broken case must not hide the others
            failed.append({"N": n, "n_hashes": n_hashes, "train": train, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"N {n} hashes {n_hashes} train={train}: FAILED {failed[-1]['error']}", flush=True)
            continue
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        r = rows[-1]
        print(
            f"N {n} hashes {n_hashes} {'fwd+bwd' if train else 'fwd'}: "
            + ", ".join(
                f"{name} {x.get('ms', math.nan):.3f} ms"
                + (f" {x['peak_mib']:.0f} MiB" if x.get("peak_mib") is not None else "")
                for name, x in r["results"].items()
            )
            + f", err {r['checks'][f'{OURS}_rel_err_vs_fp32']:.1e} vs {r['checks']['reference']}",
            flush=True,
        )
    write_outputs(args.out, "reformer", meta, rows, failed, markdown(rows, meta))
    return 1 if failed or any(r["checks"]["flagged"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
