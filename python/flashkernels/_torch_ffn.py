"""torch integration of the fused feed-forward block: autograd, the torch.library custom
ops that torch.compile and torch.export trace, and ``FeedForward``, a ``torch.nn.Module``
whose state_dict is that of two (three when gated) ``nn.Linear`` layers.

- Eager calls on plain tensors go through a ``torch.autograd.Function`` whose backward
  calls flashkernels' backward (dx, dW1, dW2, dW3 and the biases' gradients in one call).
- Under torch.compile / torch.export (and for tensor subclasses such as FakeTensor), the
  block is ``torch.ops.flashkernels.ffn_fwd`` (fake implementation and autograd formula
  registered), whose backward is ``torch.ops.flashkernels.ffn_bwd``.

Leading dimensions of x are flattened to tokens outside the ops (a torch reshape that
autograd and the tracer see). Registered when imported (see the package's
``register_torch_ops``). No ``from __future__ import annotations``: torch.library infers
the op schemas from annotations.
"""

from typing import Any, List, Optional, Tuple

import torch

from ._dlpack import check_bool, check_int
from ._ffn import FfnArgs, ffn_backward, ffn_forward
from ._torch_ops import Autograd, autograd_function, custom_op, kernel_ready, use_op, wants_grad

Tensor = torch.Tensor


def _ready(ts: tuple) -> tuple:
    """The tensors as the kernels read them in place (unit last stride; on CUDA 16-byte
    aligned rows), copies where not: nn.Linear takes any strides. Inside the ops and the
    autograd Function only (real tensors, not traced)."""
    return tuple(None if t is None else kernel_ready(t) for t in ts)


def _grads(dy: Tensor, inputs: tuple, args: FfnArgs, need: List[bool]) -> tuple:
    """(dx, dw1, dw2, dw3, db1, db2, db3), None where not needed or not given."""
    if not any(need):
        return (None,) * 7
    return ffn_backward(kernel_ready(dy), *_ready(inputs), args, need)


# ---------------------------------------------------------------------------------------
# Eager route.


def _eager_forward(x, w1, w2, w3, b1, b2, b3, args):  # type: ignore[no-untyped-def]
    return ffn_forward(*_ready((x, w1, w2, w3, b1, b2, b3)), args)


def _eager_save(inputs: tuple, outputs: tuple) -> tuple:
    return inputs[:7], inputs[7]


def _eager_backward(args: FfnArgs, saved: tuple, needs: Any, dy: Tensor) -> tuple:
    need = [bool(needs[i]) and saved[i] is not None for i in range(7)]
    return _grads(dy, tuple(saved), args, need)


_FeedForward = autograd_function("_FeedForward", _eager_forward, Autograd(_eager_save, _eager_backward))


# ---------------------------------------------------------------------------------------
# torch.library ops.


def _ffn_fwd(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Optional[Tensor],
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    b3: Optional[Tensor],
    activation: str,
    residual: bool,
) -> Tensor:
    return ffn_forward(*_ready((x, w1, w2, w3, b1, b2, b3)), FfnArgs(activation, residual))


def _ffn_fwd_fake(x, w1, w2, w3, b1, b2, b3, activation, residual):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], w2.shape[0]))


