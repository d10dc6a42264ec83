"""Past one GPU: context-parallel (ring) attention over ``torch.distributed``.

When a sequence outgrows one GPU, shard it: each rank of a process group holds one
contiguous block of the sequence, the same length on every rank (group rank r holds
positions ``[r * N_local, (r + 1) * N_local)``), as (B, N_local, H, D) tensors in
flash-attn's layout. ``ring_attention(q, k, v, causal=...)`` then gives each rank the
attention of its own queries over the *whole* sequence, and its backward gives each rank
the gradients of its own q, k and v shards:

- forward: the K/V shards travel around the ring (rank r sends to r + 1 and receives
  from r - 1, ``batch_isend_irecv``; the next block is in flight while the current one
  is computed). Each step is one ``flash_attn_func(..., return_lse=True)`` of the local
  queries against the visiting block, merged into the running result by
  ``merge_attention_states`` (the exact log-sum-exp merge). Causal: the rank's own
  block is causal, blocks of earlier ranks are attended in full, later ranks' skipped.
- backward: the ring runs again. For each visiting block,
  ``attention_backward(q, k_blk, v_blk, out, lse, dout)`` with the *merged* out and lse
  gives the exact share of dq, dk_blk, dv_blk (FlashAttention-2 recomputes
  P = exp(scale * q k^T - lse) and uses Delta = rowsum(dout * out), which are global
  quantities once out and lse are the merged ones). dq is summed locally; the dk/dv
  partial sums (float32) travel with their block and come home after a full turn.

CPU tensors run flashkernels' CPU reference and need a group with gloo; CUDA tensors
run the kernels and need NCCL (one GPU per rank). Every rank of the group must make the
same calls with the same shapes and options (forward and backward), as with any
collective. Grouped-query attention works as in ``flash_attn_func`` (k and v may have
fewer heads than q). Eager mode only (not traced by torch.compile). This module imports
torch; the package exposes its two functions lazily (``flashkernels.ring_attention``),
so numpy and jax users never import torch.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._attention import attention_backward, flash_attn_func
from ._dlpack import check_bool, check_scale
from ._torch_ops import Autograd, autograd_function

__all__ = ["ring_attention", "merge_attention_states"]

Tensor = torch.Tensor

# P2P tags: K/V blocks and dK/dV partial sums are both in flight during the backward.
# (NCCL ignores tags and matches in issue order, which is the same on every rank.)
_KV_TAG = 11
_DKV_TAG = 12

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# The merge.


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """The merge, unchecked: out (B, N, H, D), lse (B, H, N). Computes in lse's dtype
    (float32 or wider) and returns out in the promoted type of out_a, out_b and lse."""
    m = torch.maximum(lse_a, lse_b)
    empty = m == -math.inf  # rows without keys on either side
    m = m.masked_fill(empty, 0.0)  # keeps (-inf) - (-inf) out of the exponents
    ea = torch.exp(lse_a - m)  # in [0, 1]; 0 for a side without keys
    eb = torch.exp(lse_b - m)
    total = ea + eb  # in [1, 2], or 0 for rows without keys
    nonzero = total.masked_fill(empty, 1.0)
    lse = (m + torch.log(nonzero)).masked_fill(empty, -math.inf)
    # (B, H, N) -> (B, N, H, 1), broadcasting over head_dim.
    wa = (ea / nonzero).transpose(1, 2).unsqueeze(-1)
    wb = (eb / nonzero).transpose(1, 2).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """The attention of queries over the union of two disjoint key sets, from the
    attention over each set: ``(out, lse)`` with lse = log(exp(lse_a) + exp(lse_b)) and
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.

    Layouts as ``flash_attn_func(..., return_lse=True)`` returns them: out_a, out_b
    (B, N, H, D), lse_a, lse_b (B, H, N) (float32 or float64). A row that sees no key on
    one side (lse -inf, out 0: flashkernels' convention) takes the other side unchanged;
    a row with no key on either side gives out 0 and lse -inf (no NaN). The merge is
    computed in float32 (float64 if an lse is float64); out comes back in the promoted
    dtype of out_a and out_b, lse as float32 (float64). Differentiable with torch
    autograd (rows without keys get zero gradients).
    """
    named = (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("out_a", out_a), ("out_b", out_b)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, seqlen, heads, head_dim), got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have one shape, got {list(out_a.shape)} and {list(out_b.shape)}")
    b, n, h, _ = out_a.shape
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(x.shape) != (b, h, n):
            raise ValueError(
                f"{name} must be (batch, heads, seqlen) = {[b, h, n]} for out of shape "
                f"{list(out_a.shape)}, got {list(x.shape)}"
            )
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 (as flashkernels returns it) or float64, got {x.dtype}")
    devices = {x.device for _, x in named}
    if len(devices) != 1:
        raise ValueError(f"out_a, lse_a, out_b and lse_b must be on one device, got {sorted(map(str, devices))}")
    lse_dtype = torch.promote_types(lse_a.dtype, lse_b.dtype)
    out_dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    out, lse = _merge(out_a, lse_a.to(lse_dtype), out_b, lse_b.to(lse_dtype))
    return out.to(out_dtype), lse


# ---------------------------------------------------------------------------------------
# The ring.


class _Ring:
    """The group, this process's place in it, and one ring step's exchange: send to the
    next rank, receive from the previous one."""

    def __init__(self, group: Any):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("ring_attention: this process is not a member of `group`")
        self.next = self._global((self.rank + 1) % self.size)
        self.prev = self._global((self.rank - 1) % self.size)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def exchange(self, send: Tensor, tag: int) -> Tuple[Tensor, List[Any]]:
        """Starts sending `send` to the next rank and receiving the previous rank's
        tensor of the same shape; returns the receive buffer and the requests (which must
        be waited on before the buffer is read or `send` changed)."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return recv, dist.batch_isend_irecv(ops)


def _wait(reqs: List[Any]) -> None:
    for r in reqs:
        r.wait()


def _visits(causal: bool, src: int, rank: int) -> Optional[bool]:
    """How rank `rank`'s queries see the block of rank `src`: None (skipped), or the
    causal flag of that step (True only for the diagonal block)."""
    if not causal:
        return False
    if src == rank:
        return True
    return False if src < rank else None


def _ring_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], ring: _Ring
) -> Tuple[Tensor, Tensor]:
    rank, size = ring.rank, ring.size
    kv = torch.stack((k, v))  # one message per step; kv[0], kv[1] are contiguous
    out = lse = None
    for step in range(size):
        src = (rank - step) % size
        pending = None
        if step < size - 1:  # the next block travels while this one is computed
            pending = ring.exchange(kv, _KV_TAG)
        mode = _visits(causal, src, rank)
        if mode is not None:
            o, o_lse = flash_attn_func(q, kv[0], kv[1], softmax_scale=scale, causal=mode, return_lse=True)
            if out is None:  # step 0: the rank's own block, always visited
                out, lse = o.float(), o_lse
            else:
                out, lse = _merge(out, lse, o, o_lse)
        if pending is not None:
            _wait(pending[1])
            kv = pending[0]
    assert out is not None and lse is not None
    return out.to(q.dtype), lse


