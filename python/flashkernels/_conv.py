"""Convolution and pooling: the public functions and their DLPack glue.

Arguments follow torch.nn.functional's conventions (an int or an (h, w) pair for
``stride``, ``padding``, ``dilation``, ``kernel_size``); inputs are (N, C, H, W) logical
arrays in any memory order (NCHW or channels-last NHWC strides, no copy). numpy (and any
CPU DLPack array) runs the CPU reference; torch / cupy CUDA tensors run the CUDA kernels.
torch tensors are differentiable (see ``_torch_conv``).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple, Union

from . import _native
from ._dlpack import MAX_INT, Placement, check_arrays, check_bool, check_int, dtype_name, is_bool, is_torch, type_name

_Pair = Tuple[int, int]
_ACTIVATIONS = (None, "none", "relu", "gelu", "silu")
_ALGOS = (None, "im2col", "implicit_gemm")


def _pair(name: str, v: Any) -> _Pair:
    """An int or a pair of ints as an (h, w) pair of ints in [0, 2**63 - 1] (the native
    module's range; the op checks what the shapes allow)."""
    if is_bool(v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    try:
        i = operator.index(v)  # an int (Python's or numpy's)
        v = (i, i)
    except TypeError:
        pass
    try:
        h, w = v
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {type_name(v)}") from None
    pair = []
    for x in (h, w):
        try:
            if is_bool(x):
                raise TypeError
            pair.append(operator.index(x))
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {_describe(v)}") from None
    h, w = pair
    for x in pair:
        if x < 0:
            raise ValueError(f"{name} must be non-negative, got {_describe(v)}")
        if x > MAX_INT:
            raise ValueError(f"{name} is too large: {_describe(v)} (each at most 2**63 - 1)")
    return (int(h), int(w))


def _describe(v: Any) -> str:
    if hasattr(v, "shape") and not isinstance(v, (list, tuple)):
        return f"{type_name(v)} of shape {tuple(int(n) for n in v.shape)}"
    r = repr(tuple(v)) if isinstance(v, (list, tuple)) else repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _shape(x: Any, name: str = "input") -> Tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name}: expected an array or tensor, got {type_name(x)}")
    return tuple(int(n) for n in shape)


def _conv_padding(padding: Any, weight: Any, dilation: _Pair, stride: _Pair) -> _Pair:
    """torch's padding argument: an int, a pair, 'valid' (0) or 'same' (stride 1 only,
    symmetric padding: an even dilated kernel extent has no symmetric 'same')."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            r, s = _shape(weight)[2:4]
            total = [d * (k - 1) for d, k in zip(dilation, (r, s))]
            if any(t % 2 for t in total):
                raise ValueError(
                    f"padding='same' needs an odd dilated kernel extent here (kernel {(r, s)}, "
                    f"dilation {dilation}); pass explicit padding"
                )
            return (total[0] // 2, total[1] // 2)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    return _pair("padding", padding)


def _check_choice(name: str, v: Any, choices: Sequence[Any]) -> None:
    if v is not None and not isinstance(v, str):
        raise TypeError(f"{name} must be a str or None, got {type_name(v)}")
    if v not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {v!r}")


class ConvArgs:
    """Normalised convolution options, as the native module takes them."""

    def __init__(
        self,
        weight: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        activation: Optional[str],
        algo: Optional[str],
    ):
        self.stride = _pair("stride", stride)
        self.dilation = _pair("dilation", dilation)
        self.padding = _conv_padding(padding, weight, self.dilation, self.stride)
        self.groups = check_int("groups", groups)
        _check_choice("activation", activation, _ACTIVATIONS)
        _check_choice("algo", algo, _ALGOS)
        self.activation = None if activation == "none" else activation
        self.algo = algo

    def native(self, *, activation: bool = True) -> dict:
        d = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups, algo=self.algo)
        if activation:
            d["activation"] = self.activation
        return d


def conv2d(
    input: Any,
    weight: Any,
    bias: Any = None,
    stride: Union[int, _Pair] = 1,
    padding: Union[int, _Pair, str] = 0,
    dilation: Union[int, _Pair] = 1,
    groups: int = 1,
    *,
    activation: Optional[str] = None,
    algo: Optional[str] = None,
) -> Any:
    """``torch.nn.functional.conv2d`` with a fused activation: ``act(conv(input, weight)
    + bias)``.

    input (N, C, H, W), weight (K, C / groups, R, S), bias (K) or None, all one dtype
    (float32, float16, bfloat16) on one device; any memory order. ``activation``: None,
    "relu", "gelu" (exact, erf) or "silu". ``algo`` (CUDA): None (flashkernels picks the
    implicit GEMM where it applies, else im2col), "im2col" or "implicit_gemm". Returns an
    (N, K, P, Q) array of the caller's type; torch tensors are differentiable in input,
    weight and bias.
    """
    check_arrays((("input", input), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()))
    args = ConvArgs(weight, stride, padding, dilation, groups, activation, algo)
    if is_torch(input):
        from . import _torch_conv

        return _torch_conv.conv2d(input, weight, bias, args)
    return conv_forward(input, weight, bias, args, keep_pre=False)[0]


def conv2d_backward(
    grad_output: Any,
    input: Any,
    weight: Any,
    stride: Union[int, _Pair] = 1,
    padding: Union[int, _Pair, str] = 0,
    dilation: Union[int, _Pair] = 1,
    groups: int = 1,
    *,
    bias: Any = None,
    activation: Optional[str] = None,
    algo: Optional[str] = None,
) -> Tuple[Any, Any, Any]:
    """The gradients (d_input, d_weight, d_bias) of :func:`conv2d` for a gradient
    ``grad_output`` of its output, for frameworks whose autograd flashkernels does not
    plug into (numpy). With an activation the pre-activation is recomputed (bias needed
    then); d_bias is the sum of the pre-activation gradient over (N, P, Q)."""
    check_arrays(
        (("grad_output", grad_output), ("input", input), ("weight", weight))
        + ((("bias", bias),) if bias is not None else ())
    )
    args = ConvArgs(weight, stride, padding, dilation, groups, activation, algo)
    dy = grad_output
    if args.activation is not None:
        _, y_pre = conv_forward(input, weight, bias, args, keep_pre=True)
        dy = activation_backward(args.activation, y_pre, dy)
    return conv_backward(dy, input, weight, args, (True, True, True))


def _np_erf(x: Any) -> Any:
    import numpy as np

    return np.vectorize(math.erf, otypes=[np.float64])(x)


def activation_backward(activation: Optional[str], y_pre: Any, dy: Any) -> Any:
    """dy * act'(y_pre) for numpy arrays (computed in float64, returned in dy's dtype)."""
    import numpy as np

    x = np.asarray(y_pre, dtype=np.float64)
    g = np.asarray(dy, dtype=np.float64)
    if activation is None:
        d = np.ones_like(x)
    elif activation == "relu":
        d = (x > 0).astype(np.float64)
    elif activation == "gelu":
        d = 0.5 * (1.0 + _np_erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    else:  # silu
        s = 1.0 / (1.0 + np.exp(-x))
        d = s * (1.0 + x * (1.0 - s))
    return (g * d).astype(np.asarray(dy).dtype)


def conv_forward(x: Any, w: Any, b: Any, args: ConvArgs, *, keep_pre: bool) -> Tuple[Any, Any]:
    """(y, y_pre or None) in the caller's framework, through the native module."""
    named = [("input", x), ("weight", w)] + ([("bias", b)] if b is not None else [])
    place = Placement(named)
    geometry = dict(stride=args.stride, padding=args.padding, dilation=args.dilation, groups=args.groups)
    shape = tuple(_native.conv2d_output_shape(list(_shape(x)), list(_shape(w)), **geometry))
    y = _empty_like_input(place, x, shape, dtype_name(x))
    y_pre = _empty_like_input(place, x, shape, dtype_name(x)) if keep_pre else None
    _native.conv2d_forward(
        place.export("input", x),
        place.export("weight", w),
        None if b is None else place.export("bias", b),
        place.export("y", y),
        None if y_pre is None else place.export("y_pre", y_pre),
        stream=place.stream,
        **args.native(),
    )
    return place.to_caller(y), (None if y_pre is None else place.to_caller(y_pre))


