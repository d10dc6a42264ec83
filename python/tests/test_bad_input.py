"""Bad input gets a clear typed error (issue 13, Python side): arrays of different
frameworks in one call, double backward through any op's torch autograd (eager
autograd.Function and torch.library custom op alike), and the argument checks of every
public function (bools, ints, scales, jax tracers, named arguments). The broad sweep of
bad, edge and valid inputs, each in its own subprocess, is test_fuzz.py."""

import numpy as np
import pytest

import flashkernels as fk

torch = pytest.importorskip("torch")


def _qkv(shape=(1, 8, 2, 16), seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, requires_grad=requires_grad) for _ in range(3)]


# ---------------------------------------------------------------------------------------
# Mixed frameworks: a TypeError naming each argument's type, never the arrays' contents.


def _mixed_calls():
    q, k, v = _qkv()
    qn, kn, vn = (t.numpy() for t in (q, k, v))
    o, lse = fk.flash_attn_func(qn, kn, vn, return_lse=True)
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(3, 2, 3, 3)
    b = torch.randn(3)
    xn, wn, bn = x.numpy(), w.numpy(), b.numpy()
    dy = np.ones((1, 3, 4, 4), np.float32)
    y, idx = fk.max_pool2d(xn, 2, return_indices=True)
    dyp = np.ones_like(y)
    cu = np.array([0, 8], np.int32)
    packed = [t[0] for t in (q, k, v)]
    return {
        "sdpa numpy q": lambda: fk.scaled_dot_product_attention(qn, k.requires_grad_(), v),
        "sdpa torch q": lambda: fk.scaled_dot_product_attention(q, kn, vn),
        "flash_attn_func": lambda: fk.flash_attn_func(q, k, vn),
        "flash_attn_varlen_func": lambda: fk.flash_attn_varlen_func(packed[0].numpy(), *packed[1:], cu, cu, 8, 8),
        "attention_backward": lambda: fk.attention_backward(qn, kn, vn, o, torch.from_numpy(lse), o),
        "longformer_attention": lambda: fk.longformer_attention(qn, k, v, 2),
        "longformer global_qkv": lambda: fk.longformer_attention(q, k, v, 2, global_qkv=(qn, k, v)),
        "longformer_attention_backward": lambda: fk.longformer_attention_backward(qn, kn, vn, o, lse, q, 2),
        "conv2d weight": lambda: fk.conv2d(xn, w),
        "conv2d bias": lambda: fk.conv2d(x, w, bn),
        "conv2d_backward": lambda: fk.conv2d_backward(dy, x, wn),
        "max_pool2d_backward indices": lambda: fk.max_pool2d_backward(dyp, xn, torch.from_numpy(idx), 2),
        "max_pool2d_backward input": lambda: fk.max_pool2d_backward(dyp, x, idx, 2),
        "avg_pool2d_backward": lambda: fk.avg_pool2d_backward(torch.from_numpy(dyp), xn, 2),
    }


@pytest.mark.parametrize("name", list(_mixed_calls()))
def test_mixed_frameworks_are_a_type_error(name):
    call = _mixed_calls()[name]
    with pytest.raises(TypeError, match="one framework") as e:
        call()
    msg = str(e.value)
    assert len(msg) < 400 and "array(" not in msg and "tensor(" not in msg, msg
    assert "numpy.ndarray" in msg and "torch.Tensor" in msg, msg


def test_mixed_frameworks_never_drop_a_gradient():
    q, k, v = _qkv(requires_grad=True)
    with pytest.raises(TypeError, match="one framework"):
        fk.scaled_dot_product_attention(q.detach().numpy(), k, v)
    assert k.grad is None


def test_ring_attention_takes_torch_tensors_only():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fk.ring_attention(q, k.numpy(), v)


# ---------------------------------------------------------------------------------------
# Double backward: the gradients come back requiring grad under create_graph=True (when
# they depend on anything that does), through a node that raises a clear RuntimeError
# when they are differentiated again, on both routes (eager autograd.Function and the
# torch.library op that torch.compile traces).

DOUBLE = "double backward is not supported"


