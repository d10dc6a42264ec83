"""torch integration of Longformer attention: autograd, and the torch.library custom ops
that torch.compile and torch.export trace.

- Eager calls on plain tensors go through ``_Longformer`` (a ``torch.autograd.Function``)
  when a gradient is wanted, else straight to the native module. The masks are read on
  the host once, in the forward, and reused by the backward.
- Under torch.compile / torch.export (and for tensor subclasses such as FakeTensor), the
  call is ``torch.ops.flashkernels.longformer_fwd``: one opaque node with a fake
  implementation, whose registered autograd formula calls
  ``torch.ops.flashkernels.longformer_bwd``. Masks are bool (or integer) tensor inputs of
  the ops (read on the host inside them); global index lists are passed flattened, as
  ``global_indices`` plus per-sequence ``global_counts``.

Gradients: q, k, v and, when given, q_global, k_global, v_global (without them the global
rows' gradients are folded into dq, dk, dv). The LSE output is not differentiable.

Registered when imported (see the package's ``register_torch_ops``). No ``from
__future__ import annotations``: torch.library infers the op schemas from annotations.
"""

from typing import Any, List, Optional, Sequence, Tuple

import torch

from ._longformer import HostMasks, LongformerOptions, lf_backward, lf_forward
from ._torch_ops import Autograd, autograd_function, custom_op, kernel_ready, use_op, wants_grad

Tensor = torch.Tensor


def _flatten(indices: Optional[List[List[int]]]) -> Tuple[Optional[List[int]], Optional[List[int]]]:
    if indices is None:
        return None, None
    return [i for seq in indices for i in seq], [len(seq) for seq in indices]


def _unflatten(flat: Optional[List[int]], counts: Optional[List[int]]) -> Optional[List[List[int]]]:
    if counts is None:
        if flat:
            raise ValueError("global_indices needs global_counts (one count per sequence)")
        return None
    flat = list(flat or [])
    if sum(counts) != len(flat) or any(c < 0 for c in counts):
        raise ValueError(f"global_counts {list(counts)} do not partition the {len(flat)} global_indices")
    out, at = [], 0
    for c in counts:
        out.append(flat[at : at + c])
        at += c
    return out


def _options(window: int, dilation: List[int], causal: bool, scale: Optional[float]) -> LongformerOptions:
    return LongformerOptions(window, list(dilation), causal, scale)


def _globals(q_global: Optional[Tensor], k_global: Optional[Tensor], v_global: Optional[Tensor]) -> tuple:
    given = [t is not None for t in (q_global, k_global, v_global)]
    if any(given) and not all(given):
        raise ValueError("q_global, k_global and v_global must be given together")
    return (q_global, k_global, v_global) if all(given) else ()


def _check_qkv(q: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q: expected a rank-4 tensor (batch, seqlen, heads, head_dim), got shape {list(q.shape)}")


# ---------------------------------------------------------------------------------------
# The custom ops (torch.compile, torch.export, tensor subclasses).


def _longformer_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_global: Optional[Tensor],
    k_global: Optional[Tensor],
    v_global: Optional[Tensor],
    global_mask: Optional[Tensor],
    padding_mask: Optional[Tensor],
    global_indices: Optional[List[int]],
    global_counts: Optional[List[int]],
    window: int,
    dilation: List[int],
    causal: bool,
    scale: Optional[float],
) -> Tuple[Tensor, Tensor]:
    """(out, lse): out (B, N, H, D) contiguous in q's dtype, lse float32 (B, H, N). Masks
    (B, N), bool or integer (nonzero = set), any device (read on the host). Global
    tokens: ``global_mask``, or ``global_indices`` (all sequences' indices, concatenated)
    with ``global_counts`` (how many belong to each sequence)."""
    masks = HostMasks(global_mask, _unflatten(global_indices, global_counts), padding_mask)
    tensors = (q, k, v) + _globals(q_global, k_global, v_global)
    return lf_forward(tensors, masks, _options(window, dilation, causal, scale))


def _longformer_fwd_fake(
    q,
    k,
    v,
    q_global,
    k_global,
    v_global,
    global_mask,
    padding_mask,
    global_indices,
    global_counts,
    window,
    dilation,
    causal,
    scale,
):
    _check_qkv(q)
    b, n, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=torch.float32)


def _longformer_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_global: Optional[Tensor],
    k_global: Optional[Tensor],
    v_global: Optional[Tensor],
    global_mask: Optional[Tensor],
    padding_mask: Optional[Tensor],
    global_indices: Optional[List[int]],
    global_counts: Optional[List[int]],
    window: int,
    dilation: List[int],
    causal: bool,
    scale: Optional[float],
) -> List[Tensor]:
    """[dq, dk, dv] for longformer_fwd's inputs and outputs, dout being out's gradient,
    then [dq_global, dk_global, dv_global] when the global projections are given;
    contiguous, q's dtype."""
    masks = HostMasks(global_mask, _unflatten(global_indices, global_counts), padding_mask)
    tensors = (q, k, v) + _globals(q_global, k_global, v_global)
    return list(_backward_impl(tensors, out, lse, dout, masks, _options(window, dilation, causal, scale)))


def _longformer_bwd_fake(
    dout,
    q,
    k,
    v,
    out,
    lse,
    q_global,
    k_global,
    v_global,
    global_mask,
    padding_mask,
    global_indices,
    global_counts,
    window,
    dilation,
    causal,
    scale,
):
    _check_qkv(q)
    return [q.new_empty(q.shape) for _ in range(6 if q_global is not None else 3)]


