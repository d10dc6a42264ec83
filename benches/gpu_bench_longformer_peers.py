"""The peers and shared helpers of benches/gpu_bench_longformer.py (see its docstring):
device and timing helpers (the device the bench runs on is set by its main()), the
attention rule as masks for FlexAttention and SDPA, a mock of our op for --smoke
--mock-ours, and Hugging Face's LongformerSelfAttention layer."""

import statistics
import time

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16

# Set by main(): device and whether FlexAttention is compiled.
DEV = "cuda"
COMPILE = True
_FLEX = None


def log(msg):
    print(msg, flush=True)


def rel_err(got, want):
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


def randn(*shape, seed, dtype=BF16, requires_grad=False):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(*shape, device=DEV, dtype=dtype, generator=gen)
    return x.requires_grad_(requires_grad)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free():
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench(fn):
    """Median ms of fn: CUDA events (do_bench) on the GPU, host clock in smoke mode."""
    if DEV == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def timed(fns, rounds):
    """Median-of-rounds times (ms), contenders interleaved; failures recorded as text."""
    times = {name: [] for name in fns}
    errors = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times[name].append(bench(fn))
            except Exception as e:  # a contender may not run this case: record why
                errors[name] = f"{type(e).__name__}: {e}"[:300]
                free()
    return times, errors


# ---------------------------------------------------------------- semantics


def global_positions(n, n_global, layout):
    if n_global == 0:
        return []
    if layout == "prefix":
        return list(range(n_global))
    step = n // n_global  # "spread": evenly spaced, off the block edges
    return [g * step + step // 2 for g in range(n_global)]


def allowed_pairs(n, w, glob=()):
    """Exact count of allowed (query, key) pairs for one (batch, head)."""
    i = torch.arange(n, dtype=torch.int64)
    lo, hi = (i - w).clamp(min=0), (i + w).clamp(max=n - 1)
    cnt = hi - lo + 1
    if len(glob):
        g = torch.tensor(sorted(set(glob)), dtype=torch.int64)
        inside = torch.searchsorted(g, hi, right=True) - torch.searchsorted(g, lo)
        cnt = cnt + len(g) - inside
        cnt[g] = n
    return int(cnt.sum())


def dense_mask(n, w, is_global=None, rows=None):
    """(N, N) bool, True = allowed (rows: optional slice of query rows). Filled in row
    chunks so that building it costs little beyond the N x N bytes of the mask itself."""
    j = torch.arange(n, device=DEV, dtype=torch.int32)
    qi = j if rows is None else j[rows]
    m = torch.empty(len(qi), n, dtype=torch.bool, device=DEV)
    step = max(1, (1 << 26) // n)
    for r0 in range(0, len(qi), step):
        qc = qi[r0 : r0 + step, None]
        blk = m[r0 : r0 + step]
        torch.ge(j[None, :], qc - w, out=blk)
        blk &= j[None, :] <= qc + w
        if is_global is not None:
            blk |= is_global[None, :]
            blk |= is_global[qc]
    return m


def flex_fn():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention) if COMPILE else flex_attention
    return _FLEX


_MASK_MODS = {}


def mask_mod_for(w, is_global_bn):
    """One mask_mod object per rule (a new function object would make torch.compile
    recompile); the global rule reads a persistent (B, N) buffer, refilled per case."""
    if is_global_bn is None:
        key = ("window", w)
        if key not in _MASK_MODS:

            def window_mod(b_, h_, qi, kj):
                return (qi - kj).abs() <= w

            _MASK_MODS[key] = (window_mod, None)
        return _MASK_MODS[key][0]
    key = ("global", w, tuple(is_global_bn.shape))
    if key not in _MASK_MODS:
        isg = torch.zeros_like(is_global_bn)

        def global_mod(b_, h_, qi, kj):
            return ((qi - kj).abs() <= w) | isg[b_, qi] | isg[b_, kj]

        _MASK_MODS[key] = (global_mod, isg)
    mod, isg = _MASK_MODS[key]
    isg.copy_(is_global_bn)
    return mod


def flex_block_mask(b, n, w, is_global_bn=None):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = mask_mod_for(w, is_global_bn)
    bb = None if is_global_bn is None else b
    if COMPILE:
        try:  # compiled mask creation does not materialize N x N (needed at 256k)
            return create_block_mask(mask_mod, bb, None, n, n, device=DEV, _compile=True)
        except Exception as e:  # noqa: BLE001
            log(f"create_block_mask(_compile=True) failed ({type(e).__name__}: {e}); eager")
    return create_block_mask(mask_mod, bb, None, n, n, device=DEV)


def sdpa_call(qt, kt, vt, mask):
    if DEV == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)