def _attention_cases():
    def sdpa(q, k, v):
        return fk.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def varlen(q, k, v):
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        return fk.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, causal=True)

    def op_fwd(q, k, v):
        return torch.ops.flashkernels.attention_fwd(q, k, v, None, None, -1, -1, False, True, None, -1, -1)[0]

    def longformer_op(q, k, v):
        return torch.ops.flashkernels.longformer_fwd(
            q, k, v, None, None, None, None, None, [1], [1], 2, [1], False, None
        )[0]

    return {
        "sdpa": sdpa,
        "flash_attn_func": lambda q, k, v: fk.flash_attn_func(q, k, v, window_size=(3, 1)),
        "flash_attn_varlen_func": varlen,
        "longformer": lambda q, k, v: fk.longformer_attention(q, k, v, 2, global_tokens=[[1]]),
        "longformer global_qkv": lambda q, k, v: fk.longformer_attention(
            q, k, v, 2, global_tokens=[[0]], global_qkv=(q * 1, k * 1, v * 1)
        ),
        "op attention_fwd": op_fwd,
        "op longformer_fwd": longformer_op,
        "ring": lambda q, k, v: fk.ring._RingAttention.apply(q, k, v, True, None, _OneRank())[0],
    }


class _OneRank:
    """A ring of one rank: ring attention's autograd without torch.distributed."""

    rank, size = 0, 1


def _pool_cases():
    def conv_op(x, w):
        return torch.ops.flashkernels.conv2d_fwd(x, w, None, [1, 1], [1, 1], [1, 1], 1, "gelu", "")[0]

    def max_op(x, _w):
        return torch.ops.flashkernels.pool2d_fwd(x, "max", [2, 2], [2, 2], [0, 0], [1, 1], False, True, 0)[0]

    def avg_op(x, _w):
        return torch.ops.flashkernels.pool2d_fwd(x, "avg", [2, 2], [1, 1], [1, 1], [1, 1], False, True, 0)[0]

    return {
        "conv2d": lambda x, w: fk.conv2d(x, w, padding=1),
        "conv2d relu": lambda x, w: fk.conv2d(x, w, padding=1, activation="relu"),
        "max_pool2d": lambda x, _w: fk.max_pool2d(x, 2),
        "avg_pool2d": lambda x, _w: fk.avg_pool2d(x, 3, 1, 1),
        "op conv2d_fwd": conv_op,
        "op pool2d_fwd max": max_op,
        "op pool2d_fwd avg": avg_op,
    }


def _check_double_backward(out, inputs):
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    assert any(g.requires_grad for g in grads), "gradients under create_graph=True must not be silently detached"
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)


@pytest.mark.parametrize("name", list(_attention_cases()))
def test_attention_double_backward_raises(name):
    q, k, v = _qkv(requires_grad=True)
    _check_double_backward(_attention_cases()[name](q, k, v), (q, k, v))


@pytest.mark.parametrize("name", list(_attention_cases()))
def test_attention_double_backward_through_a_constant_output_gradient(name):
    # The issue's reproducer: out.sum()'s output gradient is a constant, so torch's
    # once_differentiable (which looks at it alone) returned a detached gradient.
    q, k, v = _qkv(requires_grad=True)
    (g,) = torch.autograd.grad(_attention_cases()[name](q, k, v).sum(), q, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match=DOUBLE):
        g.sum().backward()


@pytest.mark.parametrize("name", list(_pool_cases()))
def test_conv_and_pool_double_backward_raises(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, requires_grad=True)
    inputs = (x, w) if "conv" in name else (x,)
    _check_double_backward(_pool_cases()[name](x, w), inputs)


