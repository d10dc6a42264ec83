"""Reformer LSH self-attention (Kitaev et al. 2020): the public functions and their DLPack glue.

``lsh_attention(qk, v, rotations, chunk_length=C)`` is Hugging Face's ``LSHSelfAttention``
(transformers 5.x) before its output dense, per batch element and head:

- hashing (shared QK): round r's bucket of token i is the first argmax of
  ``[x R_r ; -x R_r]`` for x = qk[b, i, h] and R_r = rotations[h, :, r, :] (H, D,
  n_hashes, n_buckets / 2), offset by r · n_buckets (r · (n_buckets + 1) when some token
  of the batch is padded: padded tokens then get the extra bucket n_buckets);
- the n_hashes · N positions of all rounds are stably sorted by bucket and cut into chunks
  of C; a query attends to its chunk and ``chunks_before`` / ``chunks_after`` neighbours,
  circularly over all rounds, with keys k = qk / ||qk||_rms / sqrt(D); causal and padded
  keys' scores are replaced by -1e9, the query's own token by -1e5 (float16: -1e4 and
  -1e3);
- per round a softmax (its logsumexp lse_r), the rounds combined with weights
  softmax_r(lse_r), written back in token order.

N <= C is full shared-QK attention with the same masks (no hashing, no buckets); when
N > C, N must be a multiple of C. ``buckets`` (B, H, n_hashes, N), as the forward returns
them (``return_buckets=True``) and HF's ``LSHSelfAttention`` returns them, skip the
hashing: passing a forward's buckets back reproduces its output.

numpy (and any CPU DLPack array) runs the CPU reference (float64 inside; O rounded once
to the dtype, the per-round LSE to float32); CUDA tensors (float16 / bfloat16, D <= 128)
run the kernels (kernels/reformer: f32 hashing and attention, the rotations read as
float32); torch tensors are differentiable in qk and v (see ``_torch_reformer``). The
mask and the buckets are read on the host (the buckets the forward used come back
through the host too).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

from . import _native
from ._dlpack import (
    Placement,
    check_arrays,
    check_bool,
    check_int,
    check_not_traced,
    dtype_name,
    framework,
    is_torch,
    shape_list,
)
from ._linformer import HostMask, host_mask

# (bytes, shape): host buckets as the native module takes and returns them (int32).
HostBuckets = Tuple[bytes, Tuple[int, ...]]
# The buckets a forward used: HostBuckets, or the int32 device array (torch / cupy) the
# kernels wrote them to.
UsedBuckets = Union[HostBuckets, Any]

_INPUTS = ("qk", "v", "rotations")
_INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


class Options(NamedTuple):
    """A call's options, checked: C, chunks before / after, causal, the bucket count
    (None: twice the rotations' last dim)."""

    chunk_length: int
    chunks_before: int = 1
    chunks_after: int = 0
    causal: bool = False
    n_buckets: Optional[int] = None

    def kwargs(self) -> dict:
        return self._asdict()


def options(chunk_length: Any, chunks_before: Any, chunks_after: Any, causal: Any, n_buckets: Any) -> Options:
    """The options checked for type (TypeError) and sign (ValueError); their meaning (C = 0,
    an odd bucket count, N not a multiple of C) is the native validator's."""
    return Options(
        check_int("chunk_length", chunk_length),
        check_int("chunks_before", chunks_before),
        check_int("chunks_after", chunks_after),
        check_bool("causal", causal),
        None if n_buckets is None else check_int("n_buckets", n_buckets),
    )


def host_buckets(b: Any) -> Optional[HostBuckets]:
    """Buckets (B, H, n_hashes, N) of any integer dtype and framework (HF's int64, the
    forward's), as contiguous int32 host bytes and their shape. A float or bool array is
    a TypeError; values outside int32 a ValueError (their range per round is checked by
    the native module). Device tensors are copied to the host (a synchronization)."""
    name = "buckets"
    if b is None:
        return None
    fw = framework(b)
    if fw == "torch":
        import torch

        t = b.detach()
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64 as HF returns them), got {t.dtype}")
        t = t.to("cpu")
        shape = tuple(int(n) for n in t.shape)
        if t.numel() and (int(t.min()) < _I32_MIN or int(t.max()) > _I32_MAX):
            raise ValueError(f"{name}: values outside the int32 range (no bucket count is that large)")
        t = t.to(torch.int32).contiguous()
        try:
            data = t.numpy().tobytes()
        except (ImportError, RuntimeError):  # torch without numpy
            import struct

            data = struct.pack(f"={t.numel()}i", *t.reshape(-1).tolist())
        return data, shape
    check_not_traced(name, b)
    if fw == "cupy":
        b = b.get()
    import numpy as np

    try:
        a = np.asarray(b)
    except Exception as e:  # e.g. a ragged nested list
        raise TypeError(f"{name} must be a (batch, heads, n_hashes, seqlen) integer array: {e}") from None
    if a.dtype.name not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer array (int64 as HF returns them), got dtype {a.dtype}")
    if a.size and (int(a.min()) < _I32_MIN or int(a.max()) > _I32_MAX):
        raise ValueError(f"{name}: values outside the int32 range (no bucket count is that large)")
    a = np.ascontiguousarray(a, dtype=np.int32)
    return a.tobytes(), tuple(int(n) for n in a.shape)


