"""The CPU reference backward (through the functional ``attention_backward``) against
jax.vjp of jax.nn.dot_product_attention in float32, an independent oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashkernels as fk
from _rounding import assert_one_rounding, numpy_attention_grads
from conftest import attention_mask, pad_varlen, unpad_varlen, varlen_mask


@pytest.fixture(autouse=True)
def jax_on_cpu_at_full_precision():
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        yield


@functools.partial(jax.jit, static_argnames="scale")
def _jax_vjp(q, k, v, dout, mask, scale):
    _, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale), q, k, v)
    return vjp(dout)


def jax_grads(q, k, v, dout, mask, scale=None):
    """(dq, dk, dv) of jax's attention ((B, N, H, D), k/v may have fewer heads) for the
    cotangent dout, in float32. `mask`: (Nq, Nk) or per-batch (B, Nq, Nk) bool."""
    q, k, v, dout = (jnp.asarray(np.asarray(x, dtype=np.float32)) for x in (q, k, v, dout))
    mask = np.asarray(mask)
    mask = mask[None, None] if mask.ndim == 2 else mask[:, None]
    return tuple(np.asarray(g) for g in _jax_vjp(q, k, v, dout, jnp.asarray(mask), scale))


def assert_grads_close(got, want, rtol=1e-4):
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g = np.asarray(g, dtype=np.float32)
        assert g.shape == w.shape, name
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(np.abs(w).max(), 1e-3), err_msg=name)


def run_case(randn, *, b, h, hkv, nq, nk, d, causal=False, window=(-1, -1), scale=None):
    q, k, v = randn(b, nq, h, d), randn(b, nk, hkv, d), randn(b, nk, hkv, d)
    out, lse = fk.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window, return_lse=True)
    dout = randn(b, nq, h, d)
    mask = attention_mask(nq, nk, causal=causal, window=window)
    # Rows that see no key: flashkernels' gradient is 0; jax's attention averages over
    # every key there. With dO = 0 on those rows jax's gradient is 0 too.
    rows = mask.any(axis=1)
    dout[:, ~rows] = 0
    grads = fk.attention_backward(q, k, v, out, lse, dout, causal=causal, softmax_scale=scale, window_size=window)
    for g, x in zip(grads, (q, k, v)):
        assert isinstance(g, np.ndarray) and g.dtype == x.dtype and g.shape == x.shape and g.flags.c_contiguous
    assert_grads_close(grads, jax_grads(q, k, v, dout, mask, scale))
    assert (grads[0][:, ~rows] == 0).all()
    return q, k, v, out, lse, dout, grads


CASES = {
    "plain": dict(b=2, h=3, hkv=3, nq=9, nk=9, d=16),
    "causal": dict(b=2, h=3, hkv=3, nq=9, nk=9, d=16, causal=True),
    "gqa": dict(b=1, h=6, hkv=2, nq=11, nk=11, d=16),
    "mqa_causal": dict(b=1, h=4, hkv=1, nq=11, nk=11, d=16, causal=True),
    "window": dict(b=1, h=2, hkv=2, nq=17, nk=17, d=16, window=(2, 1)),
    "window_causal": dict(b=1, h=2, hkv=1, nq=17, nk=17, d=16, causal=True, window=(3, -1)),
    "nq_lt_nk_causal": dict(b=2, h=2, hkv=2, nq=7, nk=13, d=8, causal=True),
    "nq_gt_nk_causal": dict(b=1, h=2, hkv=2, nq=13, nk=7, d=8, causal=True),
    "nq_gt_nk_window": dict(b=1, h=2, hkv=1, nq=13, nk=7, d=8, window=(1, 2)),
    "odd": dict(b=1, h=1, hkv=1, nq=1, nk=5, d=24),
    "odd_causal": dict(b=3, h=1, hkv=1, nq=5, nk=3, d=8, causal=True),
    "scale": dict(b=1, h=2, hkv=2, nq=9, nk=9, d=32, scale=0.7),
    "head_dim_64": dict(b=1, h=2, hkv=1, nq=9, nk=10, d=64, causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backward_vs_jax(case, randn):
    run_case(randn, **CASES[case])


def test_backward_is_deterministic(randn):
    q, k, v, out, lse, dout, grads = run_case(randn, b=1, h=4, hkv=2, nq=17, nk=17, d=16, causal=True)
    for _ in range(2):
        again = fk.attention_backward(q, k, v, out, lse, dout, causal=True)
        for a, b in zip(again, grads):
            np.testing.assert_array_equal(a, b)


def test_backward_gqa_is_the_sum_over_the_group(randn):
    """dK, dV of shared K/V heads = the sum of the gradients of the repeated heads."""
    q, k, v = randn(1, 9, 6, 16), randn(1, 9, 2, 16), randn(1, 9, 2, 16)
    dout = randn(1, 9, 6, 16)
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = fk.attention_backward(q, k, v, out, lse, dout, causal=True)
    kr, vr = (np.repeat(x, 3, axis=2) for x in (k, v))
    out_r, lse_r = fk.flash_attn_func(q, kr, vr, causal=True, return_lse=True)
    dq_r, dk_r, dv_r = fk.attention_backward(q, kr, vr, out_r, lse_r, dout, causal=True)
    np.testing.assert_allclose(dq, dq_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, dk_r.reshape(1, 9, 2, 3, 16).sum(axis=3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dv, dv_r.reshape(1, 9, 2, 3, 16).sum(axis=3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (1, 2)])
def test_backward_varlen(causal, window, randn):
    """Each packed sequence's gradients against jax on that sequence alone (sequences of
    length 0 and 1, queries without keys); GQA."""
    lens_q, lens_k = [3, 0, 1, 6, 4, 2], [4, 2, 0, 6, 7, 1]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    h, hkv, d = 4, 2, 16
    q = randn(int(cu_q[-1]), h, d)
    k, v = randn(int(cu_k[-1]), hkv, d), randn(int(cu_k[-1]), hkv, d)
    dout = randn(*q.shape)
    out, lse = fk.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window, return_lse=True
    )
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        rows = attention_mask(nq, nk, causal=causal, window=window).any(axis=1)
        dout[cu_q[b] : cu_q[b + 1]][~rows] = 0
    dq, dk, dv = fk.attention_backward(
        q, k, v, out, lse, dout, causal=causal, window_size=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    # jax on the zero-padded batch, each sequence masked to its own (bottom-right) mask:
    # padding keys are invisible, padding queries get dO = 0.
    mask = varlen_mask(lens_q, lens_k, causal=causal, window=window)
    padded = [pad_varlen(x, cu) for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k), (dout, cu_q))]
    want = jax_grads(*padded, mask)
    want = (unpad_varlen(want[0], cu_q), unpad_varlen(want[1], cu_k), unpad_varlen(want[2], cu_k))
    assert_grads_close((dq, dk, dv), want)
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        if nq == 0 or nk == 0:
            # Nothing attends: zero gradients.
            rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            assert (dq[rq] == 0).all() and (dk[rk] == 0).all() and (dv[rk] == 0).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_half_precision(dtype, randn):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    q, k, v, dout = (randn(1, 9, 2, 16).astype(dtype) for _ in range(4))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    grads = fk.attention_backward(q, k, v, out, lse, dout, causal=True)
    mask = attention_mask(9, 9, causal=True)
    want = jax_grads(q, k, v, dout, mask)
    for g in grads:
        assert g.dtype == np.dtype(dtype)
    assert_grads_close(grads, want, rtol=3e-2)
    # Per element, one rounding of each gradient from f32, against float64 gradients that
    # take Delta from the stored (rounded) forward output as the backward does.
    exact = numpy_attention_grads(q, k, v, out, dout, mask)
    for name, g, w in zip(("dq", "dk", "dv"), grads, exact):
        assert_one_rounding(g, w, dtype, what=name)


def test_backward_jax_arrays(randn):
    q, k, v, dout = (jnp.asarray(randn(1, 7, 2, 8)) for _ in range(4))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    grads = fk.attention_backward(q, k, v, out, lse, dout, causal=True)
    assert all(isinstance(g, jax.Array) for g in grads)
    assert_grads_close(grads, jax_grads(q, k, v, dout, attention_mask(7, 7, causal=True)))


def test_backward_strided_inputs(randn):
    """Views (transposed, sliced, broadcast dO with zero strides) give the same gradients
    as contiguous copies."""
    q = randn(1, 2, 9, 16).swapaxes(1, 2)
    k = randn(1, 9, 2, 32)[..., :16]
    v = randn(1, 9, 2, 16)
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    dout = np.broadcast_to(randn(1, 1, 1, 16), out.shape)
    got = fk.attention_backward(q, k, v, out, lse, dout, causal=True)
    dense = [np.ascontiguousarray(x) for x in (q, k, v, out, lse, dout)]
    want = fk.attention_backward(*dense, causal=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_native_backward_heads_first(randn):
    """The (B, H, N, D) layout of the native backward (what torch's SDPA layout uses):
    gradients come back as (B, H, N, D) views of (B, N, H, D) memory."""
    q, k, v, dout = (randn(2, 9, 3, 16) for _ in range(4))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    want = fk.attention_backward(q, k, v, out, lse, dout, causal=True)
    t = lambda x: x.swapaxes(1, 2)  # noqa: E731
    got = fk._attention._backward(
        (t(q), t(k), t(v), t(out), lse, t(dout)),
        heads_first=True,
        causal=True,
        scale=None,
        window=(None, None),
        offsets=None,
    )
    for g, w in zip(got, want):
        assert g.shape == t(w).shape and t(g).flags.c_contiguous
        np.testing.assert_array_equal(t(g), w)
