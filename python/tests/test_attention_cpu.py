"""The CPU path (numpy and jax CPU arrays) against jax.nn.dot_product_attention, an
independent oracle, and LSE against a float64 numpy logsumexp."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashkernels as fk
from _rounding import assert_one_rounding
from conftest import pad_varlen, unpad_varlen
from conftest import varlen_mask as window_mask_varlen

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
    out = _jax_attention_jit(q, k, v, mask, scale=scale)
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
    want64, want_lse = reference(q, k, v, causal=causal, scale=scale)
    np.testing.assert_allclose(lse[:, :, rows], want_lse[:, :, rows], rtol=tol, atol=tol)
    if np.dtype(out.dtype).itemsize == 2:
        # f16 / bf16: O is rounded once from f32; hold it to that, per element.
        assert_one_rounding(np.asarray(out)[:, rows], want64[:, rows], out.dtype, what="O")
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
    check(
        np.asarray(out),
        np.asarray(lse),
        q,
        k,
        v,
        causal=True,
        scale=None,
        tol=1e-5,
        mask_fn=causal_mask,
        reference=reference,
    )
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


def test_importing_flashkernels_does_not_import_torch():
    """numpy / jax users never pay torch's import (checked in a fresh interpreter)."""
    import subprocess

    code = "import sys, flashkernels; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- grouped-query attention, sliding windows, variable-length batches


def jax_masked(q, k, v, mask, *, scale=None, window=None, causal=False):
    """jax.nn.dot_product_attention in float32 on (B, N, H, D) arrays; k, v may have
    fewer heads (jax's own GQA). `mask`: (Nq, Nk) bool, one broadcastable to
    (B, H, Nq, Nk), or None."""
    q, k, v = (jnp.asarray(np.asarray(x, dtype=np.float32)) for x in (q, k, v))
    m = None if mask is None else jnp.asarray(mask if np.ndim(mask) == 4 else mask[None, None])
    out = _jax_attention_jit(q, k, v, m, scale=scale, is_causal=causal, local_window_size=window)
    return np.asarray(out, dtype=np.float32)


# One XLA compilation per shape, instead of one per operation and shape.
_jax_attention_jit = jax.jit(
    lambda q, k, v, mask, **kw: jax.nn.dot_product_attention(q, k, v, mask=mask, **kw),
    static_argnames=("scale", "is_causal", "local_window_size"),
)


def check_masked(out, lse, q, k, v, mask, *, tol, reference, causal=False, window=(None, None), scale=None):
    """out vs jax (with `mask`) on rows that see a key, LSE vs float64 numpy, and the
    convention for rows that see none: O = 0, LSE = -inf."""
    out = np.asarray(out, dtype=np.float32)
    lse = np.asarray(lse)
    rows = mask.any(axis=1)
    want = jax_masked(q, k, v, mask, scale=scale)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:, rows], want[:, rows], rtol=tol, atol=tol)
    _, want_lse = reference(q, k, v, causal=causal, window=window, scale=scale)
    np.testing.assert_allclose(lse[:, :, rows], want_lse[:, :, rows], rtol=tol, atol=tol)
    assert (out[:, ~rows] == 0).all()
    assert np.isneginf(lse[:, :, ~rows]).all()


@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("heads_kv", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(ratio, heads_kv, causal, randn, window_mask, reference):
    """K/V with fewer heads, against jax's own GQA (query head h reads kv head h // ratio)."""
    b, nq, nk, d = 2, 9, 13, 16
    h = heads_kv * ratio
    q, k, v = randn(b, nq, h, d), randn(b, nk, heads_kv, d), randn(b, nk, heads_kv, d)
    out, lse = fk.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (b, nq, h, d) and lse.shape == (b, h, nq)
    check_masked(out, lse, q, k, v, window_mask(nq, nk, causal=causal), tol=1e-5, reference=reference, causal=causal)
    # torch's layout needs enable_gqa=True, and gives the same numbers.
    t = lambda x: x.swapaxes(1, 2)  # noqa: E731
    out_t = fk.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=causal, enable_gqa=True)
    np.testing.assert_array_equal(t(out_t), out)
    # The same as repeating K/V heads.
    rep = [np.repeat(x, ratio, axis=2) for x in (k, v)]
    np.testing.assert_allclose(fk.flash_attn_func(q, *rep, causal=causal), out, rtol=1e-6, atol=1e-6)


WINDOWS = [(0, 0), (2, 0), (0, 3), (3, 5), (-1, 2), (4, -1), (100, 100)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(17, 17), (9, 21), (21, 9)])
def test_sliding_window(window, causal, lengths, randn, window_mask, reference):
    """Windows (bottom-right aligned, inclusive, -1 unbounded), alone and with causal,
    against jax with the explicit mask; rows that see no key (Nq > Nk) give O = 0."""
    nq, nk = lengths
    q, k, v = randn(2, nq, 2, 16), randn(2, nk, 2, 16), randn(2, nk, 2, 16)
    out, lse = fk.flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True)
    mask = window_mask(nq, nk, causal=causal, window=window)
    check_masked(out, lse, q, k, v, mask, tol=1e-5, reference=reference, causal=causal, window=window)


