"""torch integration of Linformer attention: autograd, the torch.library custom ops that
torch.compile and torch.export trace, and ``LinformerAttention``, a ``torch.nn.Module``
drop-in for lucidrains/linformer 0.2.3's ``LinformerSelfAttention`` (same parameter
names and shapes, so its state_dict loads).

- Eager calls on plain tensors go through ``_Linformer`` (a ``torch.autograd.Function``)
  when a gradient is wanted, else straight to the native module. The mask is read on the
  host once, in the forward, and reused by the backward.
- Under torch.compile / torch.export (and for tensor subclasses such as FakeTensor), the
  call is ``torch.ops.flashkernels.linformer_fwd`` (fake implementation and autograd
  formula registered), whose backward is ``torch.ops.flashkernels.linformer_bwd``. The
  key padding mask is a bool tensor input of the ops (read on the host inside them).

Gradients: q, k, v, e and f (dE also holds F's contribution when f is None). The lse,
kp and vp outputs are not differentiable.

Registered when imported (see the package's ``register_torch_ops``). No ``from
__future__ import annotations``: torch.library infers the op schemas from annotations.
"""

import math
from typing import Any, Optional, Tuple

import torch

from ._dlpack import check_bool, check_int
from ._linformer import HostMask, host_mask, lin_backward, lin_forward
from ._torch_ops import Autograd, autograd_function, custom_op, kernel_ready, use_op, wants_grad

Tensor = torch.Tensor


def _ready(tensors: tuple) -> tuple:
    """q, k, v as the kernels read them in place (unit head-dim stride; on CUDA 16-byte
    aligned rows), copies where not; e and f as they are (any strides: ``proj_k.T`` is a
    view)."""
    q, k, v, e, f = tensors
    return (kernel_ready(q), kernel_ready(k), kernel_ready(v), e, f)


def _forward_impl(tensors: tuple, mask: Optional[HostMask], scale: Optional[float]) -> Tuple[Tensor, ...]:
    return lin_forward(_ready(tensors), mask, scale)


def _backward_impl(
    tensors: tuple, out: Tensor, lse: Tensor, kp: Tensor, vp: Tensor, dout: Tensor, mask: Any, scale: Any
) -> Tuple[Any, ...]:
    # Gradients can arrive with zero (expanded) strides or misaligned: give the kernels
    # real memory.
    kp, vp, out, dout = (kernel_ready(t) for t in (kp, vp, out, dout))
    return lin_backward(_ready(tensors), out, lse.contiguous(), kp, vp, dout, mask, scale)


def _check_mask_tensor(m: Optional[Tensor]) -> None:
    if m is not None and m.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = padded key), got {str(m.dtype).rpartition('.')[2]}"
        )


def _fake_shapes(q: Tensor, k: Tensor, e: Tensor) -> tuple:
    for name, t, rank in (("q", q, 4), ("k", k, 4), ("e", e, 3)):
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a rank-{rank} tensor, got shape {list(t.shape)}")
    b, n, h, d = q.shape
    return (b, h, n), (b, e.shape[1], k.shape[2], d)


# ---------------------------------------------------------------------------------------
# The custom ops (torch.compile, torch.export, tensor subclasses).


def _linformer_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e: Tensor,
    f: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    scale: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, kp, vp): out (B, N, H, D) contiguous in q's dtype, lse float32 (B, H, N),
    kp, vp (B, k, H_kv, D) in q's dtype. f None: F = E. key_padding_mask (B, N) bool, True
    = padded, any device (read on the host)."""
    return _forward_impl((q, k, v, e, f), host_mask(key_padding_mask), scale)  # type: ignore[return-value]


def _linformer_fwd_fake(q, k, v, e, f, key_padding_mask, scale):  # type: ignore[no-untyped-def]
    _check_mask_tensor(key_padding_mask)
    lse_shape, kp_shape = _fake_shapes(q, k, e)
    return (
        q.new_empty(q.shape),
        q.new_empty(lse_shape, dtype=torch.float32),
        q.new_empty(kp_shape),
        q.new_empty(kp_shape),
    )


def _linformer_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e: Tensor,
    f: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    kp: Tensor,
    vp: Tensor,
    key_padding_mask: Optional[Tensor],
    scale: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, de, df), each shaped like its input, q's dtype; df is empty (0,) when
    f is None (F = E: de holds both contributions)."""
    grads = _backward_impl((q, k, v, e, f), out, lse, kp, vp, dout, host_mask(key_padding_mask), scale)
    return tuple(g if g is not None else q.new_empty(0) for g in grads)  # type: ignore[return-value]


def _linformer_bwd_fake(dout, q, k, v, e, f, out, lse, kp, vp, key_padding_mask, scale):  # type: ignore[no-untyped-def]
    _check_mask_tensor(key_padding_mask)
    return (
        q.new_empty(q.shape),
        q.new_empty(k.shape),
        q.new_empty(v.shape),
        q.new_empty(e.shape),
        q.new_empty(f.shape if f is not None else (0,)),
    )


