"""Every error path: the exception type and what its message says."""

import sys

import numpy as np
import pytest

import flashkernels as fk


class FakeCudaArray:
    """Claims to live on a CUDA device through DLPack, without a GPU."""

    def __init__(self, device_id=0):
        self.device_id = device_id

    def __dlpack_device__(self):
        return (2, self.device_id)  # kDLCUDA

    def __dlpack__(self, **kwargs):
        raise AssertionError("flashkernels must not export a tensor it is going to reject")


@pytest.fixture
def qkv(randn):
    return randn(2, 7, 3, 16), randn(2, 9, 3, 16), randn(2, 9, 3, 16)


def test_wrong_rank(qkv):
    q, k, v = qkv
    with pytest.raises(
        ValueError, match=r"q: expected a rank-4 tensor \(batch, seqlen, heads, head_dim\).*\[2, 7, 48\]"
    ):
        fk.flash_attn_func(q.reshape(2, 7, 48), k, v)
    with pytest.raises(ValueError, match=r"k: expected a rank-4 tensor \(batch, heads, seqlen, head_dim\)"):
        fk.scaled_dot_product_attention(q, k[0], v)
    with pytest.raises(ValueError, match="rank-4"):
        fk.flash_attn_func(np.array(1.0, np.float32), k, v)


def test_mismatched_shapes(qkv):
    q, k, v = qkv
    with pytest.raises(
        ValueError, match=r"shape mismatch: k has shape \[2, 9, 3, 16\] but v has shape \[2, 8, 3, 16\]"
    ):
        fk.flash_attn_func(q, k, v[:, :8])
    with pytest.raises(ValueError, match="must agree on batch and head_dim"):
        fk.flash_attn_func(q[..., :8], k, v)
    with pytest.raises(ValueError, match="must agree on batch and head_dim"):
        fk.flash_attn_func(q[:1], k, v)
    # (B, H, N, D) callers are told which order the shapes are printed in.
    with pytest.raises(ValueError, match=r"shapes shown as \(batch, seqlen, heads, head_dim\)"):
        fk.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in (q, k, v[:, :8])))


def test_mismatched_dtypes(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="dtype mismatch: q is float32, k is float16, v is float32"):
        fk.flash_attn_func(q, k.astype(np.float16), v)


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.int8, np.complex64, np.bool_])
def test_unsupported_dtype(qkv, dtype):
    q, k, v = qkv
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=f"q: dtype {name} is not supported"):
        fk.flash_attn_func(q.astype(dtype), k, v)


def test_unexportable_dtype(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="q: cannot be read through DLPack"):
        fk.flash_attn_func(q.astype(object), k, v)


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_empty(qkv, axis):
    q, k, v = qkv
    empty = np.take(q, [], axis=axis)
    with pytest.raises(ValueError, match=r"q is empty \(shape"):
        fk.flash_attn_func(empty, k, v)


def test_non_unit_last_stride(randn):
    q, k, v = randn(1, 5, 2, 16), randn(1, 5, 2, 32), randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match="k: the last dimension must have unit stride"):
        fk.flash_attn_func(q, k[..., ::2], v)
    # (B, H, N, D) given as a (B, N, H, D) permutation whose last dim is not D.
    with pytest.raises(ValueError, match="unit stride"):
        fk.flash_attn_func(q, k[..., :16], v.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2))


def test_negative_strides(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="negative strides"):
        fk.flash_attn_func(q[:, ::-1], k, v)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 1e300])
def test_bad_scale(qkv, scale):
    q, k, v = qkv
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        fk.flash_attn_func(q, k, v, softmax_scale=scale)
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        fk.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in qkv), scale=scale)


def test_scale_of_wrong_type(qkv):
    with pytest.raises((TypeError, ValueError)):
        fk.flash_attn_func(*qkv, softmax_scale="big")


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None, 3.0, "q", object()])
def test_non_array_input(qkv, bad):
    q, k, v = qkv
    with pytest.raises(TypeError, match="q: expected an array or tensor that supports DLPack"):
        fk.flash_attn_func(bad, k, v)
    with pytest.raises(TypeError, match="v: expected an array or tensor that supports DLPack"):
        fk.scaled_dot_product_attention(q, k, bad)