def sdpa_mask_fits(n):
    """The bool mask plus the bf16 bias SDPA makes of it (+ slack) must fit."""
    need = n * n * (1 + 2) * 1.2
    if DEV != "cuda":
        return True, need
    free_b, _ = torch.cuda.mem_get_info()
    return need < 0.9 * free_b, need


def mock_longformer_attention(q, k, v, window, *, global_tokens=None, **_):
    """--smoke --mock-ours only: a dense stand-in with the API's signature, so the script's
    handling of our op (layouts, checks, ratios) is exercised on the CPU."""
    b, n, h, d = q.shape
    outs = []
    for bi in range(b):
        isg = None
        if global_tokens is not None:
            # The API takes per-sequence index lists; the mask wants a bool per token.
            isg = torch.zeros(n, dtype=torch.bool, device=DEV)
            isg[torch.as_tensor(global_tokens[bi], dtype=torch.long, device=DEV)] = True
        m = dense_mask(n, window, isg)
        o = F.scaled_dot_product_attention(*(x[bi : bi + 1].transpose(1, 2).float() for x in (q, k, v)), attn_mask=m)
        outs.append(o.transpose(1, 2).to(q.dtype))
    return torch.cat(outs)


def hf_semantics_check(shape):
    """Smoke only: HF's layer with its global projections set to the local ones must equal
    dense masked attention with the rule the peers use (window | global rows | global cols)."""
    b, n, h, d, w = (shape[k] for k in ("B", "N", "H", "D", "w"))
    glob = global_positions(n, shape["n_global"], "spread")
    layer = hf_layer(h, d, w, torch.float64)
    with torch.no_grad():
        for loc, g in (("query", "query_global"), ("key", "key_global"), ("value", "value_global")):
            getattr(layer, g).load_state_dict(getattr(layer, loc).state_dict())
        x = randn(b, n, h * d, seed=5, dtype=torch.float64)
        m = torch.zeros(b, n, device=DEV)
        m[:, glob] = 10000.0
        got = layer(x, attention_mask=m, is_index_masked=m < 0, is_index_global_attn=m > 0, is_global_attn=True)[0]
        q, k, v = (getattr(layer, p)(x).view(b, n, h, d).transpose(1, 2) for p in ("query", "key", "value"))
        isg = torch.zeros(n, dtype=torch.bool, device=DEV)
        isg[glob] = True
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(n, w, isg))
        err = rel_err(got, want.transpose(1, 2).reshape(b, n, h * d))
    log(f"smoke: HF layer (global proj = local proj, float64) vs dense mask rule: rel err {err:.1e}")
    assert err < 1e-6, err


# ---------------------------------------------------------------- HF layer


_HF_DTYPE = {}


def hf_layer(h, d, w, dtype):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    cfg = LongformerConfig(
        hidden_size=h * d,
        num_attention_heads=h,
        attention_window=[2 * w],
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return LongformerSelfAttention(cfg, layer_id=0).eval().to(device=DEV, dtype=dtype)


def hf_runner(b, n, h, d, w, glob, train, seed):
    """Returns (fn, dtype name): fn runs the layer (fwd, or fwd + bwd)."""
    m = torch.zeros(b, n, device=DEV)
    if glob:
        m[:, glob] = 10000.0
    kw = dict(attention_mask=m, is_index_masked=m < 0, is_index_global_attn=m > 0, is_global_attn=bool((m > 0).any()))
    last = None
    order = (BF16, torch.float32) if _HF_DTYPE.get("dtype", BF16) == BF16 else (torch.float32,)
    for dtype in order:  # bf16 when the layer runs in it, else fp32 (recorded in the row)
        try:
            layer = hf_layer(h, d, w, dtype)
            x = randn(b, n, h * d, seed=seed, dtype=dtype, requires_grad=train)
            dout = randn(b, n, h * d, seed=seed + 1, dtype=dtype)

            def fwd(layer=layer, x=x):
                r = layer(x, **kw)
                return r[0] if isinstance(r, (tuple, list)) else r

            if train:

                def fn(fwd=fwd, x=x, layer=layer, dout=dout):
                    x.grad = None
                    layer.zero_grad(set_to_none=True)
                    fwd().backward(dout)
            else:

                def fn(fwd=fwd):
                    with torch.no_grad():
                        return fwd()

            fn()
            sync()
            _HF_DTYPE["dtype"] = dtype
            return fn, str(dtype).replace("torch.", "")
        except Exception as e:  # noqa: BLE001
            last = f"{type(e).__name__}: {e}"[:300]
            log(f"HF layer in {dtype}: {last}")
            free()
    raise RuntimeError(f"HF layer failed: {last}")
