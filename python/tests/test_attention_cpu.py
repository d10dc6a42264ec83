"""The CPU path (numpy and jax CPU arrays) against jax.nn.dot_product_attention, an
independent oracle, and LSE against a float64 numpy logsumexp."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashkernels as fk

# (batch, heads, seqlen_q, seqlen_k, head_dim): odd lengths, B1/H1, cross attention.
SHAPES = [
    (1, 1, 1, 1, 8),
    (2, 3, 7, 7, 16),
    (1, 2, 33, 65, 32),
    (2, 1, 65, 33, 64),
    (1, 4, 7, 33, 16),
    (1, 1, 65, 65, 128),
]

TOL = {np.float32: 1e-5, np.float16: 1e-2}


@pytest.fixture(autouse=True)
def jax_on_cpu_at_full_precision():
    """Keep jax (oracle and jax inputs) on the CPU in float32 even where it has a GPU:
    there it would run on the GPU, with reduced-precision matmuls."""
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        yield


def jax_attention(q, k, v, *, causal, scale, mask_fn):
    """jax's attention in float32 on (B, N, H, D) arrays. jax aligns is_causal top-left,
    so causal masking is passed as an explicit bottom-right mask (what flashkernels does).
    Rows that see no key are meaningless to jax; callers compare only the others."""
    q, k, v = (jnp.asarray(np.asarray(x, dtype=np.float32)) for x in (q, k, v))
    mask = None
    if causal:
        mask = jnp.asarray(mask_fn(q.shape[1], k.shape[1]))[None, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    return np.asarray(out, dtype=np.float32)


def visible_rows(nq, nk, causal):
    """Query rows that see at least one key."""
    rows = np.arange(nq)
    return rows[rows + nk - nq >= 0] if causal else rows


def check(out, lse, q, k, v, *, causal, scale, tol, mask_fn, reference):
    """out (B, Nq, H, D), lse (B, H, Nq) vs jax (O) and numpy float64 (LSE)."""
    nq, nk = q.shape[1], k.shape[1]
    rows = visible_rows(nq, nk, causal)
    want = jax_attention(q, k, v, causal=causal, scale=scale, mask_fn=mask_fn)
    got = np.asarray(out, dtype=np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:, rows], want[:, rows], rtol=tol, atol=tol)
    _, want_lse = reference(q, k, v, causal=causal, scale=scale)
    np.testing.assert_allclose(lse[:, :, rows], want_lse[:, :, rows], rtol=tol, atol=tol)
    # Rows with no visible key: O = 0 and LSE = -inf.
    hidden = np.setdiff1d(np.arange(nq), rows)
    assert (got[:, hidden] == 0).all()
    assert np.isneginf(lse[:, :, hidden]).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_flash_layout(shape, causal, dtype, randn, causal_mask, reference):
    b, h, nq, nk, d = shape
    q, k, v = randn(b, nq, h, d, dtype=dtype), randn(b, nk, h, d, dtype=dtype), randn(b, nk, h, d, dtype=dtype)
    out, lse = fk.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == (b, nq, h, d)
    assert lse.dtype == np.float32 and lse.shape == (b, h, nq)
    check(out, lse, q, k, v, causal=causal, scale=None, tol=TOL[dtype], mask_fn=causal_mask, reference=reference)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_layout(shape, causal, randn, causal_mask, reference):
    b, h, nq, nk, d = shape
    q, k, v = randn(b, h, nq, d), randn(b, h, nk, d), randn(b, h, nk, d)
    out, lse = fk.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
    assert out.shape == (b, h, nq, d) and lse.shape == (b, h, nq)
    # Memory is (B, Nq, H, D), as torch's flash backend returns it.
    assert out.swapaxes(1, 2).flags.c_contiguous
    t = lambda x: x.swapaxes(1, 2)  # noqa: E731
    check(t(out), lse, t(q), t(k), t(v), causal=causal, scale=None, tol=1e-5, mask_fn=causal_mask, reference=reference)


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_explicit_scale(scale, randn, causal_mask, reference):
    q, k, v = randn(2, 9, 2, 16), randn(2, 13, 2, 16), randn(2, 13, 2, 16)
    out, lse = fk.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, return_lse=True)
    check(out, lse, q, k, v, causal=True, scale=scale, tol=1e-5, mask_fn=causal_mask, reference=reference)
    out2 = fk.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), is_causal=True, scale=scale)
    np.testing.assert_array_equal(out2.swapaxes(1, 2), out)


def test_positional_arguments_match_torch_and_flash_attn(randn):
    q, k, v = randn(1, 2, 5, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8)
    # torch: (query, key, value, attn_mask, dropout_p, is_causal, scale)
    a = fk.scaled_dot_product_attention(q, k, v, None, 0.0, True, 0.3)
    b = fk.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    np.testing.assert_array_equal(a, b)
    # flash-attn: (q, k, v, dropout_p, softmax_scale, causal)
    t = [x.swapaxes(1, 2) for x in (q, k, v)]
    c = fk.flash_attn_func(*t, 0.0, 0.3, True)
    np.testing.assert_array_equal(c, a.swapaxes(1, 2))


def test_non_contiguous_inputs(randn, causal_mask, reference):
    b, h, nq, nk, d = 2, 3, 33, 17, 16
    # Transposed views: (B, N, H, D) seen through (B, H, N, D) storage.
    q = randn(b, h, nq, d).swapaxes(1, 2)
    # A slice of a wider head dim: rows of stride 2*d.
    k = randn(b, nk, h, 2 * d)[..., :d]
    # A broadcast along batch (stride 0, read-only).
    v = np.broadcast_to(randn(1, nk, h, d), (b, nk, h, d))
    assert not q.flags.c_contiguous and not k.flags.c_contiguous and not v.flags.writeable
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    check(out, lse, q, k, v, causal=True, scale=None, tol=1e-5, mask_fn=causal_mask, reference=reference)
    dense = [np.ascontiguousarray(x) for x in (q, k, v)]
    np.testing.assert_array_equal(fk.flash_attn_func(*dense, causal=True), out)


def test_bfloat16_numpy(randn, causal_mask, reference):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    q, k, v = (randn(2, n, 2, 32).astype(bf16) for n in (7, 33, 33))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert out.dtype == bf16
    check(out, lse, q, k, v, causal=True, scale=None, tol=2e-2, mask_fn=causal_mask, reference=reference)


def test_jax_cpu_arrays(randn, causal_mask, reference):
    q, k, v = (jnp.asarray(randn(1, n, 2, 16)) for n in (7, 9, 9))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    assert out.devices() == q.devices()
    check(np.asarray(out), np.asarray(lse), q, k, v, causal=True, scale=None, tol=1e-5, mask_fn=causal_mask, reference=reference)
    out_t = fk.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), is_causal=True)
    assert isinstance(out_t, jax.Array)
    np.testing.assert_array_equal(np.asarray(out_t.swapaxes(1, 2)), np.asarray(out))


def test_causal_matches_top_left_when_square(randn):
    """For Nq == Nk bottom-right and top-left alignment coincide: jax's own is_causal."""
    q, k, v = randn(2, 17, 2, 16), randn(2, 17, 2, 16), randn(2, 17, 2, 16)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(fk.flash_attn_func(q, k, v, causal=True), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_inputs_untouched_and_released(randn):
    """Inputs are read, not written, and every DLPack capsule is handed back (the producer's
    deleter runs: numpy's reference to the array is dropped), on success and on error."""
    q, k, v = randn(1, 5, 2, 8), randn(1, 5, 2, 8), randn(1, 5, 2, 8)
    copies = [x.copy() for x in (q, k, v)]
    before = [sys.getrefcount(x) for x in (q, k, v)]
    for _ in range(3):
        fk.flash_attn_func(q, k, v, causal=True)
        with pytest.raises(ValueError):
            fk.flash_attn_func(q, k, v[:, :3])
    assert [sys.getrefcount(x) for x in (q, k, v)] == before
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)


def test_cuda_available_is_bool():
    assert isinstance(fk.cuda_available(), bool)