def _backward_impl(
    tensors: Sequence[Tensor], out: Tensor, lse: Tensor, dout: Tensor, masks: HostMasks, opts: LongformerOptions
) -> Tuple[Tensor, ...]:
    # Gradients can arrive with zero (expanded) strides or misaligned: give the kernels
    # real memory.
    return lf_backward(tensors, kernel_ready(out), lse.contiguous(), kernel_ready(dout), masks, opts)


def _op_save(inputs: tuple, outputs: tuple) -> tuple:
    q, k, v, qg, kg, vg, gm, pm, gidx, gcnt, window, dilation, causal, scale = inputs
    out, lse = outputs
    return (q, k, v, qg, kg, vg, gm, pm, out, lse), (gidx, gcnt, window, dilation, causal, scale)


def _op_backward(options: tuple, saved: tuple, _needs: Any, dout: Tensor, _dlse: Any) -> tuple:
    q, k, v, qg, kg, vg, gm, pm, out, lse = saved
    grads = torch.ops.flashkernels.longformer_bwd(dout, q, k, v, out, lse, qg, kg, vg, gm, pm, *options)
    return tuple(grads)  # dq, dk, dv, then the projections' gradients when they are given


longformer_bwd = custom_op("longformer_bwd", _longformer_bwd, _longformer_bwd_fake)
longformer_fwd = custom_op(
    "longformer_fwd", _longformer_fwd, _longformer_fwd_fake, Autograd(_op_save, _op_backward, non_differentiable=(1,))
)


# ---------------------------------------------------------------------------------------
# The eager route.


def _eager_forward(masks: HostMasks, opts: LongformerOptions, q: Tensor, k: Tensor, v: Tensor, *gqkv: Any) -> Any:
    return lf_forward((q, k, v) + _globals(*gqkv), masks, opts)


def _eager_save(inputs: tuple, outputs: tuple) -> tuple:
    masks, opts, q, k, v, qg, kg, vg = inputs
    return (q, k, v) + _globals(qg, kg, vg) + tuple(outputs), (masks, opts)


def _eager_backward(state: tuple, saved: tuple, _needs: Any, dout: Tensor, _dlse: Any) -> tuple:
    *tensors, out, lse = saved
    return (None, None) + tuple(_backward_impl(tensors, out, lse, dout, *state))


# Eager autograd: the forward saves the inputs, out and lse (and the host masks); the
# backward (deterministic, not itself differentiable) computes all gradients.
_Longformer = autograd_function(
    "_Longformer", _eager_forward, Autograd(_eager_save, _eager_backward, non_differentiable=(1,))
)


def _mask_tensor(m: Any, like: Tensor) -> Optional[Tensor]:
    """A mask for the custom op: torch tensors as they are, anything else as a CPU tensor."""
    if m is None or isinstance(m, torch.Tensor):
        return m
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(np.asarray(m) != 0))


def _check_torch(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor like q, got {type(t).__name__}")


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gqkv: Optional[Tuple[Tensor, Tensor, Tensor]],
    gmask: Any,
    gidx: Optional[List[List[int]]],
    pmask: Any,
    opts: LongformerOptions,
) -> Tuple[Tensor, Tensor]:
    """(out, lse) for torch tensors, differentiable in q, k, v (and the projections)."""
    tensors = (q, k, v) + (gqkv or ())
    for name, t in zip(("q", "k", "v", "q_global", "k_global", "v_global"), tensors):
        _check_torch(name, t)
    qg, kg, vg = gqkv if gqkv is not None else (None, None, None)
    masks_t = [m for m in (gmask, pmask) if isinstance(m, torch.Tensor)]
    if use_op(list(tensors) + masks_t):
        flat, counts = _flatten(gidx)
        return torch.ops.flashkernels.longformer_fwd(
            q,
            k,
            v,
            qg,
            kg,
            vg,
            _mask_tensor(gmask, q),
            _mask_tensor(pmask, q),
            flat,
            counts,
            opts.window,
            list(opts.dilation),
            opts.causal,
            opts.scale,
        )
    masks = HostMasks(gmask, gidx, pmask)
    if wants_grad(tensors):
        return _Longformer.apply(masks, opts, q, k, v, qg, kg, vg)
    return lf_forward(tensors, masks, opts)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    gqkv: Optional[Tuple[Tensor, Tensor, Tensor]],
    gmask: Any,
    gidx: Optional[List[List[int]]],
    pmask: Any,
    opts: LongformerOptions,
) -> Tuple[Tensor, ...]:
    """The functional backward for torch tensors; records nothing for autograd."""
    tensors = (q, k, v) + (gqkv or ())
    qg, kg, vg = gqkv if gqkv is not None else (None, None, None)
    masks_t = [m for m in (gmask, pmask) if isinstance(m, torch.Tensor)]
    if use_op(list(tensors) + [out, lse, dout] + masks_t):
        flat, counts = _flatten(gidx)
        grads = torch.ops.flashkernels.longformer_bwd(
            dout,
            q,
            k,
            v,
            out,
            lse,
            qg,
            kg,
            vg,
            _mask_tensor(gmask, q),
            _mask_tensor(pmask, q),
            flat,
            counts,
            opts.window,
            list(opts.dilation),
            opts.causal,
            opts.scale,
        )
        return tuple(grads) if gqkv is not None else tuple(grads[:3])
    with torch.no_grad():
        return _backward_impl(tensors, out, lse, dout, HostMasks(gmask, gidx, pmask), opts)