@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 2), (0, 5), (16, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_window_matches_jax_local_window(window, causal, randn):
    """For Nq == Nk, jax's local_window_size=(left, right) (query i sees keys
    i - left ..= i + right) is the same rule: compare without building a mask."""
    q, k, v = randn(2, 17, 3, 16), randn(2, 17, 3, 16), randn(2, 17, 3, 16)
    out = fk.flash_attn_func(q, k, v, causal=causal, window_size=window)
    want = jax_masked(q, k, v, None, window=window, causal=causal)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_window_wider_than_sequence_is_no_window(randn):
    q, k, v = randn(1, 7, 2, 8), randn(1, 11, 2, 8), randn(1, 11, 2, 8)
    for causal in (False, True):
        plain = fk.flash_attn_func(q, k, v, causal=causal)
        for window in [(11, 11), (1000, 1000), (10**12, 10**12), (-1, 10**12)]:
            np.testing.assert_array_equal(fk.flash_attn_func(q, k, v, causal=causal, window_size=window), plain)
    # causal is window_size[1] = 0.
    np.testing.assert_array_equal(
        fk.flash_attn_func(q, k, v, window_size=(-1, 0)), fk.flash_attn_func(q, k, v, causal=True)
    )


# Ragged batch: empty, length-1, and longer sequences; queries without keys.
VARLEN_Q = [3, 0, 1, 7, 5, 1]
VARLEN_K = [4, 2, 0, 7, 9, 1]


def cumsum0(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (2, 1)])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_varlen(causal, window, heads, dtype, randn, window_mask, reference):
    """The packed batch against one masked jax call on the zero-padded batch (each
    sequence under its own mask), LSE per sequence against float64 numpy, and each
    sequence against a dense flashkernels call on it alone."""
    h, hkv = heads
    d = 16
    cu_q, cu_k = cumsum0(VARLEN_Q), cumsum0(VARLEN_K)
    q = randn(int(cu_q[-1]), h, d, dtype=dtype)
    k, v = randn(int(cu_k[-1]), hkv, d, dtype=dtype), randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    out, lse = fk.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K), causal=causal, window_size=window, return_lse=True
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (h, q.shape[0]) and lse.dtype == np.float32
    # jax on the zero-padded batch, each sequence with its own mask (one jax call).
    mask = window_mask_varlen(VARLEN_Q, VARLEN_K, causal=causal, window=window)
    padded = [pad_varlen(x, cu) for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k))]
    want = unpad_varlen(jax_masked(*padded, mask[:, None]), cu_q)
    rows = np.concatenate([mask[b, :nq].any(axis=1) for b, nq in enumerate(VARLEN_Q)])
    got = out.astype(np.float32)
    np.testing.assert_allclose(got[rows], want[rows], rtol=TOL[dtype], atol=TOL[dtype])
    assert (got[~rows] == 0).all() and np.isneginf(lse[:, ~rows]).all()
    for b, (nq, nk) in enumerate(zip(VARLEN_Q, VARLEN_K)):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if nq == 0 or nk == 0:
            continue
        # LSE against float64 numpy, and the sequence alone through the dense API.
        sq, sk, sv = q[None, rq], k[None, rk], v[None, rk]
        _, want_lse = reference(sq, sk, sv, causal=causal, window=window)
        seq_rows = rows[rq]
        np.testing.assert_allclose(lse[:, rq][:, seq_rows], want_lse[0][:, seq_rows], rtol=TOL[dtype], atol=TOL[dtype])
        dense = fk.flash_attn_func(sq, sk, sv, causal=causal, window_size=window)
        np.testing.assert_allclose(out[None, rq].astype(np.float32), dense.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_varlen_offsets_from_any_framework(randn):
    cu_q, cu_k = cumsum0(VARLEN_Q), cumsum0(VARLEN_K)
    q, k, v = randn(int(cu_q[-1]), 2, 8), randn(int(cu_k[-1]), 2, 8), randn(int(cu_k[-1]), 2, 8)
    want = fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, causal=True)
    for conv in (list, jnp.asarray, lambda x: x.tolist()):
        got = fk.flash_attn_varlen_func(q, k, v, conv(cu_q), conv(cu_k), 7, 9, causal=True)
        np.testing.assert_array_equal(got, want)
    # max_seqlen may exceed the longest sequence (flash-attn sizes its grid with it).
    np.testing.assert_array_equal(fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 100, 100, causal=True), want)
    # jax inputs give jax outputs.
    out = fk.flash_attn_varlen_func(
        *(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(cu_q), jnp.asarray(cu_k), 7, 9, causal=True
    )
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), want)


def test_single_sequence_varlen_is_dense(randn):
    q, k, v = randn(1, 13, 2, 16), randn(1, 13, 2, 16), randn(1, 13, 2, 16)
    cu = np.array([0, 13], np.int32)
    out, lse = fk.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 13, 13, causal=True, return_lse=True)
    dense, dense_lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    np.testing.assert_array_equal(out, dense[0])
    np.testing.assert_array_equal(lse, dense_lse[0])


def test_flash_attn_positional_arguments(randn):
    """flash-attn's positional order: (q, k, v, dropout_p, softmax_scale, causal,
    window_size, deterministic); deterministic changes nothing."""
    q, k, v = randn(1, 9, 2, 8), randn(1, 9, 2, 8), randn(1, 9, 2, 8)
    a = fk.flash_attn_func(q, k, v, 0.0, 0.3, True, (2, 0), True)
    b = fk.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, window_size=(2, 0))
    np.testing.assert_array_equal(a, b)
    cu = np.array([0, 9], np.int32)
    c = fk.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 9, 9, 0.0, 0.3, True, (2, 0), True)
    np.testing.assert_array_equal(c, a[0])