def _ring_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    causal: bool,
    scale: Optional[float],
    ring: _Ring,
) -> Tuple[Tensor, Tensor, Tensor]:
    rank, size = ring.rank, ring.size
    kv = torch.stack((k, v))
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv_pending = None  # the dK/dV partial sums of the block visiting next, in flight
    for step in range(size):
        src = (rank - step) % size
        kv_pending = None
        if step < size - 1:
            kv_pending = ring.exchange(kv, _KV_TAG)
        mode = _visits(causal, src, rank)
        grads = None
        if mode is not None:
            grads = attention_backward(q, kv[0], kv[1], out, lse, dout, causal=mode, softmax_scale=scale)
        # This block's partial sums: zeros for our own block, else what the previous
        # rank sent after its turn with the block (received while we computed).
        if dkv_pending is None:
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        else:
            _wait(dkv_pending[1])
            dkv = dkv_pending[0]
        if grads is not None:
            dq.add_(grads[0])
            dkv[0].add_(grads[1])
            dkv[1].add_(grads[2])
        if size > 1:  # on to the next rank; after the last step, home to the owner
            dkv_pending = ring.exchange(dkv, _DKV_TAG)
        if kv_pending is not None:
            _wait(kv_pending[1])
            kv = kv_pending[0]
    if dkv_pending is not None:
        _wait(dkv_pending[1])
        dkv = dkv_pending[0]
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _save(inputs: tuple, outputs: tuple) -> tuple:
    q, k, v, *options = inputs
    return (q, k, v) + tuple(outputs), options


