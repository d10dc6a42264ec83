"""flashkernels: hand-written CUDA attention kernels (forward and backward) with a CPU
reference, for numpy, torch, cupy and jax arrays.

Entry points, with the signatures users already know:

- ``scaled_dot_product_attention(query, key, value, ...)``: torch's layout
  (batch, heads, seqlen, head_dim).
- ``flash_attn_func(q, k, v, ...)``: flash-attn's layout (batch, seqlen, heads, head_dim).
- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)``: flash-attn's
  variable-length batches, packed (total_seqlen, heads, head_dim).
- ``attention_backward(q, k, v, out, lse, dout, ...)``: the gradients (dq, dk, dv), for
  frameworks whose autograd flashkernels does not plug into (numpy, cupy, jax).
- ``conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
  activation=None, algo=None)``, ``max_pool2d(...)``, ``avg_pool2d(...)``:
  torch.nn.functional's signatures and semantics, (N, C, H, W) inputs in NCHW or
  channels-last memory, with an optional fused activation ("relu", "gelu", "silu") for
  conv2d; ``conv2d_backward``, ``max_pool2d_backward``, ``avg_pool2d_backward`` for
  numpy users (see ``_conv``).
- ``longformer_attention(q, k, v, window, *, dilation=1, causal=False, global_tokens=None,
  padding_mask=None, global_qkv=None, scale=None, return_lse=False)``: Longformer
  self-attention (sliding window with per-head dilation, global tokens with their own
  projections, padding) on (batch, seqlen, heads, head_dim) arrays;
  ``longformer_attention_backward`` for numpy users (see ``_longformer``). Its masks are
  read on the host (a device-to-host copy for GPU masks).
- ``ring_attention(q, k, v, causal=False, softmax_scale=None, group=None)``: past one
  GPU, attention over a sequence sharded across the ranks of a torch.distributed group
  (context parallelism), differentiable; ``merge_attention_states(out_a, lse_a, out_b,
  lse_b)``, the exact log-sum-exp merge it is built on (see ``flashkernels.ring``). Both
  are loaded on first use, since they import torch.

All reach the same Rust op, which takes (B, N, H, D) through strides: torch's layout is
passed by swapping two strides, never by copying. With ``return_lse=True`` the forward
returns ``(out, lse)``, lse being the float32 natural-log logsumexp of each scaled score
row: (B, H, Nq), or (H, total_q) for varlen batches.

Masking, per sequence of Nq queries and Nk keys, is aligned bottom-right as in
flash-attn >= 2.1: query i sees key j iff
``i + Nk - Nq - window_left <= j <= i + Nk - Nq + window_right``. ``causal`` caps
window_right at 0; a window side of -1 (``window_size=(-1, -1)``, the default) is
unbounded. For Nq == Nk, causal is torch's ``is_causal``. A query that sees no key gets
out = 0, lse = -inf and zero gradients.

Grouped-query / multi-query attention: K and V may have fewer heads than Q (a divisor
of Q's); query head h reads K/V head h // (H_q // H_kv), and dK, dV sum over each group.
``scaled_dot_product_attention`` takes this only with ``enable_gqa=True``, as torch does.

The backward is deterministic (bitwise-identical gradients from run to run) on CPU and
GPU: the ``deterministic`` argument of the flash-attn entry points is accepted for
compatibility and changes nothing.

torch: autograd and torch.compile
---------------------------------
torch tensors are differentiable: ``out.backward()`` reaches flashkernels' backward
(dq, dk, dv; the lse output is not differentiable). Eager calls go through a
``torch.autograd.Function``. For ``torch.compile`` (``fullgraph=True`` included) and
``torch.export``, the same work is exposed as torch.library custom ops,
``torch.ops.flashkernels.attention_fwd`` and ``torch.ops.flashkernels.attention_bwd``,
with fake (meta) implementations and an autograd formula, so the tracer sees one opaque
node per call. CPU tensors (float32, float16, bfloat16) run the CPU reference, so all of
this also works without a GPU.

flashkernels never imports torch itself unless torch tensors are used: the ops are
registered when ``flashkernels`` is imported after torch, or else right after torch's
own import completes (a one-shot import hook), or at the latest on the first call with a
torch tensor. ``flashkernels.register_torch_ops()`` registers them explicitly.

How arrays are handled
----------------------
- Inputs are read through DLPack (``__dlpack__`` / ``__dlpack_device__``): shape,
  strides, dtype and device pointer, no copy. Any unit-last-stride view works.
- CPU arrays (numpy, torch, or any CPU DLPack producer) run the CPU reference (f32
  accumulation). float32, float16, and bfloat16 (numpy through ml_dtypes).
- CUDA tensors (torch, cupy, jax) run the CUDA kernels: float16 / bfloat16, head_dim a
  multiple of 8 up to 256, 16-byte aligned rows, all inputs on one device.
- Outputs are in the caller's type and layout convention: O's memory is (B, Nq, H, D)
  contiguous, and ``scaled_dot_product_attention`` returns its (B, H, Nq, D) view, as
  torch's flash backend does. Gradients likewise: contiguous in (B, N, H, D) order.
- ``cu_seqlens_q`` / ``cu_seqlens_k`` are int32 arrays of B+1 offsets from any framework
  on any device (or lists of ints). The kernels take them as host values, so they are
  read on the host: for device arrays that is a copy and a synchronization (for torch
  under autograd: once per forward, once per backward under torch.compile).

Memory and streams on the GPU
-----------------------------
- torch and cupy: outputs come from the framework (``torch.empty`` / ``cupy.empty`` on the
  inputs' device), so they use its caching allocator; the kernel runs on the framework's
  current stream, and inputs are exported for that stream (``__dlpack__(stream=...)``),
  so the result is ordered with the caller's other work, with no host synchronization.
- jax: jax arrays are immutable, so flashkernels does not write into one. It allocates
  the outputs itself (``_native.DeviceBuffer``: stream-ordered CUDA memory on the legacy
  default stream, where it also runs the kernel) and hands them to jax with
  ``jax.dlpack.from_dlpack``, zero-copy; the buffer is freed when jax drops the array.
  jax exposes no current stream, so the inputs are exported with ``stream=None`` (jax
  waits on the host until they are ready), and jax's consuming stream is made to wait
  for the kernel with a CUDA event when it imports the output. The output buffers hold
  references to the input arrays until they are freed, so jax cannot reuse the inputs'
  memory while the (asynchronous) kernel may still read it.
"""