def conv_backward(dy: Any, x: Any, w: Any, args: ConvArgs, need: Tuple[bool, bool, bool]) -> Tuple[Any, Any, Any]:
    """(dx, dweight, dbias), None where not needed; dy is the pre-activation gradient."""
    place = Placement([("grad_output", dy), ("input", x), ("weight", w)])
    dtype = dtype_name(x)
    made = (
        _empty_like_input(place, x, tuple(_shape(x)), dtype) if need[0] else None,
        place.empty(tuple(_shape(w)), dtype) if need[1] else None,
        place.empty((int(_shape(w)[0]),), dtype) if need[2] else None,
    )
    _native.conv2d_backward(
        place.export("input", x),
        place.export("weight", w),
        place.export("grad_output", dy),
        *(None if t is None else place.export("grad", t) for t in made),
        stream=place.stream,
        **args.native(activation=False),
    )
    return tuple(None if t is None else place.to_caller(t) for t in made)  # type: ignore[return-value]


def _empty_like_input(place: Placement, x: Any, shape: tuple, dtype: str) -> Any:
    """An output of (N, C', H', W') shape in x's memory format (channels-last for a
    channels-last torch input, as torch's conv2d does)."""
    t = place.empty(shape, dtype)
    if place.fw == "torch":
        import torch

        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            t = t.contiguous(memory_format=torch.channels_last)
    return t


