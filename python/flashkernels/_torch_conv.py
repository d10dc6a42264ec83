"""torch integration of convolution and pooling: autograd, and the torch.library custom
ops that torch.compile and torch.export trace.

- Eager calls on plain tensors go through ``torch.autograd.Function`` s whose backward
  calls flashkernels' backward (the convolution's for dx, dweight, dbias; pooling's for
  dx), so torch tensors are differentiable on CPU (the reference) and CUDA (the kernels).
  The fused activation's derivative is applied with torch ops to the saved
  pre-activation before the convolution's backward.
- Under torch.compile / torch.export (and for tensor subclasses such as FakeTensor),
  conv2d is ``torch.ops.flashkernels.conv2d_fwd`` (fake implementation and autograd
  formula registered), whose backward is ``torch.ops.flashkernels.conv2d_bwd``; pooling
  is ``torch.ops.flashkernels.pool2d_fwd`` / ``pool2d_bwd`` likewise.

Registered when imported (see the package's ``register_torch_ops``). No ``from
__future__ import annotations``: torch.library infers the op schemas from annotations.
"""

import math
from typing import Any, List, Optional, Tuple

import torch

from . import _native
from ._conv import ConvArgs, PoolArgs, _int32_indices, conv_backward, conv_forward, pool_backward, pool_forward
from ._torch_ops import Autograd, autograd_function, custom_op, no_zero_strides, use_op, wants_grad

Tensor = torch.Tensor


def _activation_grad(activation: Optional[str], y_pre: Tensor, dy: Tensor) -> Tensor:
    """dy * act'(y_pre), computed in float32 (or float64) and returned in dy's dtype."""
    if activation is None:
        return dy
    x = y_pre.to(torch.float64 if y_pre.dtype == torch.float64 else torch.float32)
    if activation == "relu":
        d = (x > 0).to(x.dtype)
    elif activation == "gelu":
        d = 0.5 * (1.0 + torch.special.erf(x * (1.0 / math.sqrt(2.0)))) + x * torch.exp(-0.5 * x * x) * (
            1.0 / math.sqrt(2.0 * math.pi)
        )
    else:  # silu
        s = torch.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    return (dy.to(x.dtype) * d).to(dy.dtype)


# ---------------------------------------------------------------------------------------
# Convolution.


def _eager_conv_forward(x: Tensor, w: Tensor, b: Optional[Tensor], args: ConvArgs) -> Tuple[Tensor, Any]:
    """(y, y_pre); y_pre (None without an activation) is only saved, not returned."""
    return conv_forward(x, w, b, args, keep_pre=args.activation is not None)


def _eager_conv_save(inputs: tuple, outputs: tuple) -> tuple:
    x, w, b, args = inputs
    return (x, w, outputs[1]), (args, b is not None)


def _eager_conv_backward(state: tuple, saved: tuple, needs: Any, dy: Tensor) -> tuple:
    args, has_bias = state
    x, w, y_pre = saved
    dy = no_zero_strides(dy)
    if args.activation is not None:
        dy = _activation_grad(args.activation, y_pre, dy)
    need = (needs[0], needs[1], has_bias and needs[2])
    if not any(need):
        return ()
    return conv_backward(dy, x, w, args, need)


_Conv2d = autograd_function("_Conv2d", _eager_conv_forward, Autograd(_eager_conv_save, _eager_conv_backward), 1)


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _op_args(
    stride: List[int], padding: List[int], dilation: List[int], groups: int, activation: str, algo: str, weight: Tensor
) -> ConvArgs:
    return ConvArgs(weight, stride, padding, dilation, groups, activation or None, algo or None)


def _conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    activation: str,
    algo: str,
) -> Tuple[Tensor, Tensor]:
    """(y, y_pre): y_pre (conv + bias) is returned only with an activation, else empty."""
    args = _op_args(stride, padding, dilation, groups, activation, algo, weight)
    keep = args.activation is not None
    y, y_pre = conv_forward(x, weight, bias, args, keep_pre=keep)
    return y, (y_pre if keep else x.new_empty(0))


def _conv2d_fwd_fake(x, weight, bias, stride, padding, dilation, groups, activation, algo):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    shape = (
        n,
        k,
        _out_size(h, r, stride[0], padding[0], dilation[0]),
        _out_size(w, s, stride[1], padding[1], dilation[1]),
    )
    y = x.new_empty(shape)
    return y, (x.new_empty(shape) if activation else x.new_empty(0))