def _op_save(inputs: tuple, outputs: tuple) -> tuple:
    q, k, v, e, f, mask, scale = inputs
    return (q, k, v, e, f, mask) + tuple(outputs), scale


def _op_backward(scale: Any, saved: tuple, needs: Any, dout: Tensor, *_aux: Any) -> tuple:
    q, k, v, e, f, mask, out, lse, kp, vp = saved
    if not any(needs[:5]):
        return ()
    dq, dk, dv, de, df = torch.ops.flashkernels.linformer_bwd(dout, q, k, v, e, f, out, lse, kp, vp, mask, scale)
    return dq, dk, dv, de, (df if f is not None else None)


linformer_bwd = custom_op("linformer_bwd", _linformer_bwd, _linformer_bwd_fake)
linformer_fwd = custom_op(
    "linformer_fwd",
    _linformer_fwd,
    _linformer_fwd_fake,
    Autograd(_op_save, _op_backward, non_differentiable=(1, 2, 3)),
)


# ---------------------------------------------------------------------------------------
# The eager route.


def _eager_forward(mask: Optional[HostMask], scale: Optional[float], q, k, v, e, f):  # type: ignore[no-untyped-def]
    return _forward_impl((q, k, v, e, f), mask, scale)


def _eager_save(inputs: tuple, outputs: tuple) -> tuple:
    mask, scale, q, k, v, e, f = inputs
    return (q, k, v, e, f) + tuple(outputs), (mask, scale)


def _eager_backward(state: tuple, saved: tuple, needs: Any, dout: Tensor, *_aux: Any) -> tuple:
    q, k, v, e, f, out, lse, kp, vp = saved
    if not any(needs[2:7]):
        return ()
    mask, scale = state
    return (None, None) + tuple(_backward_impl((q, k, v, e, f), out, lse, kp, vp, dout, mask, scale))


# Eager autograd: the forward saves the inputs and outputs (and the host mask); the
# backward (deterministic, not itself differentiable) computes all gradients in one call.
_Linformer = autograd_function(
    "_Linformer", _eager_forward, Autograd(_eager_save, _eager_backward, non_differentiable=(1, 2, 3))
)


