"""Error bounds for half-precision outputs, derived from what the CPU path does: it reads
the stored f16/bf16 inputs exactly, computes in f32, and rounds each output once, to
nearest. So against a float64 oracle on the same stored inputs every element must lie
within half a spacing of the dtype at the exact value (one rounding), plus a small slack
for f32 accumulation. That bound is tight enough to catch a one-ulp-class bug, e.g.
rounding by truncation (errors spread over [0, 1) ulp), which a 2e-2 relative bound
cannot see."""

import numpy as np

# Explicit mantissa bits and smallest normal exponent of each storage dtype.
_FORMAT = {"float16": (10, -14), "bfloat16": (7, -126), "float32": (23, -126)}


def _name(dtype):
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def spacing(x, dtype):
    """The dtype's distance between neighbours at |x| (its ulp there), as float64."""
    mant, min_exp = _FORMAT[_name(dtype)]
    mag = np.maximum(np.abs(np.asarray(x, np.float64)), 2.0**min_exp)
    return 2.0 ** (np.floor(np.log2(mag)) - mant)


def assert_one_rounding(got, want, dtype, *, what="", acc=1e-5):
    """got (stored in `dtype`) vs want (float64, the exact op on the same stored inputs):
    |got - want| <= spacing(want) / 2 + acc * max |want| for every element, where acc is
    the f32 accumulation slack relative to the output's scale."""
    got = np.asarray(np.asarray(got).astype(np.float32), np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    bound = spacing(want, dtype) / 2 + acc * max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements beyond one rounding to {_name(dtype)}; "
            f"worst at {i}: got {got[i]!r}, want {want[i]!r}, |err| {err[i]:.3e} > {bound[i]:.3e}"
        )


def numpy_attention_grads(q, k, v, out, dout, mask, scale=None):
    """(dq, dk, dv) in float64 of attention on (B, N, H, D) inputs (k, v may have fewer
    heads), the way a FlashAttention backward defines them from the given forward output:
    Delta = rowsum(dO * out) with `out` as stored, dS = P * (dO V^T - Delta). `mask`:
    (Nq, Nk) bool. Rows without a visible key contribute nothing."""
    q, k, v, out, dout = (np.asarray(np.asarray(x).astype(np.float32), np.float64) for x in (q, k, v, out, dout))
    group = q.shape[2] // k.shape[2]
    ke, ve = (np.repeat(x, group, axis=2) for x in (k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.where(mask, np.einsum("bqhd,bkhd->bhqk", q, ke) * scale, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    p = np.where(denom > 0, p / np.where(denom > 0, denom, 1.0), 0.0)
    delta = np.einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    ds = p * (np.einsum("bqhd,bkhd->bhqk", dout, ve) - delta)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout)
    b, nk, hkv, d = k.shape
    dk, dv = (x.reshape(b, nk, hkv, group, d).sum(axis=3) for x in (dk, dv))
    return dq, dk, dv