def buckets_array(data: Optional[bytes], shape: Optional[Sequence[int]], like: Any) -> Any:
    """The native module's int32 bucket bytes as an int64 array of ``like``'s framework
    (numpy for host arrays of other frameworks; torch on like's device); None stays None."""
    if data is None or shape is None:
        return None
    if is_torch(like):
        import torch

        t = torch.frombuffer(bytearray(data), dtype=torch.int32) if data else torch.empty(0, dtype=torch.int32)
        return t.to(torch.int64).reshape(tuple(shape)).to(like.device)
    import numpy as np

    a = np.frombuffer(data, dtype=np.int32).astype(np.int64).reshape(tuple(shape))
    if framework(like) == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return a


def _kernel_rotations(place: Placement, rot: Any) -> Any:
    """The rotations as the CUDA kernels read them: float32, contiguous (a small copy
    where they are not). Host calls keep them as given (the reference reads any float
    dtype and strides)."""
    if not place.for_cuda:
        return rot
    if place.fw == "torch":
        return rot.float().contiguous()
    if place.fw == "cupy":
        import cupy

        with cupy.cuda.Device(place.dev_id):
            return cupy.ascontiguousarray(rot, dtype=cupy.float32)
    import jax.numpy as jnp

    return jnp.asarray(rot, dtype=jnp.float32)


def ref_shapes(
    tensors: Sequence[Any], mask: Optional[HostMask], buckets: Optional[HostBuckets], opts: Options
) -> Tuple[tuple, tuple, Optional[tuple]]:
    """(out, lse, buckets or None) shapes, validated by the native module."""
    qk, v, rot = tensors
    out, lse, bk = _native.reformer_shapes(
        shape_list(qk),
        shape_list(v),
        shape_list(rot),
        None if mask is None else list(mask[1]),
        None if buckets is None else list(buckets[1]),
        **opts.kwargs(),
    )
    return tuple(out), tuple(lse), None if bk is None else tuple(bk)