from __future__ import annotations

import operator
import sys
from typing import Any, List, Optional, Sequence, Tuple

from . import _native

__version__: str = _native.__version__

__all__ = [
    "cuda_available",
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "attention_backward",
    "register_torch_ops",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "longformer_attention",
    "longformer_attention_backward",
]

# DLPack device types.
_HOST_DEVICES = {1, 3}  # kDLCPU, kDLCUDAHost
_CUDA_DEVICES = {2, 13}  # kDLCUDA, kDLCUDAManaged
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 13: "cuda_managed"}

# (left, right) as the native module takes it: None is unbounded (the public API's -1).
_Window = Tuple[Optional[int], Optional[int]]
# Host copies of (cu_seqlens_q, cu_seqlens_k), or None for a dense batch.
_Offsets = Optional[Tuple[List[int], List[int]]]


def cuda_available() -> bool:
    """True when flashkernels was built with CUDA and a driver with a GPU is present."""
    return _native.cuda_available()


def scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on (batch, heads, seqlen, head_dim) tensors, like
    ``torch.nn.functional.scaled_dot_product_attention``.

    ``attn_mask`` and ``dropout_p`` exist so that torch's positional calls mean the same
    thing here; only their defaults are supported. ``scale`` defaults to 1/sqrt(head_dim).
    ``enable_gqa=True`` lets key and value have fewer heads than query (a divisor of
    them); without it the head counts must match, as in torch. Returns ``out``
    (B, H, Nq, D), or ``(out, lse)`` with ``return_lse=True``. torch tensors are
    differentiable (query, key, value).
    """
    _check_unsupported(attn_mask, dropout_p)
    if not enable_gqa and all(hasattr(x, "__dlpack__") for x in (query, key, value)):
        hq, hk = _dim(query, 1, 4), _dim(key, 1, 4)
        if hq is not None and hk is not None and hq != hk:
            raise ValueError(
                f"query has {hq} heads but key has {hk}: pass enable_gqa=True for "
                "grouped-query attention (as torch's scaled_dot_product_attention)"
            )
    return _dispatch_forward(
        (query, key, value),
        heads_first=True,
        causal=bool(is_causal),
        scale=scale,
        window=(None, None),
        cu_seqlens=None,
        max_seqlens=None,
        return_lse=return_lse,
    )


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on (batch, seqlen, heads, head_dim) tensors, like flash-attn's
    ``flash_attn_func``. k and v may have fewer heads than q (GQA / MQA).

    ``window_size=(left, right)``: sliding-window attention, query i seeing keys
    i + Nk - Nq - left ..= i + Nk - Nq + right; -1 is unbounded. ``deterministic`` is
    accepted for compatibility: the backward is always deterministic. Returns ``out``
    (B, Nq, H, D), or ``(out, lse)``. torch tensors are differentiable (q, k, v).
    """
    _check_unsupported(None, dropout_p)
    del deterministic
    return _dispatch_forward(
        (q, k, v),
        heads_first=False,
        causal=bool(causal),
        scale=softmax_scale,
        window=_window_size(window_size),
        cu_seqlens=None,
        max_seqlens=None,
        return_lse=return_lse,
    )


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on a variable-length batch, like flash-attn's ``flash_attn_varlen_func``.

    q is (total_q, heads, head_dim), k and v (total_k, heads_kv, head_dim): the B
    sequences packed along the first axis, sequence b owning rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (likewise for k, v). ``cu_seqlens_q`` and
    ``cu_seqlens_k`` are int32 arrays of B+1 non-decreasing offsets from 0 to the total
    (any framework, any device; read on the host, which synchronizes for device arrays),
    or lists of ints. ``max_seqlen_q`` / ``max_seqlen_k`` must be at least the longest
    sequence (flashkernels works out the lengths itself). Masking and windows apply per
    sequence. Returns ``out`` (total_q, H, D), or ``(out, lse)`` with lse (H, total_q).
    """
    _check_unsupported(None, dropout_p)
    del deterministic
    return _dispatch_forward(
        (q, k, v),
        heads_first=False,
        causal=bool(causal),
        scale=softmax_scale,
        window=_window_size(window_size),
        cu_seqlens=(cu_seqlens_q, cu_seqlens_k),
        max_seqlens=(_index("max_seqlen_q", max_seqlen_q), _index("max_seqlen_k", max_seqlen_k)),
        return_lse=return_lse,
    )


def attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dout: Any,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
) -> Tuple[Any, Any, Any]:
    """Gradients ``(dq, dk, dv)`` of attention, in flash-attn's layout: q, k, v as given
    to the forward ((B, N, H, D), or packed (total, H, D) with ``cu_seqlens_q`` /
    ``cu_seqlens_k``), ``out`` and ``lse`` as the forward returned them
    (``return_lse=True``), ``dout`` the gradient of ``out``; the options must be the
    forward's. For GQA, dk and dv sum over each group's query heads. Returns arrays of
    the caller's type on the inputs' device, contiguous, in q's dtype. Deterministic.

    torch users get this through autograd; this function is for the others (numpy,
    cupy, jax outside tracing). With torch tensors it computes the same values, without
    recording anything for autograd.
    """
    window = _window_size(window_size)
    tensors = (q, k, v, out, lse, dout)
    if _is_torch(q):
        from . import _torch

        return _torch.backward(
            tensors,
            cu_seqlens=_pair_or_none(cu_seqlens_q, cu_seqlens_k),
            causal=bool(causal),
            scale=softmax_scale,
            window=window,
        )
    offsets = _varlen_offsets(_pair_or_none(cu_seqlens_q, cu_seqlens_k), None)
    return _backward(
        tensors, heads_first=False, causal=bool(causal), scale=softmax_scale, window=window, offsets=offsets
    )


def register_torch_ops() -> None:
    """Registers the torch.library ops ``torch.ops.flashkernels.attention_fwd``,
    ``attention_bwd``, ``conv2d_fwd``, ``conv2d_bwd``, ``longformer_fwd`` and
    ``longformer_bwd`` (importing torch). Not needed in the usual cases (see the module
    docs); idempotent."""
    from . import (
        _torch,  # noqa: F401  (registers on import)
        _torch_conv,  # noqa: F401  (conv2d / pooling ops, likewise)
        _torch_longformer,  # noqa: F401  (Longformer ops, likewise)
    )


# ---------------------------------------------------------------------------------------
# Argument checks.


def _check_unsupported(attn_mask: Any, dropout_p: float) -> None:
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported; use is_causal for causal masking")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p!r} is not supported (dropout is not implemented)")


def _index(name: str, x: Any) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None


def _window_size(window_size: Any) -> _Window:
    """flash-attn's (left, right), -1 meaning unbounded, as (left, right) with None."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
    sides = []
    for w in (left, right):
        try:
            w = operator.index(w)
        except TypeError:
            raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}") from None
        if w < -1:
            raise ValueError(f"window_size={tuple(window_size)!r}: each side must be >= 0, or -1 for unbounded")
        sides.append(None if w == -1 else w)
    return sides[0], sides[1]