# ---------------------------------------------------------------------------------------
# Pooling.


class PoolArgs:
    """Normalised pooling options, as the native module takes them."""

    def __init__(
        self,
        kind: str,
        kernel_size: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        ceil_mode: bool,
        count_include_pad: bool = True,
        divisor_override: Optional[int] = None,
    ):
        self.kind = kind
        self.kernel_size = _pair("kernel_size", kernel_size)
        # torch: stride=None (or an empty list) means the kernel size.
        self.stride = self.kernel_size if stride is None or stride == [] or stride == () else _pair("stride", stride)
        self.padding = _pair("padding", padding)
        self.dilation = _pair("dilation", dilation)
        self.ceil_mode = check_bool("ceil_mode", ceil_mode)
        self.count_include_pad = check_bool("count_include_pad", count_include_pad)
        if divisor_override is not None:
            divisor_override = check_int("divisor_override", divisor_override, minimum=1)
        self.divisor_override = divisor_override

    def native(self) -> dict:
        return dict(
            kind=self.kind,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
            divisor_override=self.divisor_override,
        )


def _index_buffer(place: Placement, shape: tuple) -> Any:
    """An int32 buffer for max-pooling indices where the input is (numpy on the host)."""
    if place.fw == "jax":
        raise TypeError("max_pool2d: jax arrays are not supported (the indices need a mutable int32 array)")
    return place.empty(shape, "int32")


def pool_forward(x: Any, args: PoolArgs) -> Tuple[Any, Any]:
    """(y, int32 indices or None) in the caller's framework."""
    place = Placement([("input", x)])
    shape = tuple(_native.pool2d_output_shape(list(_shape(x)), **args.native()))
    y = _empty_like_input(place, x, shape, dtype_name(x))
    idx = _index_buffer(place, shape) if args.kind == "max" else None
    _native.pool2d_forward(
        place.export("input", x),
        place.export("y", y),
        None if idx is None else place.export("indices", idx),
        stream=place.stream,
        **args.native(),
    )
    return place.to_caller(y), idx


def pool_backward(dy: Any, input_shape: Sequence[int], indices: Any, args: PoolArgs) -> Any:
    """dx for the forward on an input of `input_shape`; `indices` (max pooling) int32
    of the output's shape, on dy's device."""
    place = Placement([("grad_output", dy)] + ([] if indices is None else [("indices", indices)]))
    dx = place.empty(tuple(int(n) for n in input_shape), dtype_name(dy))
    _native.pool2d_backward(
        place.export("grad_output", dy),
        place.export("grad_input", dx),
        None if indices is None else place.export("indices", indices),
        stream=place.stream,
        **args.native(),
    )
    return place.to_caller(dx)


_INDEX_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")