def ref_forward(
    tensors: Sequence[Any], mask: Optional[HostMask], buckets: Optional[HostBuckets], opts: Options
) -> Tuple[Any, Any, Optional[UsedBuckets]]:
    """(out, lse) in the caller's framework and the buckets used (None when N <= C) from
    (qk, v, rotations): host int32 bytes, or, where the kernels hashed them for torch /
    cupy CUDA tensors, the int32 device array they were written to (no copy to the host,
    no wait for the stream)."""
    place = Placement(list(zip(_INPUTS, tensors)))
    out_s, lse_s, bk_s = ref_shapes(tensors, mask, buckets, opts)
    tensors = (tensors[0], tensors[1], _kernel_rotations(place, tensors[2]))
    out = place.empty(out_s, dtype_name(tensors[0]))
    lse = place.empty(lse_s, "float32")
    on_device = place.for_cuda and place.fw in ("torch", "cupy") and bk_s is not None and buckets is None
    dev_bk = place.empty(bk_s, "int32") if on_device else None
    used = _native.reformer_forward(
        *(place.export(n, t) for n, t in zip(_INPUTS, tensors)),
        place.export("out", out),
        place.export("lse", lse),
        mask,
        buckets,
        None if dev_bk is None else place.export("buckets_out", dev_bk),
        **opts.kwargs(),
        stream=place.stream,
    )
    if dev_bk is not None:
        bk: Optional[UsedBuckets] = dev_bk
    else:
        bk = None if used is None or bk_s is None else (bytes(used), bk_s)
    return place.to_caller(out), place.to_caller(lse), bk


def used_host(used: Optional[UsedBuckets]) -> Optional[HostBuckets]:
    """A forward's buckets as host bytes (a device array is copied: a wait for it)."""
    if used is None or isinstance(used, tuple):
        return used
    return host_buckets(used)


def used_array(used: Optional[UsedBuckets], like: Any) -> Any:
    """A forward's buckets as int64 in like's framework (on like's device); None stays None."""
    if used is None:
        return None
    if isinstance(used, tuple):
        return buckets_array(used[0], used[1], like)
    if is_torch(used):
        import torch

        return used.to(torch.int64)
    return used.astype("int64")  # cupy


def ref_backward(
    tensors: Sequence[Any],
    out: Any,
    lse: Any,
    dout: Any,
    mask: Optional[HostMask],
    buckets: Optional[HostBuckets],
    opts: Options,
) -> Tuple[Any, Any]:
    """(dqk, dv), shaped like qk and v in qk's dtype, the buckets held fixed (the given
    ones, or hashed again)."""
    extra = [("out", out), ("lse", lse), ("grad_output", dout)]
    place = Placement(list(zip(_INPUTS, tensors)) + extra)
    ref_shapes(tensors, mask, buckets, opts)  # validates before allocating
    tensors = (tensors[0], tensors[1], _kernel_rotations(place, tensors[2]))
    dtype = dtype_name(tensors[0])
    grads = [place.empty(tuple(shape_list(t)), dtype) for t in tensors[:2]]
    _native.reformer_backward(
        *(place.export(n, t) for n, t in zip(_INPUTS, tensors)),
        *(place.export(n, t) for n, t in extra),
        place.export("dqk", grads[0]),
        place.export("dv", grads[1]),
        mask,
        buckets,
        **opts.kwargs(),
        stream=place.stream,
    )
    return place.to_caller(grads[0]), place.to_caller(grads[1])


def _results(out: Any, lse: Any, buckets: Any, return_aux: bool, return_buckets: bool) -> Any:
    if return_aux:
        return out, lse, buckets
    if return_buckets:
        return out, buckets
    return out