def test_unsupported_torch_arguments(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        fk.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((7, 9), bool))
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported"):
        fk.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p=0.5 is not supported"):
        fk.flash_attn_func(q, k, v, 0.5)


def test_mixed_devices(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q, k and v must be on one device, got q on cpu:0, k on cuda:0, v on cpu:0"):
        fk.flash_attn_func(q, FakeCudaArray(), v)
    with pytest.raises(ValueError, match="must be on one device"):
        fk.flash_attn_func(FakeCudaArray(0), FakeCudaArray(1), FakeCudaArray(0))


@pytest.mark.skipif(fk.cuda_available(), reason="checks the error raised without a usable GPU")
def test_cuda_input_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        fk.flash_attn_func(FakeCudaArray(), FakeCudaArray(), FakeCudaArray())
    with pytest.raises(RuntimeError, match="CUDA"):
        fk._native.check_cuda(0)


def test_unknown_device_type(qkv):
    class OnVulkan(FakeCudaArray):
        def __dlpack_device__(self):
            return (7, 0)

    with pytest.raises(ValueError, match="only CPU and CUDA are supported"):
        fk.flash_attn_func(OnVulkan(), OnVulkan(), OnVulkan())


def _outputs(qkv, **kw):
    """Capsules of freshly allocated (out, lse) for the native forward, from its shapes."""
    out_shape, lse_shape, _ = fk._native.attention_shapes(
        *(list(x.shape) for x in qkv), heads_first=False, causal=False, **kw
    )
    return np.empty(out_shape, qkv[0].dtype).__dlpack__(), np.empty(lse_shape, np.float32).__dlpack__()


def test_native_rejects_non_capsules_and_reused_capsules(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="q: expected a DLPack capsule, got ndarray"):
        fk._native.attention_forward(q, k, v, *_outputs(qkv), heads_first=False, causal=False)
    caps = [x.__dlpack__() for x in qkv]
    fk._native.attention_forward(*caps, *_outputs(qkv), heads_first=False, causal=False)
    with pytest.raises(ValueError, match="q: the capsule is not an unconsumed DLPack tensor"):
        fk._native.attention_forward(*caps, *_outputs(qkv), heads_first=False, causal=False)


def test_native_checks_outputs(qkv):
    q, k, v = qkv
    out_shape, lse_shape, _ = fk._native.attention_shapes(
        *(list(x.shape) for x in qkv), heads_first=False, causal=False
    )
    lse = lambda: np.empty(lse_shape, np.float32).__dlpack__()  # noqa: E731
    wrong_shape = np.empty((1, 2, 3, 4), np.float32).__dlpack__()
    with pytest.raises(ValueError, match=r"out must be float32 \[2, 7, 3, 16\]"):
        fk._native.attention_forward(
            *(x.__dlpack__() for x in qkv), wrong_shape, lse(), heads_first=False, causal=False
        )

    out = np.empty(out_shape, np.float32)
    out.flags.writeable = False
    read_only = out.__dlpack__(max_version=(1, 0))
    with pytest.raises(ValueError, match="out is read-only"):
        fk._native.attention_forward(*(x.__dlpack__() for x in qkv), read_only, lse(), heads_first=False, causal=False)

    with pytest.raises(TypeError, match="out: expected a DLPack capsule, got NoneType"):
        fk._native.attention_forward(*(x.__dlpack__() for x in qkv), None, lse(), heads_first=False, causal=False)

    short_lse = np.empty(lse_shape[:-1] + [lse_shape[-1] - 1], np.float32).__dlpack__()
    with pytest.raises(ValueError, match="lse must be float32"):
        fk._native.attention_forward(
            *(x.__dlpack__() for x in qkv),
            np.empty(out_shape, np.float32).__dlpack__(),
            short_lse,
            heads_first=False,
            causal=False,
        )


@pytest.mark.skipif(fk.cuda_available(), reason="checks the error raised without a usable GPU")
def test_device_buffer_without_cuda():
    if not hasattr(fk._native, "DeviceBuffer"):
        pytest.skip("built without CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        fk._native.DeviceBuffer(0, [2, 3], "float16")
    with pytest.raises(TypeError, match='dtype "int8" is not supported'):
        fk._native.DeviceBuffer(0, [2, 3], "int8")


# ---- GQA, windows, varlen, backward


def test_heads_not_a_multiple(randn):
    q, k = randn(1, 5, 6, 8), randn(1, 5, 4, 8)
    with pytest.raises(ValueError, match="q has 6 heads, which is not a multiple of k/v's 4 heads"):
        fk.flash_attn_func(q, k, k)
    t = lambda x: x.swapaxes(1, 2)  # noqa: E731
    with pytest.raises(ValueError, match="not a multiple"):
        fk.scaled_dot_product_attention(t(q), t(k), t(k), enable_gqa=True)


def test_sdpa_gqa_needs_enable_gqa(randn):
    q, k = randn(1, 4, 5, 8), randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="query has 4 heads but key has 2: pass enable_gqa=True"):
        fk.scaled_dot_product_attention(q, k, k)
    fk.scaled_dot_product_attention(q, k, k, enable_gqa=True)


@pytest.mark.parametrize("window", [(-2, 0), (0, -5), (-3, -3)])
def test_negative_window(qkv, window):
    with pytest.raises(ValueError, match=r"window_size=\(.*\): each side must be >= 0, or -1 for unbounded"):
        fk.flash_attn_func(*qkv, window_size=window)


@pytest.mark.parametrize("window", [3, (1, 2, 3), ("a", 1), (1.5, 0), None])
def test_window_of_wrong_type(qkv, window):
    with pytest.raises(TypeError, match="window_size must be a pair"):
        fk.flash_attn_func(*qkv, window_size=window)


def test_native_rejects_negative_windows(qkv):
    for side in ("window_left", "window_right"):
        with pytest.raises(ValueError, match=f"{side} must be a non-negative int, or None for unbounded, got -1"):
            fk._native.attention_forward(
                *(x.__dlpack__() for x in qkv), *_outputs(qkv), heads_first=False, causal=False, **{side: -1}
            )
        with pytest.raises(ValueError, match=f"{side} must be a non-negative int, or None for unbounded, got -1"):
            fk._native.attention_shapes(*(list(x.shape) for x in qkv), heads_first=False, causal=False, **{side: -1})


@pytest.fixture
def packed(randn):
    """Packed q (10 rows), k/v (12 rows), two heads, and valid offsets."""
    return (
        randn(10, 2, 8),
        randn(12, 2, 8),
        randn(12, 2, 8),
        np.array([0, 4, 10], np.int32),
        np.array([0, 5, 12], np.int32),
    )


@pytest.mark.parametrize(
    "cu_q, message",
    [
        ([0, 6, 4, 10], r"cu_seqlens_q: must be non-decreasing, but offset 1 is 6 and offset 2 is 4"),
        ([0, 4, 11], r"cu_seqlens_q: ends at 11 but the packed tensor has 10 rows"),
        ([0, 4, 9], r"cu_seqlens_q: ends at 9 but the packed tensor has 10 rows"),
        ([1, 4, 10], r"cu_seqlens_q: must start at 0, got 1"),
        ([0], r"cu_seqlens_q: needs batch \+ 1 >= 2 offsets, got 1"),
        ([0, -1, 10], r"must be non-decreasing"),
        ([0, 10], r"cu_seqlens_q has 2 offsets but cu_seqlens_k has 3"),
    ],
)
def test_bad_cu_seqlens(packed, cu_q, message):
    q, k, v, _, cu_k = packed
    with pytest.raises(ValueError, match=message):
        fk.flash_attn_varlen_func(q, k, v, np.array(cu_q, np.int32), cu_k, 10, 10)
    with pytest.raises(ValueError, match=message):
        fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k.tolist(), 10, 10)


