"""The CUDA path with torch (against torch's SDPA in float32), cupy and jax (against the
float64 numpy reference). Skipped without a GPU, or without the framework in question."""

import numpy as np
import pytest

import flashkernels as fk

try:
    import torch
except ImportError:
    torch = None

HAVE_CUDA = fk.cuda_available()
needs_torch = pytest.mark.skipif(
    not HAVE_CUDA or torch is None or not torch.cuda.is_available(), reason="needs a CUDA device and torch"
)

# (batch, heads, seqlen_q, seqlen_k): odd lengths, B1/H1, cross attention, > one tile.
SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (1, 2, 33, 65), (2, 4, 65, 33), (1, 1, 127, 129), (2, 2, 256, 256)]
TOL = 1e-2  # relative to max |reference|, for float16 and bfloat16


def rel_err(got, want):
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def torch_reference(q, k, v, *, causal, scale=None):
    """(B, H, N, D) -> out (B, H, Nq, D) and lse (B, H, Nq), float32. Causal uses an
    explicit bottom-right mask (torch's is_causal is top-left when Nq != Nk)."""
    q, k, v = q.float(), k.float(), v.float()
    nq, nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if causal:
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(j > i + nk - nq, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return p @ v, lse


def randn(*shape, dtype, device="cuda"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_sdpa_layout(dtype, head_dim, shape, causal):
    dtype = getattr(torch, dtype)
    b, h, nq, nk = shape
    torch.manual_seed(0)
    q, k, v = randn(b, h, nq, head_dim, dtype=dtype), randn(b, h, nk, head_dim, dtype=dtype), randn(b, h, nk, head_dim, dtype=dtype)
    out, lse = fk.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.device == q.device and out.dtype == dtype
    assert out.shape == (b, h, nq, head_dim) and lse.shape == (b, h, nq) and lse.dtype == torch.float32
    want, want_lse = torch_reference(q, k, v, causal=causal)
    rows = torch.arange(nq, device=q.device) + nk - nq >= 0 if causal else torch.ones(nq, dtype=torch.bool, device=q.device)
    assert torch.isfinite(out).all()
    assert rel_err(out[:, :, rows], want[:, :, rows]) < TOL
    torch.testing.assert_close(lse[:, :, rows], want_lse[:, :, rows], rtol=1e-3, atol=1e-3)
    if causal and nq == nk:
        # Square causal: torch's own (top-left) is_causal agrees.
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        assert rel_err(out, ref) < TOL
    if not rows.all():
        assert (out[:, :, ~rows] == 0).all() and torch.isneginf(lse[:, :, ~rows]).all()


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_flash_layout(dtype, head_dim, causal):
    dtype = getattr(torch, dtype)
    b, h, nq, nk = 2, 3, 65, 65
    q, k, v = randn(b, nq, h, head_dim, dtype=dtype), randn(b, nk, h, head_dim, dtype=dtype), randn(b, nk, h, head_dim, dtype=dtype)
    out, lse = fk.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (b, nq, h, head_dim) and out.is_contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2).float() for x in (q, k, v)), is_causal=causal
    ).transpose(1, 2)
    assert rel_err(out, ref) < TOL
    _, want_lse = torch_reference(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal)
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-3)


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_non_contiguous_and_scale(dtype):
    dtype = getattr(torch, dtype)
    b, h, nq, nk, d = 2, 4, 33, 47, 128
    # (B, H, N, D) views of (B, N, H, D) storage, and a slice of a wider last dim.
    q = randn(b, nq, h, d, dtype=dtype).transpose(1, 2)
    k = randn(b, h, nk, 2 * d, dtype=dtype)[..., :d]
    v = randn(b, nk, h, d, dtype=dtype).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = fk.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    want, _ = torch_reference(q, k, v, causal=True, scale=0.2)
    assert rel_err(out, want) < TOL
    dense = fk.scaled_dot_product_attention(*(x.contiguous() for x in (q, k, v)), is_causal=True, scale=0.2)
    assert torch.equal(out, dense)


@needs_torch
def test_torch_current_stream_is_used():
    """Inputs are written on a side stream, late (behind a sleep): a kernel that ran on any
    other stream would read them before they are ready."""
    b, h, n, d = 2, 4, 512, 128
    src = [randn(b, h, n, d, dtype=torch.bfloat16) for _ in range(3)]
    want, _ = torch_reference(*src, causal=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        q, k, v = (torch.zeros_like(x) for x in src)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)
        for dst, s in zip((q, k, v), src):
            dst.copy_(s)
        out = fk.scaled_dot_product_attention(q, k, v, is_causal=True)
        check = out.float().sum()  # queued after our kernel on the same stream
    side.synchronize()
    assert torch.isfinite(check)
    assert rel_err(out, want) < TOL