def test_single_backward_is_unchanged_under_create_graph():
    q, k, v = _qkv(requires_grad=True)
    want = torch.autograd.grad(fk.flash_attn_func(q, k, v).square().sum(), (q, k, v))
    got = torch.autograd.grad(fk.flash_attn_func(q, k, v).square().sum(), (q, k, v), create_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_backward_ops_say_they_are_not_differentiable():
    q, k, v = _qkv(requires_grad=True)
    out, lse = torch.ops.flashkernels.attention_fwd(q, k, v, None, None, -1, -1, False, False, None, -1, -1)
    dq, _, _ = torch.ops.flashkernels.attention_bwd(
        torch.ones_like(out), q, k, v, out, lse, None, None, False, False, None, -1, -1
    )
    with pytest.raises(RuntimeError, match="attention_bwd.*" + DOUBLE):
        dq.sum().backward()


# ---------------------------------------------------------------------------------------
# Argument checks (issue 13, item 8).


@pytest.fixture
def np_qkv():
    return [t.numpy() for t in _qkv()]


@pytest.mark.parametrize("bad", ["no", 1, 0, None, 1.0, np.array([True])])
def test_bool_options_need_a_bool(np_qkv, bad):
    q, k, v = np_qkv
    x = np.ones((1, 1, 6, 6), np.float32)
    calls = [
        lambda: fk.scaled_dot_product_attention(q, k, v, is_causal=bad),
        lambda: fk.scaled_dot_product_attention(q, k, v, enable_gqa=bad),
        lambda: fk.flash_attn_func(q, k, v, causal=bad),
        lambda: fk.flash_attn_func(q, k, v, return_lse=bad),
        lambda: fk.flash_attn_func(q, k, v, deterministic=bad),
        lambda: fk.longformer_attention(q, k, v, 2, causal=bad),
        lambda: fk.longformer_attention(q, k, v, 2, return_lse=bad),
        lambda: fk.max_pool2d(x, 2, ceil_mode=bad),
        lambda: fk.max_pool2d(x, 2, return_indices=bad),
        lambda: fk.avg_pool2d(x, 2, count_include_pad=bad),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="must be a bool"):
            call()


def test_numpy_bools_are_bools(np_qkv):
    q, k, v = np_qkv
    a = fk.flash_attn_func(q, k, v, causal=np.bool_(True))
    b = fk.flash_attn_func(q, k, v, causal=True)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("w", [2**31 - 1, 2**40, 2**63, 2**70])
def test_huge_windows_are_unbounded(np_qkv, w):
    q, k, v = np_qkv
    want = fk.flash_attn_func(q, k, v, window_size=(-1, 0))
    np.testing.assert_array_equal(fk.flash_attn_func(q, k, v, window_size=(w, 0)), want)
    np.testing.assert_array_equal(fk.flash_attn_func(q, k, v, window_size=(w, w)), fk.flash_attn_func(q, k, v))


def test_huge_windows_are_unbounded_in_torch(np_qkv):
    q, k, v = (torch.from_numpy(x) for x in np_qkv)
    torch.testing.assert_close(
        fk.flash_attn_func(q, k, v, window_size=(2**70, 2**64)), fk.flash_attn_func(q, k, v), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "scale, exc, match",
    [
        (1e-50, ValueError, r"softmax_scale must be finite and positive within float32's range .*got 1e-50"),
        (1e39, ValueError, r"softmax_scale must be finite and positive within float32's range .*got 1e\+39"),
        (float("nan"), ValueError, "finite and positive, got nan"),
        (-2.0, ValueError, "finite and positive, got -2.0"),
        (0, ValueError, "finite and positive, got 0"),
        (10**400, ValueError, "finite and positive"),
        ("1", TypeError, "softmax_scale must be a float or None, got str"),
        (True, TypeError, "softmax_scale must be a float or None, got bool"),
    ],
)
def test_scales_report_the_value_given(np_qkv, scale, exc, match):
    q, k, v = np_qkv
    with pytest.raises(exc, match=match):
        fk.flash_attn_func(q, k, v, softmax_scale=scale)


def test_native_scale_reports_the_value_given(np_qkv):
    q = np_qkv[0]
    with pytest.raises(ValueError, match="scale = 1e-50 is out of float32 range"):
        fk._native.attention_shapes(
            list(q.shape), list(q.shape), list(q.shape), heads_first=False, causal=False, scale=1e-50
        )


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(padding=2**62), ValueError, r"output"),  # R's validator or our size check
        (dict(padding=2**63), ValueError, r"padding is too large"),
        (dict(padding=2**70), ValueError, r"padding is too large"),
        (dict(padding=-1), ValueError, r"padding must be non-negative"),
        (dict(stride=0), ValueError, r"stride"),
        (dict(dilation=2**70), ValueError, r"dilation is too large"),
        (dict(groups=-1), ValueError, r"groups must be >= 0"),
        (dict(groups=2**64), ValueError, r"groups is too large"),
        (dict(groups=1.0), TypeError, r"groups must be an int"),
        (dict(stride="1"), TypeError, r"stride must be an int or a pair"),
    ],
)
def test_conv_int_options(kw, exc, match):
    x = np.ones((1, 1, 6, 6), np.float32)
    w = np.ones((1, 1, 3, 3), np.float32)
    with pytest.raises(exc, match=match):
        fk.conv2d(x, w, **kw)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(kernel_size=2**64), ValueError, r"kernel_size is too large"),
        (dict(kernel_size=2, stride=-1), ValueError, r"stride must be non-negative"),
        (dict(kernel_size=2, padding=2**70), ValueError, r"padding is too large"),
        (dict(kernel_size=2, divisor_override=2**70), ValueError, r"divisor_override is too large"),
        (dict(kernel_size=2, divisor_override=0), ValueError, r"divisor_override must be >= 1"),
        (dict(kernel_size=2, divisor_override=2.0), TypeError, r"divisor_override must be an int"),
    ],
)
def test_pool_int_options(kw, exc, match):
    x = np.ones((1, 1, 6, 6), np.float32)
    with pytest.raises(exc, match=match):
        fk.avg_pool2d(x, **kw)


