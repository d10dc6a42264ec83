"""The fused feed-forward block (FFN): the public functions and their DLPack glue.

``feed_forward(x, w1, w2, b1, b2, *, w3, b3, activation, residual)`` computes

    y = act(x W1ᵀ + b1) W2ᵀ + b2 (+ x)                       (w3 None)
    y = (act(x W1ᵀ + b1) ∘ (x W3ᵀ + b3)) W2ᵀ + b2 (+ x)      (gated: SwiGLU, GeGLU)

with the weights as ``torch.nn.Linear`` stores them: W1 / W3 (d_hidden, d_model), W2
(d_model, d_hidden). x is (..., d_model): its leading dimensions are flattened to tokens.
numpy (and any CPU DLPack array) runs the CPU reference (float64 inside, the hidden
activation and y each rounded once to the dtype); torch tensors are differentiable (see
``_torch_ffn``).
"""

from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

from . import _native
from ._dlpack import Placement, check_arrays, check_bool, dtype_name, is_torch, type_name

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


class FfnArgs:
    """Normalised feed-forward options, as the native module takes them."""

    def __init__(self, activation: Any, residual: Any):
        if not isinstance(activation, str):
            raise TypeError(f"activation must be a str, got {type_name(activation)}")
        if activation not in ACTIVATIONS:
            listed = ", ".join(repr(a) for a in ACTIVATIONS)
            raise ValueError(f"activation must be one of {listed}; got {activation!r}")
        self.activation = activation
        self.residual = check_bool("residual", residual)

    def native(self) -> dict:
        return dict(activation=self.activation, residual=self.residual)


def _shape(name: str, x: Any) -> List[int]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name}: expected an array or tensor, got {type_name(x)}")
    return [int(n) for n in shape]


def flatten_tokens(x: Any) -> Tuple[Any, Tuple[int, ...]]:
    """(x as (tokens, d_model), the leading shape): a 2-D x is passed as it is (any row
    stride), a 1-D x is one token, more dimensions are flattened (a view where the
    framework can, else a copy)."""
    shape = _shape("x", x)
    if len(shape) == 0:
        raise ValueError("x must have at least one dimension (..., d_model), got a scalar")
    if len(shape) == 2:
        return x, (shape[0],)
    lead = tuple(shape[:-1])
    return x.reshape((int(math.prod(lead)), shape[-1])), lead


def _named(x: Any, w1: Any, w2: Any, w3: Any, b1: Any, b2: Any, b3: Any) -> List[Tuple[str, Any]]:
    named = [("x", x), ("w1", w1), ("w2", w2)]
    named += [(n, t) for n, t in (("w3", w3), ("b1", b1), ("b2", b2), ("b3", b3)) if t is not None]
    return named


def ffn_shapes(x: Any, w1: Any, w2: Any, w3: Any, b1: Any, b2: Any, b3: Any, args: FfnArgs) -> Tuple[tuple, tuple]:
    """(y, hidden) shapes of a call on 2-D x, validated by the native module."""
    opt = (None if t is None else _shape(n, t) for n, t in (("w3", w3), ("b1", b1), ("b2", b2), ("b3", b3)))
    y, h = _native.ffn_shapes(_shape("x", x), _shape("w1", w1), _shape("w2", w2), *opt, **args.native())
    return tuple(y), tuple(h)


def ffn_forward(x: Any, w1: Any, w2: Any, w3: Any, b1: Any, b2: Any, b3: Any, args: FfnArgs) -> Any:
    """y (tokens, d_model) in the caller's framework for a 2-D x."""
    place = Placement(_named(x, w1, w2, w3, b1, b2, b3))
    y_shape, _ = ffn_shapes(x, w1, w2, w3, b1, b2, b3, args)
    y = place.empty(y_shape, dtype_name(x))
    ex = lambda n, t: None if t is None else place.export(n, t)  # noqa: E731
    _native.ffn_forward(
        ex("x", x),
        ex("w1", w1),
        ex("w2", w2),
        ex("y", y),
        ex("w3", w3),
        ex("b1", b1),
        ex("b2", b2),
        ex("b3", b3),
        stream=place.stream,
        **args.native(),
    )
    return place.to_caller(y)


GRAD_NAMES = ("dx", "dw1", "dw2", "dw3", "db1", "db2", "db3")


