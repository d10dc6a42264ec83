"""What every op's torch integration is made of (attention in ``_torch``, convolution and
pooling in ``_torch_conv``, Longformer in ``_torch_longformer``, ring attention in
``ring``), written once:

- ``custom_op(name, fn, fake, autograd=...)``: ``torch.ops.flashkernels.<name>``, the
  torch.library custom op that runs ``fn`` (schema inferred from its annotations), with
  ``fake`` as its fake (meta) implementation and, given an ``Autograd``, its autograd
  formula. torch.compile, torch.export and tensor subclasses (FakeTensor) use these.
- ``autograd_function(name, forward, autograd)``: a ``torch.autograd.Function`` for eager
  calls on plain tensors, which skips the custom op's dispatch (~40 us a call).
- ``Autograd(save, backward, non_differentiable)``: one op's gradient formula, in the
  same terms for both: what the forward keeps, and how the backward turns it and the
  output gradients into input gradients.
- ``use_op`` / ``wants_grad``: which of the two routes (or neither) a call takes.

Imported by the torch modules only (it imports torch).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, NamedTuple, Sequence, Tuple

import torch

if not hasattr(torch.library, "custom_op") or not hasattr(torch.library, "register_autograd"):
    raise ImportError(
        f"flashkernels' torch support needs torch >= 2.4 (torch.library.custom_op); found {torch.__version__}"
    )

Tensor = torch.Tensor

# Tensor types that take the eager route; anything else (FakeTensor, functional tensors,
# other subclasses) goes through the custom op, which knows how to dispatch them.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def use_op(tensors: Sequence[Any]) -> bool:
    """True when a call must go through the custom op: while torch.compile traces, or for
    tensor subclasses."""
    return torch.compiler.is_compiling() or any(type(t) not in _PLAIN for t in tensors)


def wants_grad(tensors: Sequence[Any]) -> bool:
    """True when an eager call must record a gradient (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Autograd(NamedTuple):
    """An op's gradient formula.

    ``save(inputs, outputs) -> (tensors, state)``: what the backward needs, from the
    forward's arguments and outputs (both tuples): ``tensors`` (None allowed) go to
    ``ctx.save_for_backward``, ``state`` (anything) is kept as it is.
    ``backward(state, saved, needs_input_grad, *grad_outputs)``: the gradients of the
    forward's first arguments; the others get None.
    ``non_differentiable``: the positions of the outputs that have no gradient.
    """

    save: Callable[[tuple, tuple], Tuple[Sequence[Any], Any]]
    backward: Callable[..., Sequence[Any]]
    non_differentiable: Tuple[int, ...] = ()


def _as_tuple(outputs: Any) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _save(ctx: Any, autograd: Autograd, inputs: tuple, outputs: Any) -> None:
    outputs = _as_tuple(outputs)
    tensors, ctx.state = autograd.save(tuple(inputs), outputs)
    ctx.save_for_backward(*tensors)
    if autograd.non_differentiable:
        ctx.mark_non_differentiable(*(outputs[i] for i in autograd.non_differentiable))


def _grads(ctx: Any, autograd: Autograd, n_inputs: int, grad_outputs: tuple) -> tuple:
    grads = tuple(autograd.backward(ctx.state, ctx.saved_tensors, ctx.needs_input_grad, *grad_outputs))
    return grads + (None,) * (n_inputs - len(grads))


def double_backward_message(subject: str) -> str:
    return (
        f"flashkernels: {subject} is not differentiable: double backward is not supported "
        "(a gradient computed with create_graph=True was differentiated again, e.g. for a "
        "gradient penalty); use an op with a twice-differentiable backward for that term"
    )


def _not_differentiable_backward(name: str) -> Callable[..., Any]:
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        raise RuntimeError(double_backward_message(f"flashkernels::{name} (a backward op)"))

    return backward


def _no_context(ctx: Any, inputs: tuple, output: Any) -> None:
    pass


def custom_op(name: str, fn: Callable[..., Any], fake: Callable[..., Any], autograd: Any = None) -> Any:
    """Registers ``torch.ops.flashkernels.<name>`` (no mutated arguments) running ``fn``,
    with ``fake`` (same parameters) as its fake implementation and, given an
    ``Autograd``, its autograd formula (whose backward calls the op's backward op).
    Without one (the backward ops themselves), differentiating through the op raises a
    RuntimeError saying that double backward is not supported. Returns the op (torch's
    ``CustomOpDef``)."""
    op = torch.library.custom_op(f"flashkernels::{name}", fn, mutates_args=())
    op.register_fake(fake)
    if autograd is None:
        op.register_autograd(_not_differentiable_backward(name), setup_context=_no_context)
    else:
        n_inputs = len(inspect.signature(fn).parameters)

        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            _save(ctx, autograd, inputs, output)

        def backward(ctx: Any, *grad_outputs: Any) -> tuple:
            return _grads(ctx, autograd, n_inputs, grad_outputs)

        op.register_autograd(backward, setup_context=setup_context)
    return op


def autograd_function(name: str, forward: Callable[..., Any], autograd: Autograd, n_outputs: Any = None) -> Any:
    """A ``torch.autograd.Function`` named ``name`` whose ``apply(*args)`` returns
    ``forward(*args)``, differentiable (once: the backward is not itself recorded)
    through ``autograd``. With ``n_outputs``, only the first n_outputs of forward's
    results are returned (one: bare), the others only reach ``autograd.save``."""

    def forward_(ctx: Any, *args: Any) -> Any:
        results = forward(*args)
        _save(ctx, autograd, args, results)
        ctx.n_inputs = len(args)
        if n_outputs is None:
            return results
        return results[0] if n_outputs == 1 else tuple(results[:n_outputs])

    def backward_(ctx: Any, *grad_outputs: Any) -> Any:
        return _grads(ctx, autograd, ctx.n_inputs, grad_outputs)

    body = {
        "__module__": forward.__module__,
        "forward": staticmethod(forward_),
        "backward": staticmethod(_once_differentiable(name, backward_)),
    }
    # types.new_class, so that torch's metaclass names the grad_fn after `name`.
    return types.new_class(name, (torch.autograd.Function,), exec_body=lambda ns: ns.update(body))


class _NotDifferentiable(torch.autograd.Function):
    """Passes an op's gradients through, recording a node that raises when they are
    differentiated: its inputs are the gradients and every tensor they were computed from
    that requires grad, so differentiating with respect to any of those reaches it."""

    @staticmethod
    def forward(ctx: Any, subject: str, n: int, *tensors: Any) -> Any:
        ctx.subject = subject
        return tuple(None if g is None else g.detach() for g in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(double_backward_message(ctx.subject))


def _once_differentiable(name: str, backward: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``once_differentiable``, also for gradients that depend on the saved
    inputs: under create_graph=True the gradients come back requiring grad (when any
    saved tensor or output gradient does), through a node that raises a RuntimeError if
    they are differentiated again. torch's own decorator looks at the output gradients
    only, so ``grad(out.sum(), q, create_graph=True)`` (whose output gradient is a
    constant) returned a gradient silently detached from q, k and v."""

    def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        tracked = [t for t in list(grad_outputs) + list(ctx.saved_tensors) if isinstance(t, Tensor) and t.requires_grad]
        if not tracked:
            return grads
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        subject = f"the backward of {name.strip('_')}"
        return _NotDifferentiable.apply(subject, len(grads), *grads, *tracked)

    return wrapper


def kernel_ready(t: Tensor) -> Tensor:
    """t when the kernels can read it in place, else a contiguous copy. Gradients reach
    the backward with whatever strides autograd made (``out.sum().backward()`` gives an
    expanded tensor whose strides are all 0)."""
    ok = t.dim() > 0 and (t.shape[-1] == 1 or t.stride(-1) == 1)
    if ok and t.is_cuda:
        elem = t.element_size()
        rows = [s for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1]
        ok = t.data_ptr() % 16 == 0 and all(s * elem % 16 == 0 for s in rows)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def no_zero_strides(t: Tensor) -> Tensor:
    """Gradients can arrive with zero (expanded) strides: give the kernels real memory
    (convolution and pooling read any other strides)."""
    return t if all(s != 0 or n == 1 for n, s in zip(t.shape, t.stride())) else t.contiguous()
