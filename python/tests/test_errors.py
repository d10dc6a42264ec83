"""Every error path: the exception type and what its message says."""

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
    with pytest.raises(ValueError, match=r"q: expected a rank-4 tensor \(batch, seqlen, heads, head_dim\).*\[2, 7, 48\]"):
        fk.flash_attn_func(q.reshape(2, 7, 48), k, v)
    with pytest.raises(ValueError, match=r"k: expected a rank-4 tensor \(batch, heads, seqlen, head_dim\)"):
        fk.scaled_dot_product_attention(q, k[0], v)
    with pytest.raises(ValueError, match="rank-4"):
        fk.flash_attn_func(np.array(1.0, np.float32), k, v)


def test_mismatched_shapes(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"shape mismatch: k has shape \[2, 9, 3, 16\] but v has shape \[2, 8, 3, 16\]"):
        fk.flash_attn_func(q, k, v[:, :8])
    with pytest.raises(ValueError, match="must agree on batch, heads and head_dim"):
        fk.flash_attn_func(q[..., :8], k, v)
    with pytest.raises(ValueError, match="must agree on batch, heads and head_dim"):
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


def test_native_rejects_non_capsules_and_reused_capsules(qkv):
    q, k, v = qkv

    def alloc(out_shape, lse_shape, dtype):
        return np.empty(out_shape, dtype).__dlpack__(), np.empty(lse_shape, np.float32).__dlpack__()

    with pytest.raises(TypeError, match="q: expected a DLPack capsule, got ndarray"):
        fk._native.attention_forward(q, k, v, alloc, heads_first=False, causal=False)
    caps = [x.__dlpack__() for x in qkv]
    fk._native.attention_forward(*caps, alloc, heads_first=False, causal=False)
    with pytest.raises(ValueError, match="q: the capsule is not an unconsumed DLPack tensor"):
        fk._native.attention_forward(*caps, alloc, heads_first=False, causal=False)


def test_native_checks_outputs(qkv):
    q, k, v = qkv

    def wrong_shape(out_shape, lse_shape, dtype):
        return np.empty((1, 2, 3, 4), dtype).__dlpack__(), np.empty(lse_shape, np.float32).__dlpack__()

    with pytest.raises(ValueError, match=r"out must be float32 \[2, 7, 3, 16\]"):
        fk._native.attention_forward(*(x.__dlpack__() for x in qkv), wrong_shape, heads_first=False, causal=False)

    def read_only(out_shape, lse_shape, dtype):
        out = np.empty(out_shape, dtype)
        out.flags.writeable = False
        return out.__dlpack__(max_version=(1, 0)), np.empty(lse_shape, np.float32).__dlpack__()

    with pytest.raises(ValueError, match="out is read-only"):
        fk._native.attention_forward(*(x.__dlpack__() for x in qkv), read_only, heads_first=False, causal=False)

    def not_a_pair(out_shape, lse_shape, dtype):
        return None

    with pytest.raises(TypeError, match=r"alloc must return a tuple \(out, lse\)"):
        fk._native.attention_forward(*(x.__dlpack__() for x in qkv), not_a_pair, heads_first=False, causal=False)

    def raises(out_shape, lse_shape, dtype):
        raise MemoryError("no memory")

    with pytest.raises(MemoryError, match="no memory"):
        fk._native.attention_forward(*(x.__dlpack__() for x in qkv), raises, heads_first=False, causal=False)


@pytest.mark.skipif(fk.cuda_available(), reason="checks the error raised without a usable GPU")
def test_device_buffer_without_cuda():
    if not hasattr(fk._native, "DeviceBuffer"):
        pytest.skip("built without CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        fk._native.DeviceBuffer(0, [2, 3], "float16")
    with pytest.raises(TypeError, match='dtype "int8" is not supported'):
        fk._native.DeviceBuffer(0, [2, 3], "int8")