def _dim(x: Any, axis: int, rank: int) -> Any:
    """x.shape[axis] when x has a shape of that rank (else None: the op reports it). Not
    converted with int(): under torch.compile that would specialize a symbolic size."""
    shape = getattr(x, "shape", None)
    try:
        return shape[axis] if shape is not None and len(shape) == rank else None
    except TypeError:
        return None


def _pair_or_none(a: Any, b: Any) -> Optional[Tuple[Any, Any]]:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    return a, b


def _host_offsets(name: str, cu: Any) -> List[int]:
    """B+1 offsets as host ints, from an int32 array of any framework or a list of ints.
    Device arrays are copied to the host (a synchronization)."""
    if isinstance(cu, (list, tuple)):
        try:
            return [operator.index(x) for x in cu]
        except TypeError:
            raise TypeError(f"{name} must hold ints, got {cu!r}") from None
    dtype = getattr(cu, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be an int32 array or tensor, got {type(cu).__name__}")
    dtype_name = str(dtype).rpartition(".")[2]  # torch.int32 -> int32
    if dtype_name != "int32":
        raise TypeError(f"{name} must be int32 (as flash-attn takes it), got {dtype_name}")
    if _framework(cu) == "jax":
        import jax

        if isinstance(cu, jax.core.Tracer):
            raise TypeError(f"{name}: flashkernels cannot be called inside jax tracing (jit, grad, vmap)")
    if len(getattr(cu, "shape", ())) != 1:
        raise ValueError(f"{name} must be one-dimensional (batch + 1 offsets), got shape {tuple(cu.shape)}")
    if hasattr(cu, "tolist"):
        return [int(x) for x in cu.tolist()]
    import numpy as np

    return [int(x) for x in np.asarray(cu).tolist()]


def _varlen_offsets(cu_seqlens: Optional[Tuple[Any, Any]], max_seqlens: Optional[Tuple[int, int]]) -> _Offsets:
    """The host offsets of a varlen call, with max_seqlen checked against them (the
    offsets themselves are checked by the native module)."""
    if cu_seqlens is None:
        return None
    cu_q = _host_offsets("cu_seqlens_q", cu_seqlens[0])
    cu_k = _host_offsets("cu_seqlens_k", cu_seqlens[1])
    if max_seqlens is not None:
        for name, cu, given in (("max_seqlen_q", cu_q, max_seqlens[0]), ("max_seqlen_k", cu_k, max_seqlens[1])):
            # Unsorted offsets are left for the native module to report.
            longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
            if given < longest and all(a <= b for a, b in zip(cu, cu[1:])):
                raise ValueError(
                    f"{name}={given} is smaller than the longest sequence ({longest}) in cu_seqlens_{name[-1]}"
                )
    return cu_q, cu_k


# ---------------------------------------------------------------------------------------
# Dispatch: torch tensors go through ._torch (autograd, custom ops); everything else
# straight to the native module.


def _framework(x: Any) -> Optional[str]:
    """'numpy', 'torch', 'cupy', 'jax', or None, judged without importing anything."""
    root = type(x).__module__.partition(".")[0]
    if root in ("jax", "jaxlib"):
        return "jax"
    if root in ("numpy", "torch", "cupy"):
        return root
    return None


def _is_torch(x: Any) -> bool:
    # Also what torch.compile sees for a traced tensor (type() is torch.Tensor there).
    return type(x).__module__.partition(".")[0] == "torch"


def _dispatch_forward(
    tensors: tuple,
    *,
    heads_first: bool,
    causal: bool,
    scale: Optional[float],
    window: _Window,
    cu_seqlens: Optional[Tuple[Any, Any]],
    max_seqlens: Optional[Tuple[int, int]],
    return_lse: bool,
) -> Any:
    if _is_torch(tensors[0]):
        # Imported here, not at the top: numpy / jax users never pay torch's import. Do
        # not bind a package global named `_torch`: `from . import _torch` would return
        # it instead of importing the submodule (what broke the first custom-op attempt).
        from . import _torch

        out, lse = _torch.forward(
            tensors,
            heads_first=heads_first,
            causal=causal,
            scale=scale,
            window=window,
            cu_seqlens=cu_seqlens,
            max_seqlens=max_seqlens,
        )
    else:
        out, lse = _forward(
            tensors,
            heads_first=heads_first,
            causal=causal,
            scale=scale,
            window=window,
            offsets=_varlen_offsets(cu_seqlens, max_seqlens),
        )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# The DLPack glue around the native module (any framework; torch's custom ops and
# autograd.Function call these too).


def _dtype_name(x: Any) -> str:
    """x's dtype as flashkernels names it ("float16", "bfloat16", "float32", ...), for
    allocating outputs in x's dtype (an unsupported one is refused when x is imported)."""
    return str(getattr(x.dtype, "name", x.dtype)).rpartition(".")[2]


def _shape_list(x: Any) -> List[int]:
    return [int(n) for n in x.shape]


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    import numpy as np

    return np.dtype(name)


def _export(name: str, x: Any, stream: Any = None, *, for_cuda: bool = False) -> Any:
    """x's DLPack capsule (what the Rust side consumes). For CUDA, `stream` is the stream
    the data will be used on (the producer orders its pending work before it)."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.ndarray) and x.dtype.name == "bfloat16":
        # numpy cannot export ml_dtypes' bfloat16: export the bits, tagged.
        return (_export(name, x.view(np.uint16)), "bfloat16")
    if getattr(x, "requires_grad", False) and _framework(x) == "torch":
        x = x.detach()  # torch refuses to export a tensor that requires grad
    kwargs = {"stream": stream} if for_cuda else {}
    try:
        try:
            # Versioned capsules carry a read-only flag, so read-only arrays export too.
            return x.__dlpack__(max_version=(1, 0), **kwargs)
        except TypeError:
            return x.__dlpack__(**kwargs)  # a producer that predates DLPack 1.0
    except BufferError as e:
        raise TypeError(f"{name}: cannot be read through DLPack: {e}") from e


class _Placement:
    """Where a call's tensors live, and how to allocate, export and hand back arrays
    there: the caller's framework, device and stream."""

    def __init__(self, named: Sequence[Tuple[str, Any]]):
        devices = []
        for name, x in named:
            if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
                raise TypeError(
                    f"{name}: expected an array or tensor that supports DLPack (numpy, torch, "
                    f"cupy, jax), got {type(x).__name__}"
                )
            if _framework(x) == "jax":
                import jax

                if isinstance(x, jax.core.Tracer):
                    raise TypeError(f"{name}: flashkernels cannot be called inside jax tracing (jit, grad, vmap)")
            dev_type, dev_id = x.__dlpack_device__()
            devices.append((int(dev_type), int(dev_id)))
        if len(set(devices)) != 1:
            names = [n for n, _ in named]
            listed = ", ".join(names[:-1]) + " and " + names[-1]
            where = ", ".join(
                f"{n} on {_DEVICE_NAMES.get(t, f'device type {t}')}:{i}" for n, (t, i) in zip(names, devices)
            )
            raise ValueError(f"{listed} must be on one device, got {where}")
        self.inputs = tuple(x for _, x in named)
        self.like = self.inputs[0]
        self.dev_type, self.dev_id = devices[0]
        self.fw = fw = _framework(self.like)

        if self.dev_type in _HOST_DEVICES:
            self.stream, self.dl_stream, self.for_cuda = 0, None, False
        elif self.dev_type in _CUDA_DEVICES:
            _native.check_cuda(self.dev_id)  # RuntimeError when CUDA is unusable here
            self.for_cuda = True
            if fw == "torch":
                import torch

                self.stream = torch.cuda.current_stream(self.like.device).cuda_stream
                self.dl_stream = self.stream or 1  # DLPack spells the legacy default stream 1
            elif fw == "cupy":
                import cupy

                with cupy.cuda.Device(self.dev_id):
                    self.stream = cupy.cuda.get_current_stream().ptr
                self.dl_stream = self.stream or 1
            elif fw == "jax":
                self.stream, self.dl_stream = 0, None
            else:
                raise TypeError(
                    f"CUDA arrays of type {type(self.like).__name__} are not supported; use torch, cupy or jax"
                )
        else:
            raise ValueError(f"{named[0][0]} is on DLPack device type {self.dev_type}; only CPU and CUDA are supported")

    def export(self, name: str, x: Any) -> Any:
        return _export(name, x, self.dl_stream, for_cuda=self.for_cuda)

    def export_inputs(self, names: Sequence[str]) -> list:
        return [self.export(n, x) for n, x in zip(names, self.inputs)]

    def empty(self, shape: tuple, dtype: str) -> Any:
        """An uninitialised output, from the caller's framework where it has mutable arrays."""
        if self.fw == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.like.device)
        if self.dev_type in _HOST_DEVICES:
            import numpy as np

            return np.empty(shape, dtype=_np_dtype(dtype))
        if self.fw == "cupy":
            import cupy

            with cupy.cuda.Device(self.dev_id):
                return cupy.empty(shape, dtype=_np_dtype(dtype))
        # jax: our own memory. It holds the inputs until it is freed, since jax could reuse
        # their memory as soon as they are dropped, while the kernel may still be reading.
        return _native.DeviceBuffer(self.dev_id, list(shape), dtype, keep_alive=list(self.inputs))

    def to_caller(self, t: Any) -> Any:
        """Hands an output back in the caller's array type (only jax needs converting)."""
        if self.fw != "jax":
            return t
        import jax

        if self.dev_type in _HOST_DEVICES:
            return jax.device_put(t, next(iter(self.like.devices())))
        return jax.dlpack.from_dlpack(t)