def _backward(options: list, saved: tuple, _needs: Any, dout: Tensor, _dlse: Any) -> tuple:
    q, k, v, out, lse = saved
    return _ring_backward(q, k, v, out, lse, dout.contiguous(), *options)


# apply(q, k, v, causal, scale, ring) -> (out, lse); lse is not differentiable.
_RingAttention = autograd_function("_RingAttention", _ring_forward, Autograd(_save, _backward, non_differentiable=(1,)))


# ---------------------------------------------------------------------------------------
# Checks and the entry point.


def _backend_for(group: Any, device_type: str) -> Optional[str]:
    """The group's backend for a device type ('gloo', 'nccl', ...), None if it has none."""
    backend = str(dist.get_backend(group))
    if ":" not in backend:  # one backend for every device
        return backend
    for part in backend.split(","):  # "cpu:gloo,cuda:nccl"
        dev, _, name = part.partition(":")
        if dev.strip() == device_type:
            return name.strip()
    return None


def _check_inputs(q: Any, k: Any, v: Any, group: Any) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ring_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"ring_attention: {name} must be this rank's shard (batch, seqlen_local, heads, "
                f"head_dim), got shape {list(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"ring_attention: {name} is empty (shape {list(x.shape)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"ring_attention: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"ring_attention: dtype must be float16, bfloat16 or float32 (CPU), got {q.dtype}")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise ValueError("ring_attention: CUDA tensors must be float16 or bfloat16 (float32 runs on the CPU only)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"ring_attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"ring_attention: k and v must have one shape, got {list(k.shape)} and {list(v.shape)}")
    (b, n, h, d), (bk, nk, hk, dk) = q.shape, k.shape
    if bk != b:
        raise ValueError(f"ring_attention: q has batch {b} but k and v have {bk}")
    if nk != n:
        raise ValueError(
            f"ring_attention: q, k and v must hold the same positions of the sequence (one "
            f"shard, seqlen_local), got {n} query and {nk} key positions"
        )
    if dk != d:
        raise ValueError(f"ring_attention: q has head_dim {d} but k and v have {dk}")
    if h % hk != 0:
        raise ValueError(f"ring_attention: q's {h} heads must be a multiple of k and v's {hk} heads (GQA)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ring_attention needs torch.distributed initialized (init_process_group)")
    backend = _backend_for(group, q.device.type)
    if backend is None:
        raise ValueError(f"ring_attention: the process group has no backend for {q.device.type} tensors")
    if q.device.type == "cpu" and backend == "nccl":
        raise ValueError("ring_attention: CPU tensors need a gloo process group (NCCL sends CUDA tensors only)")
    if q.device.type == "cuda" and backend == "gloo":
        raise ValueError("ring_attention: CUDA tensors need an NCCL process group (one GPU per rank)")


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    group: Any = None,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention over a sequence sharded across the ranks of ``group`` (default: the
    world), in flash-attn's layout.

    q, k, v: this rank's shard, (B, N_local, H, D) for q and (B, N_local, H_kv, D) for k
    and v (H_kv dividing H: GQA / MQA), group rank r holding sequence positions
    ``[r * N_local, (r + 1) * N_local)``; every rank passes the same shapes, dtype and
    options. ``causal``: query position i sees key positions <= i (global positions).
    ``softmax_scale`` defaults to 1/sqrt(D). Returns this rank's rows of the output,
    (B, N_local, H, D) in q's dtype, or ``(out, lse)`` with lse float32 (B, H, N_local),
    the log-sum-exp over the whole sequence. Differentiable in q, k, v (the backward is
    a second turn of the ring: every rank must run it). CPU tensors need gloo, CUDA
    tensors NCCL.
    """
    causal = check_bool("causal", causal)
    scale = check_scale("softmax_scale", softmax_scale)
    return_lse = check_bool("return_lse", return_lse)
    _check_inputs(q, k, v, group)
    if q.stride(-1) != 1:
        q = q.contiguous()  # the kernels read rows with unit stride (k, v are copied anyway)
    out, lse = _RingAttention.apply(q, k, v, causal, scale, _Ring(group))
    return (out, lse) if return_lse else out
