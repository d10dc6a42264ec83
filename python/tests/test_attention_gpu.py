"""The CUDA path with torch (against torch's SDPA in float32: outputs and gradients), cupy
and jax (against the float64 numpy reference, and the CPU reference backward). Skipped
without a GPU, or without the framework in question."""

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
# Max error relative to max |reference| (float32), per storage dtype: a few unit roundoffs u
# (the output's rounding and P's before P·V), bf16 u = 2^-8, f16 u = 2^-11 (8x tighter);
# gradients sum more rounded terms. As tests/common's out_tol / grad_tol.
TOL = {"float16": 2.5e-3, "bfloat16": 1e-2}
GRAD_TOL = {"float16": 5e-3, "bfloat16": 2e-2}


def tol(dtype, table=TOL):
    """The bound for a torch / numpy / jax / cupy dtype (or its name)."""
    return table[str(dtype).rpartition(".")[2]]


def grad_tol(dtype):
    return tol(dtype, GRAD_TOL)


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
    q, k, v = (
        randn(b, h, nq, head_dim, dtype=dtype),
        randn(b, h, nk, head_dim, dtype=dtype),
        randn(b, h, nk, head_dim, dtype=dtype),
    )
    out, lse = fk.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.device == q.device and out.dtype == dtype
    assert out.shape == (b, h, nq, head_dim) and lse.shape == (b, h, nq) and lse.dtype == torch.float32
    want, want_lse = torch_reference(q, k, v, causal=causal)
    rows = (
        torch.arange(nq, device=q.device) + nk - nq >= 0
        if causal
        else torch.ones(nq, dtype=torch.bool, device=q.device)
    )
    assert torch.isfinite(out).all()
    assert rel_err(out[:, :, rows], want[:, :, rows]) < tol(out.dtype)
    torch.testing.assert_close(lse[:, :, rows], want_lse[:, :, rows], rtol=1e-3, atol=1e-3)
    if causal and nq == nk:
        # Square causal: torch's own (top-left) is_causal agrees.
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        assert rel_err(out, ref) < tol(out.dtype)
    if not rows.all():
        assert (out[:, :, ~rows] == 0).all() and torch.isneginf(lse[:, :, ~rows]).all()


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_flash_layout(dtype, head_dim, causal):
    dtype = getattr(torch, dtype)
    b, h, nq, nk = 2, 3, 65, 65
    q, k, v = (
        randn(b, nq, h, head_dim, dtype=dtype),
        randn(b, nk, h, head_dim, dtype=dtype),
        randn(b, nk, h, head_dim, dtype=dtype),
    )
    out, lse = fk.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (b, nq, h, head_dim) and out.is_contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2).float() for x in (q, k, v)), is_causal=causal
    ).transpose(1, 2)
    assert rel_err(out, ref) < tol(out.dtype)
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
    assert rel_err(out, want) < tol(out.dtype)
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
    assert rel_err(out, want) < tol(out.dtype)


@needs_torch
def test_torch_gpu_errors():
    q = randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32"):
        fk.scaled_dot_product_attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head_dim 12"):
        x = randn(1, 2, 8, 12, dtype=torch.float16)
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
    assert np.abs(got - want).max() / np.abs(want).max() < tol("float16")
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
    assert np.abs(got[:, rows] - want[:, rows]).max() / np.abs(want).max() < tol(dtype)
    np.testing.assert_allclose(np.asarray(lse)[:, :, rows], want_lse[:, :, rows], rtol=1e-3, atol=1e-3)
    out_t = fk.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), is_causal=causal)
    np.testing.assert_array_equal(np.asarray(out_t.swapaxes(1, 2)), np.asarray(out))