def test_cu_seqlens_outside_int32(packed):
    q, k, v, cu_q, cu_k = packed
    with pytest.raises(ValueError, match="cu_seqlens_k: offset 2 is 4294967296, outside the int32 range"):
        fk.flash_attn_varlen_func(q, k, v, cu_q, [0, 5, 2**32], 10, 2**32)


@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.int16, np.float32])
def test_cu_seqlens_must_be_int32(packed, dtype):
    q, k, v, cu_q, cu_k = packed
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=f"cu_seqlens_q must be int32 \\(as flash-attn takes it\\), got {name}"):
        fk.flash_attn_varlen_func(q, k, v, cu_q.astype(dtype), cu_k, 10, 10)
    with pytest.raises(TypeError, match=f"cu_seqlens_k must be int32.*got {name}"):
        fk.attention_backward(
            q, k, v, q, np.zeros((2, 10), np.float32), q, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k.astype(dtype)
        )


def test_cu_seqlens_shape_and_type(packed):
    q, k, v, cu_q, cu_k = packed
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be one-dimensional.*\(1, 3\)"):
        fk.flash_attn_varlen_func(q, k, v, cu_q[None], cu_k, 10, 10)
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32 array or tensor, got str"):
        fk.flash_attn_varlen_func(q, k, v, "0,4,10", cu_k, 10, 10)
    with pytest.raises(TypeError, match="cu_seqlens_q must hold ints"):
        fk.flash_attn_varlen_func(q, k, v, [0, 4.0, 10], cu_k, 10, 10)