@needs_torch
def test_torch_gpu_errors():
    q = randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32"):
        fk.scaled_dot_product_attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head_dim 32"):
        x = randn(1, 2, 8, 32, dtype=torch.float16)
        fk.scaled_dot_product_attention(x, x, x)
    with pytest.raises(ValueError, match="must be on one device"):
        fk.scaled_dot_product_attention(q, q.cpu(), q)
    with pytest.raises(TypeError, match="dtype mismatch"):
        fk.scaled_dot_product_attention(q, q.to(torch.bfloat16), q)
    with pytest.raises(ValueError, match="16-byte aligned"):
        misaligned = torch.empty(1 * 2 * 8 * 64 + 1, dtype=torch.float16, device="cuda")[1:].view(1, 2, 8, 64)
        fk.scaled_dot_product_attention(misaligned, q, q)


@needs_torch
def test_torch_many_calls_do_not_leak():
    q = randn(2, 4, 64, 64, dtype=torch.float16)
    fk.scaled_dot_product_attention(q, q, q)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(50):
        fk.scaled_dot_product_attention(q, q, q)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


# ---- cupy


def _cupy():
    if not HAVE_CUDA:
        return None
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


cupy = _cupy()
needs_cupy = pytest.mark.skipif(cupy is None, reason="needs a CUDA device and cupy")


@needs_cupy
@pytest.mark.parametrize("causal", [False, True])
def test_cupy(causal, reference, randn):
    b, h, nq, nk, d = 2, 3, 33, 65, 64
    qh, kh, vh = (randn(b, n, h, d).astype(np.float16) for n in (nq, nk, nk))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        q, k, v = (cupy.asarray(x) for x in (qh, kh, vh))
        out, lse = fk.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        out_t = fk.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), is_causal=causal)
    stream.synchronize()
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float16 and out.shape == (b, nq, h, d)
    want, want_lse = reference(qh, kh, vh, causal=causal)
    got = cupy.asnumpy(out).astype(np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < TOL
    np.testing.assert_allclose(cupy.asnumpy(lse), want_lse, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(cupy.asnumpy(out_t.swapaxes(1, 2)), cupy.asnumpy(out))


# ---- jax


def _jax_gpu():
    if not HAVE_CUDA:
        return None
    try:
        import jax

        return jax.devices("gpu")[0]
    except Exception:
        return None


jax_gpu = _jax_gpu()
needs_jax_gpu = pytest.mark.skipif(jax_gpu is None, reason="needs a CUDA device and jax with a GPU backend")


@needs_jax_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_jax_gpu(dtype, causal, reference, randn):
    import jax
    import jax.numpy as jnp

    b, h, nq, nk, d = 2, 3, 65, 33, 128
    q, k, v = (jax.device_put(jnp.asarray(randn(b, n, h, d), dtype=dtype), jax_gpu) for n in (nq, nk, nk))
    out, lse = fk.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert isinstance(out, jax.Array) and out.devices() == {jax_gpu} and out.dtype == q.dtype
    # Use the result in jax right away: ordering is jax's consumer stream waiting on ours.
    total = jax.jit(lambda o: jnp.sum(o.astype(jnp.float32) ** 2))(out)
    assert np.isfinite(float(total))
    want, want_lse = reference(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), causal=causal)
    rows = np.arange(nq) + nk - nq >= 0 if causal else np.ones(nq, bool)
    got = np.asarray(out.astype(jnp.float32)).astype(np.float64)
    assert np.abs(got[:, rows] - want[:, rows]).max() / np.abs(want).max() < TOL
    np.testing.assert_allclose(np.asarray(lse)[:, :, rows], want_lse[:, :, rows], rtol=1e-3, atol=1e-3)
    out_t = fk.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), is_causal=causal)
    np.testing.assert_array_equal(np.asarray(out_t.swapaxes(1, 2)), np.asarray(out))


@needs_jax_gpu
def test_jax_gpu_buffers_are_freed():
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((1, 128, 2, 64), jnp.bfloat16), jax_gpu)
    for _ in range(20):
        out = fk.flash_attn_func(x, x, x)
        out.block_until_ready()
        del out