def _int32_indices(place_fw: Optional[str], indices: Any) -> Any:
    """The indices as contiguous int32, refusing what int32 cannot hold (a cast would wrap
    2**32 + 3 to 3); the native op checks their shape and range."""
    dt = dtype_name(indices)
    if dt not in _INDEX_DTYPES:
        raise TypeError(f"indices must be an integer array (int64 as max_pool2d returns them, or int32), got {dt}")
    if dt not in ("int8", "uint8", "int16", "uint16", "int32") and int(math.prod(_shape(indices, "indices"))) > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -(2**31) or hi >= 2**31:
            bad = lo if lo < -(2**31) else hi
            raise ValueError(f"indices: value {bad} is outside the int32 range (no input plane has that many elements)")
    if place_fw == "torch":
        import torch

        return indices.to(torch.int32).contiguous()
    if place_fw == "cupy":
        import cupy

        return cupy.ascontiguousarray(indices, dtype=cupy.int32)
    import numpy as np

    return np.ascontiguousarray(indices, dtype=np.int32)


def _int64_indices(fw: Optional[str], idx: Any) -> Any:
    if fw == "torch":
        import torch

        return idx.to(torch.int64)
    return idx.astype("int64")


def max_pool2d(
    input: Any,
    kernel_size: Union[int, _Pair],
    stride: Optional[Union[int, _Pair]] = None,
    padding: Union[int, _Pair] = 0,
    dilation: Union[int, _Pair] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """``torch.nn.functional.max_pool2d``: (N, C, H, W) -> (N, C, P, Q); with
    ``return_indices`` also the int64 argmax of each window as h * W + w within its
    plane (the first maximum on ties; padding never wins). torch tensors are
    differentiable."""
    check_arrays((("input", input),))
    args = PoolArgs("max", kernel_size, stride, padding, dilation, ceil_mode)
    return_indices = check_bool("return_indices", return_indices)
    if is_torch(input):
        from . import _torch_conv

        y, idx = _torch_conv.max_pool2d(input, args)
    else:
        y, idx32 = pool_forward(input, args)
        idx = _int64_indices(Placement([("input", input)]).fw, idx32) if return_indices else None
    return (y, idx) if return_indices else y


def avg_pool2d(
    input: Any,
    kernel_size: Union[int, _Pair],
    stride: Optional[Union[int, _Pair]] = None,
    padding: Union[int, _Pair] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> Any:
    """``torch.nn.functional.avg_pool2d``: each window's mean, dividing by the window
    clipped to the padded input (``count_include_pad``) or to the input, or by
    ``divisor_override``. torch tensors are differentiable."""
    check_arrays((("input", input),))
    args = PoolArgs("avg", kernel_size, stride, padding, 1, ceil_mode, count_include_pad, divisor_override)
    if is_torch(input):
        from . import _torch_conv

        return _torch_conv.avg_pool2d(input, args)
    return pool_forward(input, args)[0]


def max_pool2d_backward(
    grad_output: Any,
    input: Any,
    indices: Any,
    kernel_size: Union[int, _Pair],
    stride: Optional[Union[int, _Pair]] = None,
    padding: Union[int, _Pair] = 0,
    dilation: Union[int, _Pair] = 1,
    ceil_mode: bool = False,
) -> Any:
    """The input gradient of :func:`max_pool2d` from the forward's indices (numpy)."""
    if indices is None:
        raise TypeError(
            "indices: max_pool2d_backward needs the forward's indices (max_pool2d(..., return_indices=True))"
        )
    check_arrays((("grad_output", grad_output), ("input", input), ("indices", indices)))
    args = PoolArgs("max", kernel_size, stride, padding, dilation, ceil_mode)
    fw = Placement([("grad_output", grad_output)]).fw
    return pool_backward(grad_output, _shape(input), _int32_indices(fw, indices), args)


def avg_pool2d_backward(
    grad_output: Any,
    input: Any,
    kernel_size: Union[int, _Pair],
    stride: Optional[Union[int, _Pair]] = None,
    padding: Union[int, _Pair] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> Any:
    """The input gradient of :func:`avg_pool2d` (numpy)."""
    check_arrays((("grad_output", grad_output), ("input", input)))
    args = PoolArgs("avg", kernel_size, stride, padding, 1, ceil_mode, count_include_pad, divisor_override)
    return pool_backward(grad_output, _shape(input), None, args)
