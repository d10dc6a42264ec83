"""torch integration: autograd, and the torch.library custom ops that torch.compile and
torch.export trace.

Imported (which registers the ops) when flashkernels is imported after torch, right after
torch's own import otherwise, or at the latest on the first call with a torch tensor; see
the package docs. The public functions (``_attention``) route torch tensors here:

- Eager calls on plain tensors go through ``_Attention`` (a ``torch.autograd.Function``,
  ~6 us of overhead) when a gradient is wanted, else straight to the native module:
  the custom op's dispatch costs ~40 us a call with autograd.
- Under torch.compile / torch.export (and for tensor subclasses such as FakeTensor), the
  call is ``torch.ops.flashkernels.attention_fwd``: one opaque node with a fake
  implementation, whose registered autograd formula calls
  ``torch.ops.flashkernels.attention_bwd``.

Both routes end in the same DLPack glue (``_attention._forward`` / ``_backward``), so
their results are identical. The LSE output is not differentiable.

Note: no ``from __future__ import annotations`` here; torch.library infers the op
schemas from the annotations of the op functions.
"""

from typing import Any, Optional, Tuple

import torch

from ._attention import _backward, _forward, _host_offsets, _varlen_offsets
from ._torch_ops import Autograd, autograd_function, custom_op, kernel_ready, use_op, wants_grad

Tensor = torch.Tensor


def _side(w: Optional[int]) -> int:
    return -1 if w is None else int(w)


def _window(left: int, right: int) -> Tuple[Optional[int], Optional[int]]:
    for w in (left, right):
        if w < -1:
            raise ValueError(f"window sides must be >= 0, or -1 for unbounded, got ({left}, {right})")
    return (None if left < 0 else left, None if right < 0 else right)


def _offsets(cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int, max_k: int) -> Any:
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    return _varlen_offsets((cu_q, cu_k), None if max_q < 0 else (max_q, max_k))


def _backward_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    offsets: Any,
    heads_first: bool,
    causal: bool,
    scale: Optional[float],
    window: Tuple[Optional[int], Optional[int]],
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(
        (q, k, v, kernel_ready(out), lse.contiguous(), kernel_ready(dout)),
        heads_first=heads_first,
        causal=causal,
        scale=scale,
        window=window,
        offsets=offsets,
    )


# ---------------------------------------------------------------------------------------
# The custom ops (torch.compile, torch.export, tensor subclasses).


def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    heads_first: bool,
    causal: bool,
    scale: Optional[float],
    window_left: int,
    window_right: int,
) -> Tuple[Tensor, Tensor]:
    """(out, lse). q, k, v: (B, N, H, D), or (B, H, N, D) with heads_first, or packed
    (total, H, D) with cu_seqlens_q / cu_seqlens_k (int32, read on the host; then
    max_seqlen_q / max_seqlen_k, if >= 0, are checked against them). Windows: -1 is
    unbounded. out is (B, Nq, H, D)-contiguous (returned as its (B, H, Nq, D) view with
    heads_first), lse float32 (B, H, Nq) or (H, total_q)."""
    return _forward(
        (q, k, v),
        heads_first=heads_first,
        causal=causal,
        scale=scale,
        window=_window(window_left, window_right),
        offsets=_offsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
    )


def _check_rank(name: str, x: Tensor, rank: int, layout: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name}: expected a rank-{rank} tensor {layout}, got shape {list(x.shape)}")


def _empty_like_kernel(x: Tensor, heads_first: bool) -> Tensor:
    """A tensor shaped like x, contiguous in (B, N, H, D) order (the kernels' outputs)."""
    if heads_first:
        b, h, n, d = x.shape
        return x.new_empty((b, n, h, d)).transpose(1, 2)
    return x.new_empty(x.shape)


def _attention_fwd_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    heads_first,
    causal,
    scale,
    window_left,
    window_right,
):
    if cu_seqlens_q is None:
        if heads_first:
            _check_rank("q", q, 4, "(batch, heads, seqlen, head_dim)")
            b, h, n, _ = q.shape
        else:
            _check_rank("q", q, 4, "(batch, seqlen, heads, head_dim)")
            b, n, h, _ = q.shape
        lse_shape = (b, h, n)
    else:
        _check_rank("q", q, 3, "(total_seqlen, heads, head_dim)")
        total, h, _ = q.shape
        lse_shape = (h, total)
    return _empty_like_kernel(q, heads_first), q.new_empty(lse_shape, dtype=torch.float32)


def _attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    heads_first: bool,
    causal: bool,
    scale: Optional[float],
    window_left: int,
    window_right: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for attention_fwd's inputs and outputs, dout being out's gradient;
    contiguous in (B, N, H, D) order (views with heads_first), in q's dtype."""
    return _backward_impl(
        dout,
        q,
        k,
        v,
        out,
        lse,
        _offsets(cu_seqlens_q, cu_seqlens_k, -1, -1),
        heads_first,
        causal,
        scale,
        _window(window_left, window_right),
    )