def lsh_attention(
    qk: Any,
    v: Any,
    rotations: Any,
    *,
    chunk_length: int,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal: bool = False,
    n_buckets: Optional[int] = None,
    key_padding_mask: Any = None,
    buckets: Any = None,
    return_buckets: bool = False,
    return_aux: bool = False,
) -> Any:
    """Reformer LSH attention, Hugging Face's ``LSHSelfAttention`` before its output
    dense (see the module docs).

    Arguments
        qk: (B, N, H, D), the shared query/key projection; v: (B, N, H, D); one dtype
            (float32, float16, bfloat16), any strides with a unit head-dim stride.
        rotations: (H, D, n_hashes, n_buckets / 2), a float array of any of those dtypes
            and strides (HF: ``torch.manual_seed(hash_seed); torch.randn((H, D,
            n_hashes, n_buckets // 2))``).
        chunk_length: C > 0 (``lsh_attn_chunk_length``). N > C: N a multiple of C;
            N <= C: full attention, no hashing.
        chunks_before, chunks_after: neighbouring chunks each chunk attends to
            (``lsh_num_chunks_before`` / ``_after``).
        causal: keys after the query are masked (``is_decoder``).
        n_buckets: the bucket count, if stated (``num_buckets``): even, twice the
            rotations' last dim.
        key_padding_mask: None or a (B, N) boolean mask, True = padded token (HF:
            ``attention_mask == 0``).
        buckets: None, or the integer buckets (B, H, n_hashes, N) of an earlier call (the
            forward's, or HF's) to use instead of hashing (N > C only).
        return_buckets: also return the buckets used, int64 (B, H, n_hashes, N) in the
            caller's framework (None when N <= C): ``(out, buckets)``.
        return_aux: return ``(out, lse, buckets)``, lse the float32 per-round logsumexp
            (B, H, rounds, N) (rounds = n_hashes, 1 when N <= C), as the backward takes it.

    Returns out (B, N, H, D), contiguous, in qk's dtype, of the caller's array type. torch
    tensors are differentiable in qk and v (the rotations and buckets get no gradient).
    An odd bucket count, rotations of the wrong shape, C = 0, N > C not a multiple of C,
    buckets of the wrong shape or range raise ValueError; dtypes TypeError. CUDA tensors
    run the kernels: float16 / bfloat16, head dim <= 128 (others a ValueError).
    """
    opts = options(chunk_length, chunks_before, chunks_after, causal, n_buckets)
    return_buckets = check_bool("return_buckets", return_buckets)
    return_aux = check_bool("return_aux", return_aux)
    tensors = (qk, v, rotations)
    check_arrays(list(zip(_INPUTS, tensors)))
    if is_torch(qk):
        from . import _torch_reformer

        out, lse, bk = _torch_reformer.forward(qk, v, rotations, key_padding_mask, buckets, opts)
        return _results(out, lse, bk, return_aux, return_buckets)
    out, lse, used = ref_forward(tensors, host_mask(key_padding_mask), host_buckets(buckets), opts)
    return _results(out, lse, used_array(used, qk), return_aux, return_buckets)


def lsh_attention_backward(
    grad_output: Any,
    qk: Any,
    v: Any,
    rotations: Any,
    out: Any,
    lse: Any,
    *,
    chunk_length: int,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal: bool = False,
    n_buckets: Optional[int] = None,
    key_padding_mask: Any = None,
    buckets: Any = None,
) -> Tuple[Any, Any]:
    """The gradients ``(dqk, dv)`` of :func:`lsh_attention` for a gradient ``grad_output``
    (qk's shape) of its output, for frameworks whose autograd flashkernels does not plug
    into (numpy): ``out`` and ``lse`` as the forward returned them (``return_aux=True``),
    the forward's inputs and options, and its ``buckets`` to hold fixed (None: hashed
    again from the rotations, which gives the forward's when it hashed them). Each
    gradient is shaped like its input, contiguous, in qk's dtype. Deterministic. With
    torch tensors it records nothing for autograd."""
    opts = options(chunk_length, chunks_before, chunks_after, causal, n_buckets)
    tensors = (qk, v, rotations)
    extra = [("out", out), ("lse", lse), ("grad_output", grad_output)]
    check_arrays(list(zip(_INPUTS, tensors)) + extra)
    if is_torch(qk):
        from . import _torch_reformer

        return _torch_reformer.backward(qk, v, rotations, out, lse, grad_output, key_padding_mask, buckets, opts)
    return ref_backward(tensors, out, lse, grad_output, host_mask(key_padding_mask), host_buckets(buckets), opts)


__all__ = ["lsh_attention", "lsh_attention_backward"]
