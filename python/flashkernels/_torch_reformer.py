"""torch integration of Reformer LSH attention: autograd and the torch.library custom ops
that torch.compile and torch.export trace.

- Eager calls on plain tensors go through ``_Reformer`` (a ``torch.autograd.Function``)
  when a gradient is wanted, else straight to the native module. The mask and the
  buckets are read on the host once, in the forward; the backward reuses the mask and
  holds the forward's buckets fixed.
- Under torch.compile / torch.export (and for tensor subclasses such as FakeTensor), the
  call is ``torch.ops.flashkernels.reformer_fwd`` (fake implementation and autograd
  formula registered), whose backward is ``torch.ops.flashkernels.reformer_bwd``. The
  key padding mask (bool) and the buckets (any integer dtype) are tensor inputs of the
  ops, read on the host inside them; the ops return the buckets used as int64
  (B, H, n_hashes, N), or an empty (0,) tensor when N <= C (no hashing).

Gradients: qk and v. The rotations and buckets get none; lse and the buckets are not
differentiable outputs.

Registered when imported (see the package's ``register_torch_ops``). No ``from
__future__ import annotations``: torch.library infers the op schemas from annotations.
"""

from typing import Any, Optional, Tuple

import torch

from ._dlpack import check_bool, check_int
from ._linformer import HostMask, host_mask
from ._reformer import HostBuckets, Options, UsedBuckets, host_buckets, ref_backward, ref_forward, used_array, used_host
from ._torch_ops import Autograd, autograd_function, custom_op, kernel_ready, use_op, wants_grad

Tensor = torch.Tensor


def _ready(qk: Tensor, v: Tensor, rotations: Tensor) -> tuple:
    """qk, v as the reference reads them (unit head-dim stride), copies where not; the
    rotations as they are (any strides)."""
    return (kernel_ready(qk), kernel_ready(v), rotations)


def _forward_impl(
    qk: Tensor, v: Tensor, rotations: Tensor, mask: Optional[HostMask], buckets: Optional[HostBuckets], opts: Options
) -> Tuple[Tensor, Tensor, Optional[UsedBuckets]]:
    return ref_forward(_ready(qk, v, rotations), mask, buckets, opts)  # type: ignore[return-value]


def _backward_impl(
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    mask: Optional[HostMask],
    buckets: Optional[HostBuckets],
    opts: Options,
) -> Tuple[Tensor, Tensor]:
    # Gradients can arrive with zero (expanded) strides: give the reference real memory.
    out, dout = kernel_ready(out), kernel_ready(dout)
    return ref_backward(_ready(qk, v, rotations), out, lse.contiguous(), dout, mask, buckets, opts)  # type: ignore[return-value]


def _bucket_tensor(used: Optional[UsedBuckets], like: Tensor) -> Tensor:
    """The buckets used as int64 on like's device, or an empty (0,) tensor (N <= C)."""
    if used is None:
        return torch.empty(0, dtype=torch.int64, device=like.device)
    return used_array(used, like)


def _opts(chunk_length: int, chunks_before: int, chunks_after: int, causal: bool, n_buckets: Optional[int]) -> Options:
    return Options(
        check_int("chunk_length", chunk_length),
        check_int("chunks_before", chunks_before),
        check_int("chunks_after", chunks_after),
        check_bool("causal", causal),
        None if n_buckets is None else check_int("n_buckets", n_buckets),
    )


def _check_mask_tensor(m: Optional[Tensor]) -> None:
    if m is not None and m.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = padded token), got {str(m.dtype).rpartition('.')[2]}"
        )


def _check_buckets_tensor(b: Optional[Tensor]) -> None:
    if b is not None and (b.dtype.is_floating_point or b.dtype.is_complex or b.dtype == torch.bool):
        raise TypeError(f"buckets must be an integer tensor (int64 as HF returns them), got {b.dtype}")