@needs_jax_gpu
def test_jax_gpu_buffers_are_freed():
    import gc
    import sys
    import time

    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((1, 128, 2, 64), jnp.bfloat16), jax_gpu)
    gc.collect()
    base = sys.getrefcount(x)

    def settled_refs():
        # jax may run a dropped array's DLPack deleter only once the device is done with
        # it: poll until the buffers' references to x are gone (or 10 s pass).
        deadline = time.monotonic() + 10
        while True:
            gc.collect()
            n = sys.getrefcount(x)
            if n <= base or time.monotonic() > deadline:
                return n
            time.sleep(0.01)

    for i in range(20):
        out = fk.flash_attn_func(x, x, x)
        out.block_until_ready()
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape
        # q = k = v = ones: every score is equal, so each row averages V's rows, all ones.
        np.testing.assert_allclose(np.asarray(out, dtype=np.float32), 1.0, rtol=0, atol=2**-8)
        if i == 0:
            # The output is flashkernels memory that holds its inputs until it is freed,
            # so the count below does observe the buffer's lifetime.
            assert sys.getrefcount(x) > base, "the jax output does not hold flashkernels' buffer"
        del out
    # Every output buffer (and the dropped lse) was freed: nothing holds x any more.
    assert settled_refs() == base


# ---- backward, GQA, windows, varlen, head dims, torch.compile (torch on CUDA)

HEAD_DIMS = [8, 40, 64, 96, 128, 160, 256]


