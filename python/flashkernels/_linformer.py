"""Linformer self-attention (Wang et al. 2020): the public functions and their DLPack glue.

``linformer_attention(q, k, v, e, f)`` computes, per batch element and head,

    O = softmax(scale · Q (E K̃)ᵀ) (F Ṽ)

with q (B, N, H, D), k and v (B, N, H_kv, D) (H a multiple of H_kv: query head h reads
K/V head h // (H // H_kv)), the projections e (He, k, N_max) and f (Hf, k, N_max), He and
Hf each 1 (one projection for every head, as lucidrains/linformer stores ``proj_k``
(N_max, k): pass ``proj_k.T[None]``) or H_kv, and f None for key-value sharing (F = E).
N <= N_max: a shorter sequence uses the first N columns of E and F. K̃, Ṽ are K and V
with the rows of padded keys (``key_padding_mask`` (B, N), True = padded) zeroed.

numpy (and any CPU DLPack array) runs the CPU reference (float64 inside; the projected
keys and values kp = E K̃, vp = F Ṽ rounded once to the dtype, O once); CUDA tensors run
the CUDA kernels; torch tensors are differentiable (see ``_torch_linformer``, which also
has ``LinformerAttention``, a drop-in for lucidrains' ``LinformerSelfAttention``). The
mask is read on the host.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from . import _native
from ._dlpack import (
    Placement,
    check_arrays,
    check_bool,
    check_not_traced,
    check_scale,
    dtype_name,
    framework,
    is_torch,
    shape_list,
)

# (bytes, shape): a host mask as the native module takes it (one byte per token).
HostMask = Tuple[bytes, Tuple[int, ...]]

_INPUTS = ("q", "k", "v", "e", "f")


def host_mask(m: Any) -> Optional[HostMask]:
    """The key padding mask, a (B, N) boolean array or tensor of any framework (True =
    padded), as host bytes and its shape. Only booleans: an integer or float mask is a
    TypeError (torch's float masks are additive, not flags). Device masks are copied to
    the host (a synchronization)."""
    name = "key_padding_mask"
    if m is None:
        return None
    fw = framework(m)
    if fw == "torch":
        import torch

        t = m.detach()
        if t.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor (True = padded key), got {str(t.dtype).rpartition('.')[2]}")
        t = t.to(device="cpu", dtype=torch.uint8).contiguous()
        shape = tuple(int(n) for n in t.shape)
        try:
            data = t.numpy().tobytes()
        except (ImportError, RuntimeError):  # torch without numpy
            data = bytes(t.reshape(-1).tolist())
        return data, shape
    check_not_traced(name, m)
    if fw == "cupy":
        m = m.get()
    import numpy as np

    try:
        a = np.asarray(m)
    except Exception as e:  # e.g. a ragged nested list
        raise TypeError(f"{name} must be a (batch, seqlen) boolean array: {e}") from None
    if a.dtype.kind != "b":
        raise TypeError(f"{name} must be a boolean array (True = padded key), got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return a.tobytes(), tuple(int(n) for n in a.shape)


def _named(tensors: Sequence[Any]) -> List[Tuple[str, Any]]:
    """(name, array) of q, k, v, e (always: a None among them is named in the TypeError)
    and f when given."""
    return [(n, t) for i, (n, t) in enumerate(zip(_INPUTS, tensors)) if i < 4 or t is not None]


def lin_shapes(tensors: Sequence[Any], mask: Optional[HostMask], scale: Optional[float]) -> Tuple[tuple, ...]:
    """(out, lse, kp, vp) shapes, validated by the native module."""
    q, k, v, e, f = tensors
    shapes = _native.linformer_shapes(
        shape_list(q),
        shape_list(k),
        shape_list(v),
        shape_list(e),
        None if f is None else shape_list(f),
        None if mask is None else list(mask[1]),
        scale=scale,
    )
    return tuple(tuple(s) for s in shapes)


def lin_forward(tensors: Sequence[Any], mask: Optional[HostMask], scale: Optional[float]) -> Tuple[Any, Any, Any, Any]:
    """(out, lse, kp, vp) in the caller's framework from (q, k, v, e, f), f None for F = E."""
    place = Placement(_named(tensors))
    out_s, lse_s, kp_s, vp_s = lin_shapes(tensors, mask, scale)
    dtype = dtype_name(tensors[0])
    outs = tuple(place.empty(s, t) for s, t in ((out_s, dtype), (lse_s, "float32"), (kp_s, dtype), (vp_s, dtype)))
    q, k, v, e, f = tensors
    _native.linformer_forward(
        place.export("q", q),
        place.export("k", k),
        place.export("v", v),
        place.export("e", e),
        *(place.export(n, t) for n, t in zip(("out", "lse", "kp", "vp"), outs)),
        None if f is None else place.export("f", f),
        mask,
        scale=scale,
        stream=place.stream,
    )
    return tuple(place.to_caller(t) for t in outs)  # type: ignore[return-value]


def lin_backward(
    tensors: Sequence[Any],
    out: Any,
    lse: Any,
    kp: Any,
    vp: Any,
    dout: Any,
    mask: Optional[HostMask],
    scale: Optional[float],
) -> Tuple[Any, Any, Any, Any, Any]:
    """(dq, dk, dv, de, df), df None when f is (F = E: de holds both contributions)."""
    extra = [("out", out), ("lse", lse), ("kp", kp), ("vp", vp), ("grad_output", dout)]
    place = Placement(_named(tensors) + extra)
    lin_shapes(tensors, mask, scale)  # validates before allocating
    dtype = dtype_name(tensors[0])
    grads = [None if t is None else place.empty(tuple(shape_list(t)), dtype) for t in tensors]
    q, k, v, e, f = tensors
    ex = lambda n, t: None if t is None else place.export(n, t)  # noqa: E731
    _native.linformer_backward(
        *(place.export(n, t) for n, t in zip(_INPUTS, (q, k, v, e))),
        *(place.export(n, t) for n, t in extra),
        *(place.export(n, t) for n, t in zip(("dq", "dk", "dv", "de"), grads)),
        ex("f", f),
        ex("df", grads[4]),
        mask,
        scale=scale,
        stream=place.stream,
    )
    return tuple(None if t is None else place.to_caller(t) for t in grads)  # type: ignore[return-value]


def _check_f(f: Any) -> None:
    if f is not None and not hasattr(f, "__dlpack__"):
        raise TypeError(f"f must be an array or tensor (or None for F = E), got {type(f).__name__}")


def linformer_attention(
    q: Any,
    k: Any,
    v: Any,
    e: Any,
    f: Any = None,
    *,
    key_padding_mask: Any = None,
    softmax_scale: Optional[float] = None,
    return_aux: bool = False,
) -> Any:
    """Linformer attention ``softmax(scale · Q (E K̃)ᵀ) (F Ṽ)`` (see the module docs).

    Arguments
        q: (B, N, H, D); k, v: (B, N, H_kv, D), H % H_kv == 0; any strides with a unit
            head-dim stride.
        e: (He, k, N_max), He 1 or H_kv, any strides (``proj_k.T[None]`` is a view).
        f: (Hf, k, N_max) likewise, or None: F = E (key-value sharing; pass v = k for
            lucidrains' ``share_kv``). k >= 1; N <= N_max.
        key_padding_mask: None or a (B, N) boolean mask, True = padded key (torch's
            convention): padded keys are left out of the projection and get zero
            gradients. A sequence with every key padded outputs 0.
        softmax_scale: default 1/sqrt(D).
        return_aux: also return the float32 log-sum-exp (B, H, N) of each scaled score
            row and the projected keys / values kp, vp (B, k, H_kv, D), as the backward
            takes them: ``(out, lse, kp, vp)``.

    One dtype (float32, float16, bfloat16) on one device. Returns out (B, N, H, D),
    contiguous, in q's dtype, of the caller's array type. torch tensors are
    differentiable in q, k, v, e and f (lse, kp and vp are not differentiable outputs).
    Mismatched shapes, k = 0 and N > N_max raise ValueError; dtypes TypeError.
    """
    scale = check_scale("softmax_scale", softmax_scale)
    return_aux = check_bool("return_aux", return_aux)
    _check_f(f)
    tensors = (q, k, v, e, f)
    check_arrays(_named(tensors))
    if is_torch(q):
        from . import _torch_linformer

        res = _torch_linformer.forward(q, k, v, e, f, key_padding_mask, scale)
    else:
        res = lin_forward(tensors, host_mask(key_padding_mask), scale)
    return tuple(res) if return_aux else res[0]


def linformer_attention_backward(
    grad_output: Any,
    q: Any,
    k: Any,
    v: Any,
    e: Any,
    out: Any,
    lse: Any,
    kp: Any,
    vp: Any,
    f: Any = None,
    *,
    key_padding_mask: Any = None,
    softmax_scale: Optional[float] = None,
) -> Tuple[Any, Any, Any, Any, Any]:
    """The gradients ``(dq, dk, dv, de, df)`` of :func:`linformer_attention` for a
    gradient ``grad_output`` (q's shape) of its output, for frameworks whose autograd
    flashkernels does not plug into (numpy): ``out``, ``lse``, ``kp``, ``vp`` as the
    forward returned them (``return_aux=True``), the forward's inputs and options. df is
    None when f is (F = E: de then holds both projections' gradients). Each gradient is
    shaped like its input (de like e, zero in the columns >= N), contiguous, q's dtype.
    Deterministic. With torch tensors it records nothing for autograd."""
    scale = check_scale("softmax_scale", softmax_scale)
    _check_f(f)
    tensors = (q, k, v, e, f)
    extra = [("out", out), ("lse", lse), ("kp", kp), ("vp", vp), ("grad_output", grad_output)]
    check_arrays(_named(tensors) + extra)
    if is_torch(q):
        from . import _torch_linformer

        return _torch_linformer.backward(q, k, v, e, f, out, lse, kp, vp, grad_output, key_padding_mask, scale)
    return lin_backward(tensors, out, lse, kp, vp, grad_output, host_mask(key_padding_mask), scale)


__all__ = ["linformer_attention", "linformer_attention_backward"]