def _native_options(causal: bool, scale: Optional[float], window: _Window, offsets: _Offsets) -> dict:
    return dict(
        causal=bool(causal),
        scale=None if scale is None else float(scale),
        window_left=window[0],
        window_right=window[1],
        cu_seqlens_q=None if offsets is None else offsets[0],
        cu_seqlens_k=None if offsets is None else offsets[1],
    )


def _forward(
    tensors: tuple, *, heads_first: bool, causal: bool, scale: Optional[float], window: _Window, offsets: _Offsets
) -> Tuple[Any, Any]:
    """(out, lse) in the caller's framework; out is a (B, H, Nq, D) view with heads_first."""
    place = _Placement(list(zip(("q", "k", "v"), tensors)))
    options = _native_options(causal, scale, window, offsets)
    out_shape, lse_shape, _ = _native.attention_shapes(
        *(_shape_list(t) for t in tensors), heads_first=heads_first, **options
    )
    out = place.empty(tuple(out_shape), _dtype_name(tensors[0]))
    lse = place.empty(tuple(lse_shape), "float32")
    _native.attention_forward(
        *place.export_inputs("qkv"),
        place.export("out", out),
        place.export("lse", lse),
        heads_first=heads_first,
        stream=place.stream,
        **options,
    )
    out, lse = place.to_caller(out), place.to_caller(lse)
    if heads_first:
        out = out.swapaxes(1, 2)
    return out, lse