def visible_mask(nq, nk, *, causal=False, window=(-1, -1), device="cuda"):
    """(nq, nk) bool: flash-attn's bottom-right aligned causal / window rule."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    diag = i + nk - nq
    mask = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    return mask


def sdpa_f32(q, k, v, *, causal=False, window=(-1, -1), scale=None):
    """torch's SDPA in float32 on (B, N, H, D) tensors (k, v may have fewer heads). Masks
    are additive and finite, so a query that sees no key averages all of them instead of
    giving NaN; callers compare only rows that see a key, with dO = 0 on the others."""
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))
    nq, nk = q.shape[2], k.shape[2]
    mask = None
    if causal or window != (-1, -1):
        visible = visible_mask(nq, nk, causal=causal, window=window, device=q.device)
        mask = torch.zeros(nq, nk, device=q.device).masked_fill(~visible, -1e30)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def grad_errors(got, want):
    """Max error of each gradient relative to max |its reference|, that scale floored at
    a tenth of the largest gradient's: a gradient that is ~0 in exact arithmetic (dq when
    each query sees a single key) is judged on the scale of the others."""
    scales = [w.abs().max().item() for w in want]
    floor = 0.1 * max(max(scales), 1e-6)
    return [((g.float() - w.float()).abs().max().item() / max(s, floor)) for g, w, s in zip(got, want, scales)]


def leaves_cuda(*shapes, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*s, generator=g, device="cuda").to(dtype).requires_grad_() for s in shapes]


def check_grads(fn, inputs, dout, rows, ref_fn):
    """fn's output and gradients (for cotangent dout, zero on hidden rows) against ref_fn's
    in float32. `rows`: bool over dim 1 (queries) that see a key."""
    dout = dout.clone()
    dout[:, ~rows] = 0
    out = fn(*inputs)
    out.backward(dout)
    got = [x.grad.clone() for x in inputs]
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    want = ref_fn(*ref_in)
    want.backward(dout.float())
    assert torch.isfinite(out).all()
    assert rel_err(out[:, rows], want[:, rows]) < tol(out.dtype)
    if not rows.all():
        assert (out[:, ~rows] == 0).all()
    for name, g, x in zip(("dq", "dk", "dv"), got, inputs):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert torch.isfinite(g).all(), name
    errors = grad_errors(got, [r.grad for r in ref_in])
    assert max(errors) < grad_tol(out.dtype), dict(zip(("dq", "dk", "dv"), errors))
    return out, got


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backward_head_dims(dtype, head_dim, causal):
    dtype = getattr(torch, dtype)
    b, h, nq, nk = 2, 3, 77, 77
    inputs = leaves_cuda((b, nq, h, head_dim), (b, nk, h, head_dim), (b, nk, h, head_dim), dtype=dtype)
    dout = randn(b, nq, h, head_dim, dtype=dtype)
    rows = torch.ones(nq, dtype=torch.bool, device="cuda")
    check_grads(
        lambda q, k, v: fk.flash_attn_func(q, k, v, causal=causal),
        inputs,
        dout,
        rows,
        lambda q, k, v: sdpa_f32(q, k, v, causal=causal),
    )


# (batch, heads, heads_kv, seqlen_q, seqlen_k): odd lengths, more than one tile, cross
# attention both ways, GQA and MQA.
BWD_SHAPES = [
    (1, 1, 1, 1, 7),
    (2, 3, 3, 7, 7),
    (1, 2, 2, 33, 65),
    (2, 4, 2, 65, 33),
    (1, 8, 1, 127, 129),
    (2, 6, 3, 256, 256),
    (1, 2, 1, 300, 45),
]


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", BWD_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backward_shapes(dtype, head_dim, shape, causal):
    dtype = getattr(torch, dtype)
    b, h, hkv, nq, nk = shape
    inputs = leaves_cuda((b, nq, h, head_dim), (b, nk, hkv, head_dim), (b, nk, hkv, head_dim), dtype=dtype, seed=1)
    dout = randn(b, nq, h, head_dim, dtype=dtype)
    rows = visible_mask(nq, nk, causal=causal).any(dim=1)
    check_grads(
        lambda q, k, v: fk.flash_attn_func(q, k, v, causal=causal),
        inputs,
        dout,
        rows,
        lambda q, k, v: sdpa_f32(q, k, v, causal=causal),
    )


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", [(8, 1), (8, 2), (6, 3), (4, 4)])
def test_torch_gqa_sdpa_layout(dtype, heads):
    """torch's layout with enable_gqa=True, against torch's own GQA."""
    dtype = getattr(torch, dtype)
    h, hkv = heads
    b, n, d = 2, 97, 128
    q, k, v = leaves_cuda((b, h, n, d), (b, hkv, n, d), (b, hkv, n, d), dtype=dtype, seed=2)
    out = fk.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
    want.backward(dout.float())
    assert rel_err(out, want) < tol(out.dtype)
    for x, r in zip((q, k, v), ref_in):
        assert x.grad.shape == x.shape
        assert rel_err(x.grad, r.grad) < grad_tol(x.dtype)


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (5, 37), (-1, 64), (100, -1), (1000, 1000)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(200, 200), (130, 257), (257, 130)])
def test_torch_window(dtype, window, causal, lengths):
    dtype = getattr(torch, dtype)
    nq, nk = lengths
    b, h, hkv, d = 2, 4, 2, 64
    inputs = leaves_cuda((b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d), dtype=dtype, seed=3)
    dout = randn(b, nq, h, d, dtype=dtype)
    rows = visible_mask(nq, nk, causal=causal, window=window).any(dim=1)
    check_grads(
        lambda q, k, v: fk.flash_attn_func(q, k, v, causal=causal, window_size=window),
        inputs,
        dout,
        rows,
        lambda q, k, v: sdpa_f32(q, k, v, causal=causal, window=window),
    )


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (32, 8)])
@pytest.mark.parametrize("cu_device", ["cuda", "cpu"])
def test_torch_varlen(dtype, head_dim, causal, window, cu_device):
    """Packed sequences (empty, length 1, one and several tiles; queries without keys)
    against per-sequence float32 SDPA; gradients on the packed tensors."""
    dtype = getattr(torch, dtype)
    lens_q = [3, 0, 1, 130, 64, 257, 5]
    lens_k = [4, 2, 0, 129, 200, 257, 1]
    cu = lambda lens: torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32, device=cu_device)  # noqa: E731
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    h, hkv = 4, 2
    q, k, v = leaves_cuda(
        (sum(lens_q), h, head_dim), (sum(lens_k), hkv, head_dim), (sum(lens_k), hkv, head_dim), dtype=dtype, seed=4
    )
    dout = randn(sum(lens_q), h, head_dim, dtype=dtype)
    starts_q, starts_k = ([int(x) for x in np.cumsum([0] + lens)] for lens in (lens_q, lens_k))
    rows = torch.zeros(sum(lens_q), dtype=torch.bool, device="cuda")
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        if nq and nk:
            rows[starts_q[b] : starts_q[b + 1]] = visible_mask(nq, nk, causal=causal, window=window).any(dim=1)
    dout[~rows] = 0

    out, lse = fk.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window, return_lse=True
    )
    assert out.shape == q.shape and lse.shape == (h, sum(lens_q)) and lse.dtype == torch.float32
    out.backward(dout)
    assert (out[~rows] == 0).all() and torch.isneginf(lse[:, ~rows]).all()
    # The reference, sequence by sequence, assembled into packed tensors (so errors are
    # judged against the gradients' overall scale, as in the dense tests).
    want_out = torch.zeros(out.shape, device="cuda")
    want_grads = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        rq, rk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if nq == 0 or nk == 0:
            continue
        sq, sk, sv = (x.detach()[None, r].float().requires_grad_() for x, r in ((q, rq), (k, rk), (v, rk)))
        want = sdpa_f32(sq, sk, sv, causal=causal, window=window)
        want.backward(dout[None, rq].float())
        want_out[rq] = want[0].detach()
        for w, r, part in zip(want_grads, (rq, rk, rk), (sq, sk, sv)):
            w[r] = part.grad[0]
    assert rel_err(out[rows], want_out[rows]) < tol(out.dtype)
    errors = grad_errors((q.grad, k.grad, v.grad), want_grads)
    assert max(errors) < grad_tol(out.dtype), dict(zip(("dq", "dk", "dv"), errors))
    # Sequences without queries or keys get zero gradients.
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        if nq == 0 or nk == 0:
            rq, rk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
            assert (q.grad[rq] == 0).all() and (k.grad[rk] == 0).all() and (v.grad[rk] == 0).all()


@needs_torch
def test_torch_backward_awkward_dout():
    """out.sum().backward() (dO with all-zero strides) and a misaligned dO are copied for
    the kernel, with the same gradients as a contiguous dO."""
    q, k, v = leaves_cuda((2, 65, 4, 64), (2, 65, 4, 64), (2, 65, 4, 64), dtype=torch.bfloat16, seed=5)
    fk.flash_attn_func(q, k, v, causal=True).sum().backward()
    want = [x.grad.clone() for x in (q, k, v)]
    for dout in (
        torch.ones(2, 65, 4, 64, dtype=torch.bfloat16, device="cuda"),
        torch.ones(2 * 65 * 4 * 64 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(2, 65, 4, 64),
    ):
        for x in (q, k, v):
            x.grad = None
        fk.flash_attn_func(q, k, v, causal=True).backward(dout)
        for x, w in zip((q, k, v), want):
            assert torch.equal(x.grad, w)


@needs_torch
def test_torch_backward_is_deterministic():
    q, k, v = leaves_cuda((2, 513, 8, 128), (2, 513, 2, 128), (2, 513, 2, 128), dtype=torch.bfloat16, seed=6)
    dout = randn(2, 513, 8, 128, dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        for x in (q, k, v):
            x.grad = None
        fk.flash_attn_func(q, k, v, causal=True, deterministic=True).backward(dout)
        runs.append([x.grad.clone() for x in (q, k, v)])
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


@needs_torch
def test_torch_functional_backward_matches_autograd():
    q, k, v = leaves_cuda((2, 77, 4, 64), (2, 90, 2, 64), (2, 90, 2, 64), dtype=torch.float16, seed=7)
    out, lse = fk.flash_attn_func(q, k, v, causal=True, window_size=(20, 3), return_lse=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = fk.attention_backward(q, k, v, out, lse, dout, causal=True, window_size=(20, 3))
    for g, x in zip(grads, (q, k, v)):
        assert g.is_cuda and torch.equal(g, x.grad)


@needs_torch
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("varlen", [False, True])
def test_torch_compile_cuda(backend, varlen):
    """torch.compile(fullgraph=True) of forward + backward on CUDA: the same numbers as
    eager (up to inductor's own fusion of the surrounding ops)."""
    if varlen:
        lens = [5, 130, 1, 64]
        cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32, device="cuda")
        inputs = leaves_cuda((200, 8, 64), (200, 2, 64), (200, 2, 64), dtype=torch.bfloat16, seed=8)

        def fn(q, k, v):
            return fk.flash_attn_varlen_func(q, k, v, cu, cu, 130, 130, causal=True).float().square().sum()

    else:
        inputs = leaves_cuda((2, 8, 130, 128), (2, 2, 130, 128), (2, 2, 130, 128), dtype=torch.bfloat16, seed=8)

        def fn(q, k, v):
            out, lse = fk.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
            return out.float().square().sum() + lse.sum()

    want = fn(*inputs)
    want.backward()
    want_grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    got.backward()
    if backend == "aot_eager":
        assert torch.equal(got, want)
        for x, w in zip(inputs, want_grads):
            assert torch.equal(x.grad, w)
    else:
        assert rel_err(got, want) < 1e-3
        for x, w in zip(inputs, want_grads):
            assert rel_err(x.grad, w) < grad_tol(x.dtype)