def _mask_tensor(m: Any) -> Optional[Tensor]:
    """The mask as the custom op takes it: torch tensors as they are, anything else as a
    CPU bool tensor (a non-boolean mask is refused by the op)."""
    if m is None or isinstance(m, torch.Tensor):
        return m
    import numpy as np

    a = np.asarray(m)
    if a.dtype.kind != "b":
        raise TypeError(f"key_padding_mask must be a boolean array (True = padded key), got dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a))


def _check_torch(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor like q, got {type(t).__name__}")


def forward(
    q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Optional[Tensor], mask: Any, scale: Optional[float]
) -> tuple:
    """(out, lse, kp, vp) for torch tensors, differentiable in q, k, v, e, f."""
    tensors = (q, k, v, e, f)
    for name, t in zip(("q", "k", "v", "e", "f"), tensors):
        if t is not None:
            _check_torch(name, t)
    present = [t for t in tensors if t is not None]
    if use_op(present + ([mask] if isinstance(mask, torch.Tensor) else [])):
        mt = _mask_tensor(mask)
        _check_mask_tensor(mt)
        return torch.ops.flashkernels.linformer_fwd(q, k, v, e, f, mt, scale)
    hm = host_mask(mask)
    if wants_grad(present):
        return _Linformer.apply(hm, scale, q, k, v, e, f)
    return _forward_impl(tensors, hm, scale)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e: Tensor,
    f: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    kp: Tensor,
    vp: Tensor,
    dout: Tensor,
    mask: Any,
    scale: Optional[float],
) -> tuple:
    """The functional backward for torch tensors (dq, dk, dv, de, df; df None when f is);
    records nothing for autograd."""
    tensors = (q, k, v, e, f)
    present = [t for t in tensors if t is not None] + [out, lse, kp, vp, dout]
    if use_op(present + ([mask] if isinstance(mask, torch.Tensor) else [])):
        mt = _mask_tensor(mask)
        _check_mask_tensor(mt)
        dq, dk, dv, de, df = torch.ops.flashkernels.linformer_bwd(dout, q, k, v, e, f, out, lse, kp, vp, mt, scale)
        return dq, dk, dv, de, (df if f is not None else None)
    with torch.no_grad():
        return _backward_impl(tensors, out, lse, kp, vp, dout, host_mask(mask), scale)


# ---------------------------------------------------------------------------------------
# The module.


def _init_projection(t: Tensor) -> Tensor:
    """lucidrains' ``init_``: uniform(-1/sqrt(k), 1/sqrt(k)), k the last dim."""
    std = 1 / math.sqrt(t.shape[-1])
    return t.uniform_(-std, std)


class LinformerAttention(torch.nn.Module):
    """A drop-in for lucidrains/linformer 0.2.3's ``LinformerSelfAttention``, run by
    :func:`flashkernels.linformer_attention`.

    Same arguments and parameters: ``to_q`` (Linear dim -> heads * dim_head, no bias),
    ``to_k`` and, unless ``share_kv``, ``to_v`` (Linear dim -> kv_dim, no bias; kv_dim =
    dim_head with ``one_kv_head``, else heads * dim_head), ``proj_k`` and, unless
    ``share_kv``, ``proj_v`` ((seq_len, k) Parameters, uniform(-1/sqrt(k), 1/sqrt(k))),
    ``to_out`` (Linear heads * dim_head -> dim, with bias); created in lucidrains' order,
    so a seeded construction draws the same initial weights. ``load_state_dict`` of a
    ``LinformerSelfAttention`` with the same arguments loads as it is.

    ``forward(x, context=None, key_padding_mask=None)``: x (B, N, dim) with N <= seq_len;
    ``context`` (B, N, dim), when given, is projected to keys and values instead of x
    (it must have x's length: the op takes one sequence length); ``key_padding_mask``
    (B, N) bool, True = padded key (an extension: lucidrains has none). Attention dropout
    is not implemented: with ``dropout > 0`` the module only runs in eval mode.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        k: int = 256,
        heads: int = 8,
        dim_head: Optional[int] = None,
        one_kv_head: bool = False,
        share_kv: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        dim = check_int("dim", dim, minimum=1)
        self.seq_len = check_int("seq_len", seq_len, minimum=1)
        self.k = check_int("k", k, minimum=1)
        self.heads = check_int("heads", heads, minimum=1)
        if dim % self.heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by the number of heads ({self.heads})")
        self.dim = dim
        self.dim_head = dim // self.heads if dim_head is None else check_int("dim_head", dim_head, minimum=1)
        self.one_kv_head = check_bool("one_kv_head", one_kv_head)
        self.share_kv = check_bool("share_kv", share_kv)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        inner = self.dim_head * self.heads
        kv_dim = self.dim_head if self.one_kv_head else inner
        # lucidrains' order (to_q, to_k, proj_k, to_v, proj_v, to_out): same draws.
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_k = torch.nn.Linear(dim, kv_dim, bias=False)
        self.proj_k = torch.nn.Parameter(_init_projection(torch.zeros(self.seq_len, self.k)))
        if not self.share_kv:
            self.to_v = torch.nn.Linear(dim, kv_dim, bias=False)
            self.proj_v = torch.nn.Parameter(_init_projection(torch.zeros(self.seq_len, self.k)))
        self.dropout = torch.nn.Dropout(dropout)
        self.to_out = torch.nn.Linear(inner, dim)

    def _check_input(self, name: str, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LinformerAttention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"LinformerAttention(dim={self.dim}): {name} must be (batch, seqlen, {self.dim}), "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_padding_mask: Any = None) -> Tensor:
        self._check_input("x", x)
        b, n, _ = x.shape
        kv_input = x
        if context is not None:
            self._check_input("context", context)
            if tuple(context.shape[:2]) != (b, n):
                raise ValueError(
                    f"LinformerAttention: context must have x's batch and length {(b, n)}, got shape "
                    f"{tuple(context.shape)} (keys and values of another length are not supported)"
                )
            kv_input = context
        if n > self.seq_len:
            raise ValueError(
                f"LinformerAttention(seq_len={self.seq_len}): the sequence has length {n}, longer than "
                f"seq_len (the projections proj_k / proj_v cover {self.seq_len} positions)"
            )
        if self.training and self.dropout.p > 0:
            raise NotImplementedError(
                f"LinformerAttention: attention dropout (p={self.dropout.p}) is not implemented by the fused "
                "op; use dropout=0.0, or eval() for inference"
            )
        h, dh = self.heads, self.dim_head
        hkv = 1 if self.one_kv_head else h
        q = self.to_q(x).view(b, n, h, dh)
        k = self.to_k(kv_input).view(b, n, hkv, dh)
        v = k if self.share_kv else self.to_v(kv_input).view(b, n, hkv, dh)
        e = self.proj_k.t().unsqueeze(0)  # (1, k, seq_len): a strided view, no copy
        f = None if self.share_kv else self.proj_v.t().unsqueeze(0)
        from ._linformer import linformer_attention

        out = linformer_attention(q, k, v, e, f, key_padding_mask=key_padding_mask)
        return self.to_out(out.reshape(b, n, h * dh))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, seq_len={self.seq_len}, k={self.k}, heads={self.heads}, dim_head={self.dim_head}, "
            f"one_kv_head={self.one_kv_head}, share_kv={self.share_kv}"
        )
