"""Attention's public functions (``scaled_dot_product_attention``, ``flash_attn_func``,
``flash_attn_varlen_func``, ``attention_backward``; see the package docs), their
argument checks, and the calls into the native module. torch tensors are routed to
``_torch`` (autograd, custom ops), imported on first use so that numpy / jax users never
import torch.
"""

from __future__ import annotations

import operator
from typing import Any, List, Optional, Tuple

from . import _native
from ._dlpack import (
    Placement,
    check_arrays,
    check_bool,
    check_int,
    check_not_traced,
    check_scale,
    dtype_name,
    is_bool,
    is_torch,
    shape_list,
)

# (left, right) as the native module takes it: None is unbounded (the public API's -1).
_Window = Tuple[Optional[int], Optional[int]]
# Host copies of (cu_seqlens_q, cu_seqlens_k), or None for a dense batch.
_Offsets = Optional[Tuple[List[int], List[int]]]


def scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on (batch, heads, seqlen, head_dim) tensors, like
    ``torch.nn.functional.scaled_dot_product_attention``.

    ``attn_mask`` and ``dropout_p`` exist so that torch's positional calls mean the same
    thing here; only their defaults are supported. ``scale`` defaults to 1/sqrt(head_dim).
    ``enable_gqa=True`` lets key and value have fewer heads than query (a divisor of
    them); without it the head counts must match, as in torch. Returns ``out``
    (B, H, Nq, D), or ``(out, lse)`` with ``return_lse=True``. torch tensors are
    differentiable (query, key, value).
    """
    _check_unsupported(attn_mask, dropout_p)
    check_arrays((("q", query), ("k", key), ("v", value)))
    is_causal = check_bool("is_causal", is_causal)
    scale = check_scale("scale", scale)
    return_lse = check_bool("return_lse", return_lse)
    if not check_bool("enable_gqa", enable_gqa):
        hq, hk = _dim(query, 1, 4), _dim(key, 1, 4)
        if hq is not None and hk is not None and hq != hk:
            raise ValueError(
                f"query has {hq} heads but key has {hk}: pass enable_gqa=True for "
                "grouped-query attention (as torch's scaled_dot_product_attention)"
            )
    return _dispatch_forward(
        (query, key, value),
        heads_first=True,
        causal=is_causal,
        scale=scale,
        window=(None, None),
        cu_seqlens=None,
        max_seqlens=None,
        return_lse=return_lse,
    )


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on (batch, seqlen, heads, head_dim) tensors, like flash-attn's
    ``flash_attn_func``. k and v may have fewer heads than q (GQA / MQA).

    ``window_size=(left, right)``: sliding-window attention, query i seeing keys
    i + Nk - Nq - left ..= i + Nk - Nq + right; -1 is unbounded. ``deterministic`` is
    accepted for compatibility: the backward is always deterministic. Returns ``out``
    (B, Nq, H, D), or ``(out, lse)``. torch tensors are differentiable (q, k, v).
    """
    _check_unsupported(None, dropout_p)
    check_arrays((("q", q), ("k", k), ("v", v)))
    check_bool("deterministic", deterministic)
    return _dispatch_forward(
        (q, k, v),
        heads_first=False,
        causal=check_bool("causal", causal),
        scale=check_scale("softmax_scale", softmax_scale),
        window=_window_size(window_size),
        cu_seqlens=None,
        max_seqlens=None,
        return_lse=check_bool("return_lse", return_lse),
    )


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on a variable-length batch, like flash-attn's ``flash_attn_varlen_func``.

    q is (total_q, heads, head_dim), k and v (total_k, heads_kv, head_dim): the B
    sequences packed along the first axis, sequence b owning rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (likewise for k, v). ``cu_seqlens_q`` and
    ``cu_seqlens_k`` are int32 arrays of B+1 non-decreasing offsets from 0 to the total
    (any framework, any device; read on the host, which synchronizes for device arrays),
    or lists of ints. ``max_seqlen_q`` / ``max_seqlen_k`` must be at least the longest
    sequence (flashkernels works out the lengths itself). Masking and windows apply per
    sequence. Returns ``out`` (total_q, H, D), or ``(out, lse)`` with lse (H, total_q).
    """
    _check_unsupported(None, dropout_p)
    check_arrays((("q", q), ("k", k), ("v", v)))
    check_bool("deterministic", deterministic)
    return _dispatch_forward(
        (q, k, v),
        heads_first=False,
        causal=check_bool("causal", causal),
        scale=check_scale("softmax_scale", softmax_scale),
        window=_window_size(window_size),
        cu_seqlens=(cu_seqlens_q, cu_seqlens_k),
        # Only compared with the longest sequence: anything past int64 is as good as 2**62.
        max_seqlens=(
            min(check_int("max_seqlen_q", max_seqlen_q, maximum=None), 2**62),
            min(check_int("max_seqlen_k", max_seqlen_k, maximum=None), 2**62),
        ),
        return_lse=check_bool("return_lse", return_lse),
    )


def attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dout: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
) -> Tuple[Any, Any, Any]:
    """Gradients ``(dq, dk, dv)`` of attention, in flash-attn's layout: q, k, v as given
    to the forward ((B, N, H, D), or packed (total, H, D) with ``cu_seqlens_q`` /
    ``cu_seqlens_k``), ``out`` and ``lse`` as the forward returned them
    (``return_lse=True``), ``dout`` the gradient of ``out``; the options must be the
    forward's. For GQA, dk and dv sum over each group's query heads. Returns arrays of
    the caller's type on the inputs' device, contiguous, in q's dtype. Deterministic.

    torch users get this through autograd; this function is for the others (numpy,
    cupy, jax outside tracing). With torch tensors it computes the same values, without
    recording anything for autograd.
    """
    window = _window_size(window_size)
    tensors = (q, k, v, out, lse, dout)
    check_arrays(tuple(zip(_BACKWARD_NAMES, tensors)))
    causal = check_bool("causal", causal)
    softmax_scale = check_scale("softmax_scale", softmax_scale)
    if is_torch(q):
        from . import _torch

        return _torch.backward(
            tensors,
            cu_seqlens=_pair_or_none(cu_seqlens_q, cu_seqlens_k),
            causal=causal,
            scale=softmax_scale,
            window=window,
        )
    offsets = _varlen_offsets(_pair_or_none(cu_seqlens_q, cu_seqlens_k), None)
    return _backward(tensors, heads_first=False, causal=causal, scale=softmax_scale, window=window, offsets=offsets)


# ---------------------------------------------------------------------------------------
# Argument checks.


def _check_unsupported(attn_mask: Any, dropout_p: Any) -> None:
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported; use is_causal for causal masking")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) and type(dropout_p).__module__ != "numpy":
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    try:
        nonzero = float(dropout_p) != 0.0
    except (TypeError, ValueError):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}") from None
    if nonzero:
        raise ValueError(f"dropout_p={float(dropout_p)!r} is not supported (dropout is not implemented)")


def _window_size(window_size: Any) -> _Window:
    """flash-attn's (left, right), -1 meaning unbounded, as (left, right) with None."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
    sides = []
    for w in (left, right):
        if is_bool(w):
            raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
        try:
            w = operator.index(w)
        except TypeError:
            raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
        if w < -1:
            raise ValueError(f"window_size={tuple(window_size)!r}: each side must be >= 0, or -1 for unbounded")
        # A side of 2**31 - 1 keys or more reaches past any sequence the kernels take:
        # unbounded, whatever its size (2**40 and 2**70 alike).
        sides.append(None if w == -1 or w >= _UNBOUNDED_WINDOW else int(w))
    return sides[0], sides[1]