def test_cu_seqlens_together(packed):
    q, k, v, cu_q, cu_k = packed
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must be given together"):
        fk.attention_backward(q, k, v, q, np.zeros((2, 10), np.float32), q, cu_seqlens_q=cu_q)

    out, lse = np.empty(q.shape, q.dtype), np.empty((2, 10), np.float32)
    with pytest.raises(ValueError, match="must be given together"):
        fk._native.attention_forward(
            *(x.__dlpack__() for x in (q, k, v, out, lse)), heads_first=False, causal=False, cu_seqlens_k=[0, 12]
        )


def test_varlen_layout(packed, randn):
    q, k, v, cu_q, cu_k = packed
    with pytest.raises(ValueError, match=r"q: expected a rank-3 tensor \(total_seqlen, heads, head_dim\)"):
        fk.flash_attn_varlen_func(q[None], k, v, cu_q, cu_k, 10, 10)

    out, lse = np.empty(q.shape, q.dtype), np.empty((2, 10), np.float32)
    with pytest.raises(ValueError, match="heads_first must be False"):
        fk._native.attention_forward(
            q.__dlpack__(),
            k.__dlpack__(),
            v.__dlpack__(),
            out.__dlpack__(),
            lse.__dlpack__(),
            heads_first=True,
            causal=False,
            cu_seqlens_q=[0, 4, 10],
            cu_seqlens_k=[0, 5, 12],
        )


def test_max_seqlen_too_small(packed):
    q, k, v, cu_q, cu_k = packed
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is smaller than the longest sequence \(6\) in cu_seqlens_q"):
        fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 7)
    with pytest.raises(ValueError, match=r"max_seqlen_k=6 is smaller than the longest sequence \(7\) in cu_seqlens_k"):
        fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int, got float"):
        fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6.0, 7)


@pytest.fixture
def fwd(randn):
    """q, k, v (GQA: 4 and 2 heads), out, lse and dout of a causal call."""
    q, k, v = randn(2, 7, 4, 16), randn(2, 9, 2, 16), randn(2, 9, 2, 16)
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    return q, k, v, out, lse, randn(2, 7, 4, 16)


def test_backward_mismatched_shapes(fwd):
    q, k, v, out, lse, dout = fwd
    with pytest.raises(ValueError, match=r"dout has shape \[2, 6, 4, 16\], expected q's \[2, 7, 4, 16\]"):
        fk.attention_backward(q, k, v, out, lse, dout[:, :6], causal=True)
    with pytest.raises(ValueError, match=r"out has shape \[2, 7, 2, 16\], expected q's"):
        fk.attention_backward(q, k, v, out[:, :, :2], lse, dout, causal=True)
    with pytest.raises(ValueError, match=r"lse has shape \[2, 4, 6\], expected \[2, 4, 7\] \(the forward's lse\)"):
        fk.attention_backward(q, k, v, out, lse[..., :6], dout, causal=True)
    with pytest.raises(ValueError, match=r"lse has shape \[4, 7\], expected \[2, 4, 7\]"):
        fk.attention_backward(q, k, v, out, lse[0], dout, causal=True)
    with pytest.raises(
        ValueError, match=r"shape mismatch: k has shape \[2, 9, 2, 16\] but v has shape \[2, 8, 2, 16\]"
    ):
        fk.attention_backward(q, k, v[:, :8], out, lse, dout, causal=True)
    with pytest.raises(ValueError, match=r"dout: expected a rank-4 tensor"):
        fk.attention_backward(q, k, v, out, lse, dout[0], causal=True)