def ffn_backward(
    dy: Any,
    x: Any,
    w1: Any,
    w2: Any,
    w3: Any,
    b1: Any,
    b2: Any,
    b3: Any,
    args: FfnArgs,
    need: Sequence[bool] = (True,) * 7,
) -> Tuple[Any, ...]:
    """(dx, dw1, dw2, dw3, db1, db2, db3) for 2-D x and dy, None where the input was not
    given or its gradient is not needed."""
    inputs = (x, w1, w2, w3, b1, b2, b3)
    place = Placement([("grad_output", dy)] + _named(x, w1, w2, w3, b1, b2, b3))
    ffn_shapes(x, w1, w2, w3, b1, b2, b3, args)  # validates before allocating
    dtype = dtype_name(x)
    made = tuple(
        place.empty(tuple(_shape("input", t)), dtype) if t is not None and n else None for t, n in zip(inputs, need)
    )
    ex = lambda n, t: None if t is None else place.export(n, t)  # noqa: E731
    _native.ffn_backward(
        ex("x", x),
        ex("w1", w1),
        ex("w2", w2),
        ex("grad_output", dy),
        ex("w3", w3),
        ex("b1", b1),
        ex("b2", b2),
        ex("b3", b3),
        stream=place.stream,
        **{n: ex(n, t) for n, t in zip(GRAD_NAMES, made)},
        **args.native(),
    )
    return tuple(None if t is None else place.to_caller(t) for t in made)


def _check(x: Any, w1: Any, w2: Any, b1: Any, b2: Any, w3: Any, b3: Any, extra: Sequence[Tuple[str, Any]] = ()) -> None:
    named = list(extra) + [("x", x), ("w1", w1), ("w2", w2)]
    named += [(n, t) for n, t in (("b1", b1), ("b2", b2), ("w3", w3), ("b3", b3)) if t is not None]
    check_arrays(named)


def feed_forward(
    x: Any,
    w1: Any,
    w2: Any,
    b1: Any = None,
    b2: Any = None,
    *,
    w3: Any = None,
    b3: Any = None,
    activation: str = "gelu",
    residual: bool = False,
) -> Any:
    """The fused feed-forward block: ``act(x W1ᵀ + b1) W2ᵀ + b2`` (``+ x`` with
    ``residual``), or, gated when ``w3`` is given, ``(act(x W1ᵀ + b1) ∘ (x W3ᵀ + b3)) W2ᵀ
    + b2``: SwiGLU is ``activation="silu"`` with w3, GeGLU ``"gelu"`` / ``"gelu_tanh"``
    with w3.

    x (..., d_model); w1, w3 (d_hidden, d_model) and w2 (d_model, d_hidden), as
    ``torch.nn.Linear`` stores its weight; b1, b3 (d_hidden) and b2 (d_model) optional;
    one dtype (float32, float16, bfloat16) on one device. ``activation``: "relu", "gelu"
    (exact, erf), "gelu_tanh" (torch's ``approximate="tanh"``) or "silu". Returns y
    (..., d_model) of the caller's type; torch tensors are differentiable in every input.
    """
    _check(x, w1, w2, b1, b2, w3, b3)
    args = FfnArgs(activation, residual)
    if is_torch(x):
        from . import _torch_ffn

        return _torch_ffn.feed_forward(x, w1, w2, w3, b1, b2, b3, args)
    x2, lead = flatten_tokens(x)
    y = ffn_forward(x2, w1, w2, w3, b1, b2, b3, args)
    return y if len(_shape("x", x)) == 2 else y.reshape(lead + (int(_shape("y", y)[-1]),))


def feed_forward_backward(
    grad_output: Any,
    x: Any,
    w1: Any,
    w2: Any,
    b1: Any = None,
    b2: Any = None,
    *,
    w3: Any = None,
    b3: Any = None,
    activation: str = "gelu",
    residual: bool = False,
) -> Tuple[Any, Any, Any, Any, Any, Any, Any]:
    """The gradients ``(dx, dw1, dw2, db1, db2, dw3, db3)`` of :func:`feed_forward` for a
    gradient ``grad_output`` (x's shape) of its output, for frameworks whose autograd
    flashkernels does not plug into (numpy). The gradient of an input that was not given
    (a bias, w3) is None. The hidden activation is recomputed from the inputs."""
    _check(x, w1, w2, b1, b2, w3, b3, extra=(("grad_output", grad_output),))
    args = FfnArgs(activation, residual)
    x_shape = _shape("x", x)
    if _shape("grad_output", grad_output) != x_shape:
        raise ValueError(
            f"grad_output has shape {tuple(_shape('grad_output', grad_output))}, expected x's {tuple(x_shape)}"
        )
    x2, lead = flatten_tokens(x)
    dy2, _ = flatten_tokens(grad_output)
    dx, dw1, dw2, dw3, db1, db2, db3 = ffn_backward(dy2, x2, w1, w2, w3, b1, b2, b3, args)
    if len(x_shape) != 2:
        dx = dx.reshape(tuple(x_shape))
    return dx, dw1, dw2, db1, db2, dw3, db3