_UNBOUNDED_WINDOW = 2**31 - 1


def _dim(x: Any, axis: int, rank: int) -> Any:
    """x.shape[axis] when x has a shape of that rank (else None: the op reports it). Not
    converted with int(): under torch.compile that would specialize a symbolic size."""
    shape = getattr(x, "shape", None)
    try:
        return shape[axis] if shape is not None and len(shape) == rank else None
    except TypeError:
        return None


def _pair_or_none(a: Any, b: Any) -> Optional[Tuple[Any, Any]]:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    return a, b


def _host_offsets(name: str, cu: Any) -> List[int]:
    """B+1 offsets as host ints, from an int32 array of any framework or a list of ints.
    Device arrays are copied to the host (a synchronization)."""
    if isinstance(cu, (list, tuple)):
        try:
            offsets = [operator.index(x) for x in cu]
        except TypeError:
            raise TypeError(f"{name} must hold ints, got {type(cu).__name__} of {len(cu)} items") from None
        for i, x in enumerate(offsets):
            if not -(2**31) <= x < 2**31:
                raise ValueError(f"{name}: offset {i} is {x}, outside the int32 range")
        return offsets
    dtype = getattr(cu, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be an int32 array or tensor, got {type(cu).__name__}")
    dtype_name = str(dtype).rpartition(".")[2]  # torch.int32 -> int32
    if dtype_name != "int32":
        raise TypeError(f"{name} must be int32 (as flash-attn takes it), got {dtype_name}")
    check_not_traced(name, cu)
    if len(getattr(cu, "shape", ())) != 1:
        raise ValueError(f"{name} must be one-dimensional (batch + 1 offsets), got shape {tuple(cu.shape)}")
    if hasattr(cu, "tolist"):
        return [int(x) for x in cu.tolist()]
    import numpy as np

    return [int(x) for x in np.asarray(cu).tolist()]


def _varlen_offsets(cu_seqlens: Optional[Tuple[Any, Any]], max_seqlens: Optional[Tuple[int, int]]) -> _Offsets:
    """The host offsets of a varlen call, with max_seqlen checked against them (the
    offsets themselves are checked by the native module)."""
    if cu_seqlens is None:
        return None
    cu_q = _host_offsets("cu_seqlens_q", cu_seqlens[0])
    cu_k = _host_offsets("cu_seqlens_k", cu_seqlens[1])
    if max_seqlens is not None:
        for name, cu, given in (("max_seqlen_q", cu_q, max_seqlens[0]), ("max_seqlen_k", cu_k, max_seqlens[1])):
            # Unsorted offsets are left for the native module to report.
            longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
            if given < longest and all(a <= b for a, b in zip(cu, cu[1:])):
                raise ValueError(
                    f"{name}={given} is smaller than the longest sequence ({longest}) in cu_seqlens_{name[-1]}"
                )
    return cu_q, cu_k


# ---------------------------------------------------------------------------------------
# Dispatch: torch tensors go through ._torch (autograd, custom ops); everything else
# straight to the native module.


def _dispatch_forward(
    tensors: tuple,
    *,
    heads_first: bool,
    causal: bool,
    scale: Optional[float],
    window: _Window,
    cu_seqlens: Optional[Tuple[Any, Any]],
    max_seqlens: Optional[Tuple[int, int]],
    return_lse: bool,
) -> Any:
    if is_torch(tensors[0]):
        # Imported here, not at the top: numpy / jax users never pay torch's import. Do
        # not bind a module global named `_torch` (nor one in the package):
        # `from . import _torch` would return it instead of importing the submodule
        # (what broke the first custom-op attempt).
        from . import _torch

        out, lse = _torch.forward(
            tensors,
            heads_first=heads_first,
            causal=causal,
            scale=scale,
            window=window,
            cu_seqlens=cu_seqlens,
            max_seqlens=max_seqlens,
        )
    else:
        out, lse = _forward(
            tensors,
            heads_first=heads_first,
            causal=causal,
            scale=scale,
            window=window,
            offsets=_varlen_offsets(cu_seqlens, max_seqlens),
        )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# The calls into the native module (any framework; torch's custom ops and
# autograd.Function call these too).


def _native_options(causal: bool, scale: Optional[float], window: _Window, offsets: _Offsets) -> dict:
    return dict(
        causal=bool(causal),
        scale=None if scale is None else float(scale),
        window_left=window[0],
        window_right=window[1],
        cu_seqlens_q=None if offsets is None else offsets[0],
        cu_seqlens_k=None if offsets is None else offsets[1],
    )


def _forward(
    tensors: tuple, *, heads_first: bool, causal: bool, scale: Optional[float], window: _Window, offsets: _Offsets
) -> Tuple[Any, Any]:
    """(out, lse) in the caller's framework; out is a (B, H, Nq, D) view with heads_first."""
    place = Placement(list(zip(("q", "k", "v"), tensors)))
    options = _native_options(causal, scale, window, offsets)
    out_shape, lse_shape, _ = _native.attention_shapes(
        *(shape_list(t) for t in tensors), heads_first=heads_first, **options
    )
    out = place.empty(tuple(out_shape), dtype_name(tensors[0]))
    lse = place.empty(tuple(lse_shape), "float32")
    _native.attention_forward(
        *place.export_inputs("qkv"),
        place.export("out", out),
        place.export("lse", lse),
        heads_first=heads_first,
        stream=place.stream,
        **options,
    )
    out, lse = place.to_caller(out), place.to_caller(lse)
    if heads_first:
        out = out.swapaxes(1, 2)
    return out, lse


_BACKWARD_NAMES = ("q", "k", "v", "out", "lse", "dout")


def _backward(
    tensors: tuple, *, heads_first: bool, causal: bool, scale: Optional[float], window: _Window, offsets: _Offsets
) -> Tuple[Any, Any, Any]:
    """(dq, dk, dv) in the caller's framework; (B, H, N, D) views with heads_first."""
    place = Placement(list(zip(_BACKWARD_NAMES, tensors)))
    options = _native_options(causal, scale, window, offsets)
    q_shape, _, kv_shape = _native.attention_shapes(
        *(shape_list(t) for t in tensors[:3]), heads_first=heads_first, **options
    )
    dtype = dtype_name(tensors[0])
    made = [place.empty(tuple(s), dtype) for s in (q_shape, kv_shape, kv_shape)]
    _native.attention_backward(
        *place.export_inputs(_BACKWARD_NAMES),
        *(place.export(n, t) for n, t in zip(("dq", "dk", "dv"), made)),
        heads_first=heads_first,
        stream=place.stream,
        **options,
    )
    grads = tuple(place.to_caller(t) for t in made)
    if heads_first:
        grads = tuple(g.swapaxes(1, 2) for g in grads)
    return grads