def _attention_bwd_fake(
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, heads_first, causal, scale, window_left, window_right
):
    return (
        _empty_like_kernel(q, heads_first),
        _empty_like_kernel(k, heads_first),
        _empty_like_kernel(v, heads_first),
    )


def _op_save(inputs: tuple, outputs: tuple) -> tuple:
    q, k, v, cu_q, cu_k, _max_q, _max_k, heads_first, causal, scale, left, right = inputs
    out, lse = outputs
    return (q, k, v, out, lse, cu_q, cu_k), (heads_first, causal, scale, left, right)


def _op_backward(options: tuple, saved: tuple, _needs: Any, dout: Tensor, _dlse: Any) -> tuple:
    return torch.ops.flashkernels.attention_bwd(dout, *saved, *options)


attention_bwd = custom_op("attention_bwd", _attention_bwd, _attention_bwd_fake)
attention_fwd = custom_op(
    "attention_fwd", _attention_fwd, _attention_fwd_fake, Autograd(_op_save, _op_backward, non_differentiable=(1,))
)


# ---------------------------------------------------------------------------------------
# The eager route.


def _eager_forward(
    q: Tensor, k: Tensor, v: Tensor, offsets: Any, heads_first: bool, causal: bool, scale: Any, window: Any
) -> Any:
    return _forward((q, k, v), heads_first=heads_first, causal=causal, scale=scale, window=window, offsets=offsets)


def _eager_save(inputs: tuple, outputs: tuple) -> tuple:
    q, k, v, *options = inputs
    return (q, k, v) + outputs, options


def _eager_backward(options: list, saved: tuple, _needs: Any, dout: Tensor, _dlse: Any) -> tuple:
    return _backward_impl(dout, *saved, *options)


# Eager autograd: the forward saves q, k, v, out, lse; the backward (deterministic, not
# itself differentiable) computes dq, dk, dv.
_Attention = autograd_function(
    "_Attention", _eager_forward, Autograd(_eager_save, _eager_backward, non_differentiable=(1,))
)


def _offsets_tensor(name: str, cu: Any) -> Tensor:
    """cu_seqlens as an int32 tensor for the custom op (which reads it on the host)."""
    if isinstance(cu, torch.Tensor):
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (as flash-attn takes it), got {str(cu.dtype).rpartition('.')[2]}")
        return cu
    return torch.tensor(_host_offsets(name, cu), dtype=torch.int32)


def forward(
    tensors: Tuple[Tensor, Tensor, Tensor],
    *,
    heads_first: bool,
    causal: bool,
    scale: Optional[float],
    window: Tuple[Optional[int], Optional[int]],
    cu_seqlens: Optional[Tuple[Any, Any]],
    max_seqlens: Optional[Tuple[int, int]],
) -> Tuple[Tensor, Tensor]:
    """(out, lse) for torch tensors, differentiable in q, k, v."""
    q, k, v = tensors
    scale = None if scale is None else float(scale)
    if use_op(tensors):
        cu_q, cu_k = (
            (None, None)
            if cu_seqlens is None
            else (
                _offsets_tensor("cu_seqlens_q", cu_seqlens[0]),
                _offsets_tensor("cu_seqlens_k", cu_seqlens[1]),
            )
        )
        max_q, max_k = (-1, -1) if max_seqlens is None else max_seqlens
        return torch.ops.flashkernels.attention_fwd(
            q, k, v, cu_q, cu_k, max_q, max_k, heads_first, causal, scale, _side(window[0]), _side(window[1])
        )
    offsets = _varlen_offsets(cu_seqlens, max_seqlens)
    if wants_grad(tensors):
        return _Attention.apply(q, k, v, offsets, heads_first, causal, scale, window)
    return _forward(tensors, heads_first=heads_first, causal=causal, scale=scale, window=window, offsets=offsets)


def backward(
    tensors: Tuple[Tensor, ...],
    *,
    cu_seqlens: Optional[Tuple[Any, Any]],
    causal: bool,
    scale: Optional[float],
    window: Tuple[Optional[int], Optional[int]],
) -> Tuple[Tensor, Tensor, Tensor]:
    """The functional backward (flash-attn layout) for torch tensors; records nothing
    for autograd."""
    q, k, v, out, lse, dout = tensors
    scale = None if scale is None else float(scale)
    if use_op(tensors):
        cu_q, cu_k = (
            (None, None)
            if cu_seqlens is None
            else (
                _offsets_tensor("cu_seqlens_q", cu_seqlens[0]),
                _offsets_tensor("cu_seqlens_k", cu_seqlens[1]),
            )
        )
        return torch.ops.flashkernels.attention_bwd(
            dout, q, k, v, out, lse, cu_q, cu_k, False, causal, scale, _side(window[0]), _side(window[1])
        )
    with torch.no_grad():
        return _backward_impl(dout, q, k, v, out, lse, _varlen_offsets(cu_seqlens, None), False, causal, scale, window)