@needs_torch
def test_torch_opcheck_cuda():
    q, k, v = leaves_cuda((2, 65, 4, 64), (2, 80, 2, 64), (2, 80, 2, 64), dtype=torch.float16, seed=9)
    torch.library.opcheck(
        torch.ops.flashkernels.attention_fwd.default, (q, k, v, None, None, -1, -1, False, True, None, 16, -1)
    )
    out, lse = torch.ops.flashkernels.attention_fwd(
        q.detach(), k.detach(), v.detach(), None, None, -1, -1, False, True, None, 16, -1
    )
    torch.library.opcheck(
        torch.ops.flashkernels.attention_bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, None, False, True, None, 16, -1),
    )


@needs_cupy
def test_cupy_backward(randn):
    """cupy's backward against the CPU reference backward (itself checked against jax)."""
    b, h, hkv, nq, nk, d = 2, 4, 2, 65, 90, 64
    qh, kh, vh = randn(b, nq, h, d), randn(b, nk, hkv, d), randn(b, nk, hkv, d)
    doh = randn(b, nq, h, d)
    q, k, v, do = (cupy.asarray(x.astype(np.float16)) for x in (qh, kh, vh, doh))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, window_size=(30, -1), return_lse=True)
    grads = fk.attention_backward(q, k, v, out, lse, do, causal=True, window_size=(30, -1))
    cpu_in = [x.astype(np.float16).astype(np.float32) for x in (qh, kh, vh)]
    out_c, lse_c = fk.flash_attn_func(*cpu_in, causal=True, window_size=(30, -1), return_lse=True)
    want = fk.attention_backward(
        *cpu_in, out_c, lse_c, doh.astype(np.float16).astype(np.float32), causal=True, window_size=(30, -1)
    )
    for g, w in zip(grads, want):
        assert isinstance(g, cupy.ndarray) and g.dtype == np.float16
        got = cupy.asnumpy(g).astype(np.float64)
        assert np.abs(got - w).max() / np.abs(w).max() < grad_tol(g.dtype)