def _fake_shapes(qk: Tensor, rotations: Tensor, chunk_length: int) -> Tuple[tuple, tuple]:
    """(lse, buckets) shapes from qk and the rotations (ranks checked)."""
    for name, t in (("qk", qk), ("rotations", rotations)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a rank-4 tensor, got shape {list(t.shape)}")
    b, n, h, _ = qk.shape
    n_hashes = rotations.shape[2]
    if n > chunk_length:
        return (b, h, n_hashes, n), (b, h, n_hashes, n)
    return (b, h, 1, n), (0,)


# ---------------------------------------------------------------------------------------
# The custom ops (torch.compile, torch.export, tensor subclasses).


def _reformer_fwd(
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    key_padding_mask: Optional[Tensor],
    buckets: Optional[Tensor],
    chunk_length: int,
    chunks_before: int,
    chunks_after: int,
    causal: bool,
    n_buckets: Optional[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, buckets): out (B, N, H, D) contiguous in qk's dtype, lse float32
    (B, H, rounds, N), the buckets used int64 (B, H, n_hashes, N) or empty (0,) when
    N <= C. key_padding_mask (B, N) bool, True = padded; buckets (B, H, n_hashes, N)
    integer, to use instead of hashing; both any device (read on the host)."""
    opts = _opts(chunk_length, chunks_before, chunks_after, causal, n_buckets)
    out, lse, hb = _forward_impl(qk, v, rotations, host_mask(key_padding_mask), host_buckets(buckets), opts)
    return out, lse, _bucket_tensor(hb, qk)


def _reformer_fwd_fake(  # type: ignore[no-untyped-def]
    qk, v, rotations, key_padding_mask, buckets, chunk_length, chunks_before, chunks_after, causal, n_buckets
):
    _check_mask_tensor(key_padding_mask)
    _check_buckets_tensor(buckets)
    lse_shape, bk_shape = _fake_shapes(qk, rotations, chunk_length)
    return (
        qk.new_empty(qk.shape),
        qk.new_empty(lse_shape, dtype=torch.float32),
        qk.new_empty(bk_shape, dtype=torch.int64),
    )


def _reformer_bwd(
    dout: Tensor,
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Optional[Tensor],
    buckets: Optional[Tensor],
    chunk_length: int,
    chunks_before: int,
    chunks_after: int,
    causal: bool,
    n_buckets: Optional[int],
) -> Tuple[Tensor, Tensor]:
    """(dqk, dv), shaped like qk and v in qk's dtype, the buckets held fixed (None:
    hashed again from the rotations)."""
    opts = _opts(chunk_length, chunks_before, chunks_after, causal, n_buckets)
    mask, hb = host_mask(key_padding_mask), host_buckets(buckets)
    return _backward_impl(qk, v, rotations, out, lse, dout, mask, hb, opts)


def _reformer_bwd_fake(  # type: ignore[no-untyped-def]
    dout,
    qk,
    v,
    rotations,
    out,
    lse,
    key_padding_mask,
    buckets,
    chunk_length,
    chunks_before,
    chunks_after,
    causal,
    n_buckets,
):
    _check_mask_tensor(key_padding_mask)
    _check_buckets_tensor(buckets)
    return qk.new_empty(qk.shape), qk.new_empty(v.shape)


def _op_save(inputs: tuple, outputs: tuple) -> tuple:
    qk, v, rotations, mask, _given, *opts = inputs
    out, lse, used = outputs
    return (qk, v, rotations, mask, out, lse, used), tuple(opts)


def _op_backward(opts: tuple, saved: tuple, needs: Any, dout: Tensor, *_aux: Any) -> tuple:
    qk, v, rotations, mask, out, lse, used = saved
    if not any(needs[:2]):
        return ()
    # The forward's buckets, held fixed (none when N <= C: an empty tensor).
    fixed = used if used.dim() == 4 else None
    dqk, dv = torch.ops.flashkernels.reformer_bwd(dout, qk, v, rotations, out, lse, mask, fixed, *opts)
    return dqk, dv


reformer_bwd = custom_op("reformer_bwd", _reformer_bwd, _reformer_bwd_fake)
reformer_fwd = custom_op(
    "reformer_fwd",
    _reformer_fwd,
    _reformer_fwd_fake,
    Autograd(_op_save, _op_backward, non_differentiable=(1, 2)),
)


# ---------------------------------------------------------------------------------------
# The eager route.


def _eager_forward(mask: Optional[HostMask], buckets: Optional[HostBuckets], opts: Options, qk, v, rotations):  # type: ignore[no-untyped-def]
    out, lse, used = _forward_impl(qk, v, rotations, mask, buckets, opts)
    return out, lse, _bucket_tensor(used, qk), used


def _eager_save(inputs: tuple, outputs: tuple) -> tuple:
    mask, _given, opts, qk, v, rotations = inputs
    out, lse, _bk, used = outputs
    return (qk, v, rotations, out, lse), (mask, used, opts)


def _eager_backward(state: tuple, saved: tuple, needs: Any, dout: Tensor, *_aux: Any) -> tuple:
    qk, v, rotations, out, lse = saved
    if not any(needs[3:5]):
        return ()
    mask, used, opts = state
    # The forward's buckets, held fixed (copied to the host if the kernels left them on
    # the device).
    dqk, dv = _backward_impl(qk, v, rotations, out, lse, dout, mask, used_host(used), opts)
    return (None, None, None, dqk, dv)


# Eager autograd: the forward saves the inputs and outputs (and the host mask and
# buckets); the backward (deterministic, not itself differentiable) computes both
# gradients in one call. The host buckets (4th result) only reach the save.
_Reformer = autograd_function(
    "_Reformer", _eager_forward, Autograd(_eager_save, _eager_backward, non_differentiable=(1, 2)), n_outputs=3
)


def _as_tensor(m: Any, name: str) -> Optional[Tensor]:
    """A mask or buckets as the custom op takes them: torch tensors as they are, anything
    else through numpy as a CPU tensor (its dtype checked by the op)."""
    if m is None or isinstance(m, torch.Tensor):
        return m
    import numpy as np

    try:
        a = np.asarray(m)
    except Exception as e:  # e.g. a ragged nested list
        raise TypeError(f"{name}: expected an array: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(a))


def _check_torch(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor like qk, got {type(t).__name__}")


def _op_args(mask: Any, buckets: Any) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    mt, bt = _as_tensor(mask, "key_padding_mask"), _as_tensor(buckets, "buckets")
    _check_mask_tensor(mt)
    _check_buckets_tensor(bt)
    return mt, bt


def forward(qk: Tensor, v: Tensor, rotations: Tensor, mask: Any, buckets: Any, opts: Options) -> tuple:
    """(out, lse, buckets or None) for torch tensors, differentiable in qk and v."""
    for name, t in zip(("qk", "v", "rotations"), (qk, v, rotations)):
        _check_torch(name, t)
    tensors = [qk, v, rotations]
    extra = [t for t in (mask, buckets) if isinstance(t, torch.Tensor)]
    if use_op(tensors + extra):
        mt, bt = _op_args(mask, buckets)
        out, lse, bk = torch.ops.flashkernels.reformer_fwd(qk, v, rotations, mt, bt, *opts)
        return out, lse, (bk if qk.shape[1] > opts.chunk_length else None)
    hm, hb = host_mask(mask), host_buckets(buckets)
    if wants_grad([qk, v]):
        out, lse, bk = _Reformer.apply(hm, hb, opts, qk, v, rotations)
    else:
        out, lse, used = _forward_impl(qk, v, rotations, hm, hb, opts)
        bk = _bucket_tensor(used, qk)
    return out, lse, (bk if bk.dim() == 4 else None)


def backward(
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    mask: Any,
    buckets: Any,
    opts: Options,
) -> tuple:
    """The functional backward for torch tensors (dqk, dv); records nothing for
    autograd."""
    tensors = [qk, v, rotations, out, lse, dout]
    extra = [t for t in (mask, buckets) if isinstance(t, torch.Tensor)]
    if use_op(tensors + extra):
        mt, bt = _op_args(mask, buckets)
        return torch.ops.flashkernels.reformer_bwd(dout, qk, v, rotations, out, lse, mt, bt, *opts)
    with torch.no_grad():
        return _backward_impl(qk, v, rotations, out, lse, dout, host_mask(mask), host_buckets(buckets), opts)