def _conv2d_bwd(
    dy_pre: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    algo: str,
    need: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) from the pre-activation gradient; empty where not needed."""
    args = _op_args(stride, padding, dilation, groups, "", algo, weight)
    grads = conv_backward(no_zero_strides(dy_pre), x, weight, args, (need[0], need[1], need[2]))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)  # type: ignore[return-value]


def _conv2d_bwd_fake(dy_pre, x, weight, stride, padding, dilation, groups, algo, need):
    shapes = (x.shape, weight.shape, (weight.shape[0],))
    return tuple(x.new_empty(s if n else (0,)) for s, n in zip(shapes, need))


def _conv2d_op_save(inputs: tuple, outputs: tuple) -> tuple:
    x, weight, bias, stride, padding, dilation, groups, activation, algo = inputs
    return (x, weight, outputs[1]), (stride, padding, dilation, groups, activation, algo, bias is not None)


def _conv2d_op_backward(state: tuple, saved: tuple, needs: Any, dy: Tensor, _dy_pre: Any) -> tuple:
    x, weight, y_pre = saved
    stride, padding, dilation, groups, activation, algo, has_bias = state
    if activation:
        dy = _activation_grad(activation, y_pre, dy)
    need = [needs[0], needs[1], has_bias and needs[2]]
    dx, dw, db = torch.ops.flashkernels.conv2d_bwd(dy, x, weight, stride, padding, dilation, groups, algo, need)
    return dx if need[0] else None, dw if need[1] else None, db if need[2] else None


conv2d_bwd = custom_op("conv2d_bwd", _conv2d_bwd, _conv2d_bwd_fake)
conv2d_fwd = custom_op("conv2d_fwd", _conv2d_fwd, _conv2d_fwd_fake, Autograd(_conv2d_op_save, _conv2d_op_backward))


def conv2d(x: Tensor, w: Tensor, b: Optional[Tensor], args: ConvArgs) -> Tensor:
    tensors = [t for t in (x, w, b) if t is not None]
    if use_op(tensors):
        return torch.ops.flashkernels.conv2d_fwd(
            x,
            w,
            b,
            list(args.stride),
            list(args.padding),
            list(args.dilation),
            args.groups,
            args.activation or "",
            args.algo or "",
        )[0]
    if wants_grad(tensors):
        return _Conv2d.apply(x, w, b, args)
    return conv_forward(x, w, b, args, keep_pre=False)[0]


# ---------------------------------------------------------------------------------------
# Pooling.


def _pool_args(
    kind: str,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor: int,
) -> PoolArgs:
    return PoolArgs(kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, divisor or None)


def _pool_op_args(args: PoolArgs) -> tuple:
    return (
        args.kind,
        list(args.kernel_size),
        list(args.stride),
        list(args.padding),
        list(args.dilation),
        args.ceil_mode,
        args.count_include_pad,
        args.divisor_override or 0,
    )


def _pool2d_fwd(
    x: Tensor,
    kind: str,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor: int,
) -> Tuple[Tensor, Tensor]:
    """(y, int32 argmax indices): indices only for max pooling, else empty."""
    args = _pool_args(kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, divisor)
    y, idx32 = pool_forward(x, args)
    return y, (idx32 if idx32 is not None else x.new_empty(0, dtype=torch.int32))


def _pool2d_fwd_fake(x, kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, divisor):
    args = _pool_args(kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, divisor)
    shape = tuple(_native.pool2d_output_shape([int(n) for n in x.shape], **args.native()))
    idx = x.new_empty(shape, dtype=torch.int32) if kind == "max" else x.new_empty(0, dtype=torch.int32)
    return x.new_empty(shape), idx


def _pool2d_bwd(
    dy: Tensor,
    indices: Tensor,
    input_shape: List[int],
    kind: str,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor: int,
) -> Tensor:
    """dx from dy (and, for max pooling, the forward's int32 indices)."""
    args = _pool_args(kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, divisor)
    return pool_backward(no_zero_strides(dy), input_shape, indices if kind == "max" else None, args)


def _pool2d_bwd_fake(
    dy, indices, input_shape, kind, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad, divisor
):
    return dy.new_empty(input_shape)


def _pool2d_op_save(inputs: tuple, outputs: tuple) -> tuple:
    return (outputs[1],), (list(inputs[0].shape), inputs[1:])


def _pool2d_op_backward(state: tuple, saved: tuple, _needs: Any, dy: Tensor, _didx: Any) -> tuple:
    input_shape, options = state
    return (torch.ops.flashkernels.pool2d_bwd(dy, saved[0], input_shape, *options),)


pool2d_bwd = custom_op("pool2d_bwd", _pool2d_bwd, _pool2d_bwd_fake)
pool2d_fwd = custom_op("pool2d_fwd", _pool2d_fwd, _pool2d_fwd_fake, Autograd(_pool2d_op_save, _pool2d_op_backward))


# The eager route: forward (y, int32 indices or None); max pooling returns both (the
# indices not differentiable), average pooling y alone.


def _eager_pool_save(inputs: tuple, outputs: tuple) -> tuple:
    x, args = inputs
    return (outputs[1],), (tuple(x.shape), args)


def _eager_pool_backward(state: tuple, saved: tuple, _needs: Any, dy: Tensor, *_didx: Any) -> tuple:
    input_shape, args = state
    return (pool_backward(no_zero_strides(dy), input_shape, saved[0], args),)


_MaxPool2d = autograd_function(
    "_MaxPool2d", pool_forward, Autograd(_eager_pool_save, _eager_pool_backward, non_differentiable=(1,))
)
_AvgPool2d = autograd_function("_AvgPool2d", pool_forward, Autograd(_eager_pool_save, _eager_pool_backward), 1)


def max_pool2d(x: Tensor, args: PoolArgs) -> Tuple[Tensor, Tensor]:
    if use_op([x]):
        y, idx32 = torch.ops.flashkernels.pool2d_fwd(x, *_pool_op_args(args))
    elif wants_grad([x]):
        y, idx32 = _MaxPool2d.apply(x, args)
    else:
        y, idx32 = pool_forward(x, args)
    return y, idx32.to(torch.int64)


def avg_pool2d(x: Tensor, args: PoolArgs) -> Tensor:
    if use_op([x]):
        return torch.ops.flashkernels.pool2d_fwd(x, *_pool_op_args(args))[0]
    if wants_grad([x]):
        return _AvgPool2d.apply(x, args)
    return pool_forward(x, args)[0]


__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "_int32_indices"]