@needs_jax_gpu
def test_jax_gpu_backward_and_varlen(randn):
    import jax
    import jax.numpy as jnp

    lens = [3, 0, 1, 100, 70]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, h, hkv, d = int(cu[-1]), 4, 1, 128
    host = [randn(total, h, d), randn(total, hkv, d), randn(total, hkv, d), randn(total, h, d)]
    q, k, v, do = (jax.device_put(jnp.asarray(x, dtype=jnp.bfloat16), jax_gpu) for x in host)
    cu_gpu = jax.device_put(jnp.asarray(cu), jax_gpu)
    out, lse = fk.flash_attn_varlen_func(q, k, v, cu_gpu, cu_gpu, 100, 100, causal=True, return_lse=True)
    grads = fk.attention_backward(q, k, v, out, lse, do, causal=True, cu_seqlens_q=cu_gpu, cu_seqlens_k=cu_gpu)
    assert all(isinstance(g, jax.Array) and g.devices() == {jax_gpu} for g in grads)
    cpu_in = [np.asarray(x.astype(jnp.float32)) for x in (q, k, v, do)]
    out_c, lse_c = fk.flash_attn_varlen_func(*cpu_in[:3], cu, cu, 100, 100, causal=True, return_lse=True)
    assert np.abs(np.asarray(out.astype(jnp.float32)) - out_c).max() / np.abs(out_c).max() < tol(out.dtype)
    want = fk.attention_backward(*cpu_in[:3], out_c, lse_c, cpu_in[3], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for g, w in zip(grads, want):
        got = np.asarray(g.astype(jnp.float32))
        assert np.abs(got - w).max() / np.abs(w).max() < grad_tol(g.dtype)