def test_backward_mismatched_dtypes(fwd):
    q, k, v, out, lse, dout = fwd
    with pytest.raises(TypeError, match="dtype mismatch: dout is float16 but q is float32"):
        fk.attention_backward(q, k, v, out, lse, dout.astype(np.float16))
    with pytest.raises(TypeError, match="dtype mismatch: out is float16 but q is float32"):
        fk.attention_backward(q, k, v, out.astype(np.float16), lse, dout)
    with pytest.raises(TypeError, match="lse: dtype float16 is not supported here"):
        fk.attention_backward(q, k, v, out, lse.astype(np.float16), dout)
    with pytest.raises(TypeError, match="dout: dtype float64 is not supported"):
        fk.attention_backward(q, k, v, out, lse, dout.astype(np.float64))


def test_backward_mixed_devices_and_non_arrays(fwd):
    q, k, v, out, lse, dout = fwd
    with pytest.raises(ValueError, match=r"q, k, v, out, lse and dout must be on one device, got .*lse on cuda:0"):
        fk.attention_backward(q, k, v, out, FakeCudaArray(), dout)
    with pytest.raises(TypeError, match="dout: expected an array or tensor that supports DLPack"):
        fk.attention_backward(q, k, v, out, lse, [1.0])


def test_backward_bad_options(fwd):
    q, k, v, out, lse, dout = fwd
    with pytest.raises(ValueError, match="window_size"):
        fk.attention_backward(q, k, v, out, lse, dout, window_size=(-2, 0))
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        fk.attention_backward(q, k, v, out, lse, dout, softmax_scale=-1.0)


def test_native_backward_checks_outputs(fwd):
    q, k, v, out, lse, dout = fwd
    caps = lambda: [x.__dlpack__() for x in (q, k, v, out, lse, dout)]  # noqa: E731
    q_shape, _, kv_shape = fk._native.attention_shapes(
        list(q.shape), list(k.shape), list(v.shape), heads_first=False, causal=True
    )
    assert (tuple(q_shape), tuple(kv_shape)) == ((2, 7, 4, 16), (2, 9, 2, 16))
    empty = lambda s: np.empty(s, np.float32).__dlpack__()  # noqa: E731

    with pytest.raises(TypeError, match="missing 1 required positional argument: 'dv'"):
        fk._native.attention_backward(*caps(), empty(q_shape), empty(kv_shape), heads_first=False, causal=True)

    with pytest.raises(ValueError, match=r"dk must be float32 \[2, 9, 2, 16\], got float32 \[2, 7, 4, 16\]"):
        fk._native.attention_backward(
            *caps(), empty(q_shape), empty(q_shape), empty(kv_shape), heads_first=False, causal=True
        )

    dv = np.empty(kv_shape, np.float32)
    dv.flags.writeable = False
    with pytest.raises(ValueError, match="dv is read-only"):
        fk._native.attention_backward(
            *caps(), empty(q_shape), empty(kv_shape), dv.__dlpack__(max_version=(1, 0)), heads_first=False, causal=True
        )


def test_backward_releases_inputs(fwd):
    """Every capsule is handed back on success and on error (numpy's references drop)."""
    q, k, v, out, lse, dout = fwd
    before = [sys.getrefcount(x) for x in fwd]
    for _ in range(3):
        fk.attention_backward(q, k, v, out, lse, dout, causal=True)
        with pytest.raises(ValueError):
            fk.attention_backward(q, k, v, out, lse, dout[:, :3], causal=True)
    assert [sys.getrefcount(x) for x in fwd] == before