def test_pool_backward_names_its_arguments():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    dy = np.ones((1, 2, 3, 3), np.float32)
    with pytest.raises(TypeError, match="indices: max_pool2d_backward needs the forward's indices"):
        fk.max_pool2d_backward(dy, x, None, 2)
    with pytest.raises(TypeError, match="input: expected an array"):
        fk.avg_pool2d_backward(dy, (1, 2, 6, 6), 2)
    with pytest.raises(TypeError, match="indices must be an integer array"):
        fk.max_pool2d_backward(dy, x, np.zeros((1, 2, 3, 3), np.float32), 2)
    with pytest.raises(ValueError, match="outside the int32 range"):
        fk.max_pool2d_backward(dy, x, np.full((1, 2, 3, 3), 2**32 + 3, np.int64), 2)


def test_lse_dtype_is_named(np_qkv):
    q, k, v = np_qkv
    o, lse = fk.flash_attn_func(q, k, v, return_lse=True)
    for dtype in (np.float64, np.float16):
        with pytest.raises(TypeError, match=r"lse: dtype float(64|16) is not supported here \(lse is float32"):
            fk.attention_backward(q, k, v, o, lse.astype(dtype), o)
        with pytest.raises(TypeError, match=r"lse: dtype float(64|16) is not supported here \(lse is float32"):
            fk.longformer_attention_backward(q, k, v, o, lse.astype(dtype), o, 2)


@pytest.mark.parametrize("bad", [-1, 2**70, True, 1.5])
def test_varlen_max_seqlen_is_checked(bad):
    q = np.ones((8, 2, 16), np.float32)
    cu = np.array([0, 8], np.int32)
    exc = ValueError if isinstance(bad, int) and not isinstance(bad, bool) and bad < 0 else TypeError
    if bad == 2**70:
        # Only compared with the longest sequence: any huge value is fine.
        fk.flash_attn_varlen_func(q, q, q, cu, cu, bad, bad)
        return
    with pytest.raises(exc, match="max_seqlen_q"):
        fk.flash_attn_varlen_func(q, q, q, cu, cu, bad, 8)


def test_cu_seqlens_lists_outside_int32():
    q = np.ones((8, 2, 16), np.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q: offset 1 is 1267650600228229401496703205376"):
        fk.flash_attn_varlen_func(q, q, q, [0, 2**100], [0, 8], 8, 8)


def test_jax_tracing_gets_the_dedicated_message():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    x = jnp.ones((1, 1, 6, 6), jnp.float32)
    calls = [
        lambda a: fk.flash_attn_func(a, a, a),
        lambda a: fk.scaled_dot_product_attention(a, a, a),
        lambda a: fk.longformer_attention(a, a, a, 2),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="cannot be called inside jax tracing"):
            jax.jit(call)(q)
    for call in (lambda a: fk.conv2d(a, a[:, :, :3, :3]), lambda a: fk.max_pool2d(a, 2)):
        with pytest.raises(TypeError, match="cannot be called inside jax tracing"):
            jax.jit(call)(x)
    with pytest.raises(TypeError, match="cannot be called inside jax tracing"):
        jax.grad(lambda a: fk.flash_attn_func(a, a, a).sum())(q)