_BACKWARD_NAMES = ("q", "k", "v", "out", "lse", "dout")


def _backward(
    tensors: tuple, *, heads_first: bool, causal: bool, scale: Optional[float], window: _Window, offsets: _Offsets
) -> Tuple[Any, Any, Any]:
    """(dq, dk, dv) in the caller's framework; (B, H, N, D) views with heads_first."""
    place = _Placement(list(zip(_BACKWARD_NAMES, tensors)))
    options = _native_options(causal, scale, window, offsets)
    q_shape, _, kv_shape = _native.attention_shapes(
        *(_shape_list(t) for t in tensors[:3]), heads_first=heads_first, **options
    )
    dtype = _dtype_name(tensors[0])
    made = [place.empty(tuple(s), dtype) for s in (q_shape, kv_shape, kv_shape)]
    _native.attention_backward(
        *place.export_inputs(_BACKWARD_NAMES),
        *(place.export(n, t) for n, t in zip(("dq", "dk", "dv"), made)),
        heads_first=heads_first,
        stream=place.stream,
        **options,
    )
    grads = tuple(place.to_caller(t) for t in made)
    if heads_first:
        grads = tuple(g.swapaxes(1, 2) for g in grads)
    return grads


# ---------------------------------------------------------------------------------------
# Convolution and pooling (python/flashkernels/_conv.py): imported here, after the DLPack
# glue it uses and before the torch registration below, which registers its ops too.