def _ffn_bwd(
    dy: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Optional[Tensor],
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    b3: Optional[Tensor],
    activation: str,
    residual: bool,
    need: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, dw2, dw3, db1, db2, db3); empty where not needed (or not given)."""
    inputs = (x, w1, w2, w3, b1, b2, b3)
    need = [bool(n) and t is not None for n, t in zip(need, inputs)]
    grads = _grads(dy, inputs, FfnArgs(activation, residual), need)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)  # type: ignore[return-value]


def _ffn_bwd_fake(dy, x, w1, w2, w3, b1, b2, b3, activation, residual, need):  # type: ignore[no-untyped-def]
    inputs = (x, w1, w2, w3, b1, b2, b3)
    return tuple(x.new_empty(t.shape if (n and t is not None) else (0,)) for t, n in zip(inputs, need))  # type: ignore[union-attr]


def _op_save(inputs: tuple, outputs: tuple) -> tuple:
    return inputs[:7], (inputs[7], inputs[8])


def _op_backward(state: tuple, saved: tuple, needs: Any, dy: Tensor) -> tuple:
    activation, residual = state
    need = [bool(needs[i]) and saved[i] is not None for i in range(7)]
    if not any(need):
        return ()
    grads = torch.ops.flashkernels.ffn_bwd(dy, *saved, activation, residual, need)
    return tuple(g if n else None for g, n in zip(grads, need))


ffn_bwd = custom_op("ffn_bwd", _ffn_bwd, _ffn_bwd_fake)
ffn_fwd = custom_op("ffn_fwd", _ffn_fwd, _ffn_fwd_fake, Autograd(_op_save, _op_backward))


def feed_forward(x: Tensor, w1: Tensor, w2: Tensor, w3: Any, b1: Any, b2: Any, b3: Any, args: FfnArgs) -> Tensor:
    """The block on torch tensors, x (..., d_model); differentiable in every input."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., d_model), got a scalar")
    lead = tuple(x.shape[:-1])
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    tensors = [t for t in (x2, w1, w2, w3, b1, b2, b3) if t is not None]
    if use_op(tensors):
        y = torch.ops.flashkernels.ffn_fwd(x2, w1, w2, w3, b1, b2, b3, args.activation, args.residual)
    elif wants_grad(tensors):
        y = _FeedForward.apply(x2, w1, w2, w3, b1, b2, b3, args)
    else:
        y = ffn_forward(*_ready((x2, w1, w2, w3, b1, b2, b3)), args)
    return y if x.dim() == 2 else y.reshape(lead + (y.shape[-1],))


# ---------------------------------------------------------------------------------------
# The module.


class FeedForward(torch.nn.Module):
    """A drop-in feed-forward block: ``w2(act(w1(x)))`` (``+ x`` with ``residual``), or,
    with ``gated=True``, ``w2(act(w1(x)) * w3(x))`` (SwiGLU with "silu", as Llama's MLP;
    GeGLU with "gelu" / "gelu_tanh"), run by :func:`flashkernels.feed_forward`.

    ``w1``, ``w2`` (and ``w3``) are ``torch.nn.Linear`` layers (d_model -> d_hidden,
    d_hidden -> d_model, d_model -> d_hidden), initialised as torch initialises them, so
    the state_dict has the keys ``w1.weight``, ``w1.bias``, ``w2.weight``, ``w2.bias``
    (``w3.weight``, ``w3.bias``) and loads from / into such layers; a state_dict of other
    shapes is refused by ``load_state_dict`` with torch's size-mismatch error.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        residual: bool = False,
        dtype: Any = None,
        device: Any = None,
    ):
        super().__init__()
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.d_hidden = check_int("d_hidden", d_hidden, minimum=1)
        self._args = FfnArgs(activation, residual)
        self.gated = check_bool("gated", gated)
        bias = check_bool("bias", bias)
        kw = dict(bias=bias, dtype=dtype, device=device)
        self.w1 = torch.nn.Linear(self.d_model, self.d_hidden, **kw)  # type: ignore[arg-type]
        self.w2 = torch.nn.Linear(self.d_hidden, self.d_model, **kw)  # type: ignore[arg-type]
        self.w3 = torch.nn.Linear(self.d_model, self.d_hidden, **kw) if self.gated else None  # type: ignore[arg-type]

    @property
    def activation(self) -> str:
        return self._args.activation

    @property
    def residual(self) -> bool:
        return self._args.residual

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FeedForward expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"FeedForward(d_model={self.d_model}): x must be (..., {self.d_model}), got shape {tuple(x.shape)}"
            )
        w3 = self.w3
        return feed_forward(
            x,
            self.w1.weight,
            self.w2.weight,
            None if w3 is None else w3.weight,
            self.w1.bias,
            self.w2.bias,
            None if w3 is None else w3.bias,
            self._args,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, "
            f"gated={self.gated}, residual={self.residual}"
        )