from ._conv import (  # noqa: E402
    avg_pool2d,
    avg_pool2d_backward,
    conv2d,
    conv2d_backward,
    max_pool2d,
    max_pool2d_backward,
)

# Longformer attention (python/flashkernels/_longformer.py), likewise.
from ._longformer import longformer_attention, longformer_attention_backward  # noqa: E402

# Ring (context-parallel) attention over torch.distributed (python/flashkernels/ring.py).
# It imports torch, so it is loaded when first asked for (``flashkernels.ring_attention``),
# and kept out of __all__ (``from flashkernels import *`` must not import torch).
_RING_NAMES = ("ring_attention", "merge_attention_states")


def __getattr__(name: str) -> Any:
    if name in _RING_NAMES:
        from . import ring

        return getattr(ring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------
# torch.library registration, whatever the import order, without importing torch.


class _AfterTorchImport:
    """A one-shot ``sys.meta_path`` finder: when ``torch`` is first imported, it wraps the
    loader of torch's spec so that, once torch's own module code has run, flashkernels'
    torch ops are registered. The real loader is put back on ``torch.__spec__`` and
    ``torch.__loader__`` before torch runs, and a failure to register is left for the
    first call with a torch tensor to report."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        _remove_torch_hook()
        import importlib.util

        spec = importlib.util.find_spec(name)  # the other finders, without this one
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


class _RegisterAfterExec:
    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            register_torch_ops()
        except Exception:
            pass  # reported by the first call that needs the ops

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


_torch_hook: Optional[_AfterTorchImport] = None


def _remove_torch_hook() -> None:
    global _torch_hook
    hook, _torch_hook = _torch_hook, None
    try:
        sys.meta_path.remove(hook)
    except ValueError:
        pass


if "torch" in sys.modules:
    try:
        register_torch_ops()
    except Exception:
        pass  # e.g. torch still being imported: the first torch call registers (or reports)
else:
    _torch_hook = _AfterTorchImport()
    sys.meta_path.insert(0, _torch_hook)
