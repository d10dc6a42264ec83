"""flashkernels: a hand-written CUDA attention forward kernel with a CPU reference, for
numpy, torch, cupy and jax arrays.

Two entry points, with the signatures users already know:

- ``scaled_dot_product_attention(query, key, value, ...)``: torch's layout
  (batch, heads, seqlen, head_dim).
- ``flash_attn_func(q, k, v, ...)``: flash-attn's layout (batch, seqlen, heads, head_dim).

Both reach the same Rust op, which takes (B, N, H, D) through strides: torch's layout is
passed by swapping two strides, never by copying. Causal masking is aligned bottom-right
(query i sees keys j <= i + Nk - Nq, as flash-attn >= 2.1); for Nq == Nk that is torch's
``is_causal``. With ``return_lse=True`` the call returns ``(out, lse)``, lse being the
(B, H, Nq) float32 natural-log logsumexp of each scaled score row.

How arrays are handled
----------------------
- Inputs are read through DLPack (``__dlpack__`` / ``__dlpack_device__``): shape,
  strides, dtype and device pointer, no copy. Any unit-last-stride view works.
- CPU arrays (numpy, or any CPU DLPack producer) run the CPU reference (f32
  accumulation). float32, float16, and bfloat16 (numpy through ml_dtypes).
- CUDA tensors (torch, cupy, jax) run the CUDA kernel: float16 / bfloat16, head_dim 64
  or 128, all inputs on one device.
- Outputs are in the caller's type and layout convention: O's memory is (B, Nq, H, D)
  contiguous, and ``scaled_dot_product_attention`` returns its (B, H, Nq, D) view, as
  torch's flash backend does.

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

import sys
from typing import Any, Optional

from . import _native

__version__: str = _native.__version__

__all__ = ["cuda_available", "scaled_dot_product_attention", "flash_attn_func"]

# DLPack device types.
_HOST_DEVICES = {1, 3}  # kDLCPU, kDLCUDAHost
_CUDA_DEVICES = {2, 13}  # kDLCUDA, kDLCUDAManaged
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 13: "cuda_managed"}


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
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on (batch, heads, seqlen, head_dim) tensors, like
    ``torch.nn.functional.scaled_dot_product_attention``.

    ``attn_mask`` and ``dropout_p`` exist so that torch's positional calls mean the same
    thing here; only their defaults are supported. ``scale`` defaults to 1/sqrt(head_dim).
    Returns ``out`` (B, H, Nq, D), or ``(out, lse)`` with ``return_lse=True``.
    """
    _check_unsupported(attn_mask, dropout_p)
    return _attention(
        (query, key, value), heads_first=True, causal=is_causal, scale=scale, return_lse=return_lse
    )


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    *,
    return_lse: bool = False,
) -> Any:
    """Attention on (batch, seqlen, heads, head_dim) tensors, like flash-attn's
    ``flash_attn_func``. Returns ``out`` (B, Nq, H, D), or ``(out, lse)``."""
    _check_unsupported(None, dropout_p)
    return _attention(
        (q, k, v), heads_first=False, causal=causal, scale=softmax_scale, return_lse=return_lse
    )


def _check_unsupported(attn_mask: Any, dropout_p: float) -> None:
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported; use is_causal for causal masking")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p!r} is not supported (forward inference only)")


def _framework(x: Any) -> Optional[str]:
    """'numpy', 'torch', 'cupy', 'jax', or None, judged without importing anything."""
    root = type(x).__module__.partition(".")[0]
    if root in ("jax", "jaxlib"):
        return "jax"
    if root in ("numpy", "torch", "cupy"):
        return root
    return None


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
    kwargs = {"stream": stream} if for_cuda else {}
    try:
        try:
            # Versioned capsules carry a read-only flag, so read-only arrays export too.
            return x.__dlpack__(max_version=(1, 0), **kwargs)
        except TypeError:
            return x.__dlpack__(**kwargs)  # a producer that predates DLPack 1.0
    except BufferError as e:
        raise TypeError(f"{name}: cannot be read through DLPack: {e}") from e


def _attention(
    tensors: tuple, *, heads_first: bool, causal: bool, scale: Optional[float], return_lse: bool
) -> Any:
    devices = []
    for name, x in zip("qkv", tensors):
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
        where = ", ".join(
            f"{n} on {_DEVICE_NAMES.get(t, f'device type {t}')}:{i}" for n, (t, i) in zip("qkv", devices)
        )
        raise ValueError(f"q, k and v must be on one device, got {where}")
    dev_type, dev_id = devices[0]
    q = tensors[0]
    fw = _framework(q)

    if dev_type in _HOST_DEVICES:
        stream, dl_stream, for_cuda = 0, None, False
    elif dev_type in _CUDA_DEVICES:
        _native.check_cuda(dev_id)  # RuntimeError when CUDA is unusable here
        for_cuda = True
        if fw == "torch":
            import torch

            stream = torch.cuda.current_stream(q.device).cuda_stream
            dl_stream = stream or 1  # DLPack spells the legacy default stream 1, not 0
        elif fw == "cupy":
            import cupy

            with cupy.cuda.Device(dev_id):
                stream = cupy.cuda.get_current_stream().ptr
            dl_stream = stream or 1
        elif fw == "jax":
            stream, dl_stream = 0, None
        else:
            raise TypeError(
                f"CUDA arrays of type {type(q).__name__} are not supported; use torch, cupy or jax"
            )
    else:
        raise ValueError(f"q is on DLPack device type {dev_type}; only CPU and CUDA are supported")

    made: list = []

    def alloc(out_shape: tuple, lse_shape: tuple, dtype: str) -> tuple:
        out = _empty(fw, tensors, dev_type, dev_id, out_shape, dtype)
        lse = _empty(fw, tensors, dev_type, dev_id, lse_shape, "float32")
        made.extend((out, lse))
        return (
            _export("out", out, dl_stream, for_cuda=for_cuda),
            _export("lse", lse, dl_stream, for_cuda=for_cuda),
        )

    caps = [_export(n, x, dl_stream, for_cuda=for_cuda) for n, x in zip("qkv", tensors)]
    _native.attention_forward(
        *caps,
        alloc,
        heads_first=heads_first,
        causal=bool(causal),
        scale=None if scale is None else float(scale),
        stream=stream,
    )
    out, lse = (_to_caller(fw, q, dev_type, t) for t in made)
    if heads_first:
        out = out.swapaxes(1, 2)
    return (out, lse) if return_lse else out


def _empty(fw: Optional[str], inputs: tuple, dev_type: int, dev_id: int, shape: tuple, dtype: str) -> Any:
    """An uninitialised output, from the caller's framework where it has mutable arrays."""
    like = inputs[0]
    if fw == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    if dev_type in _HOST_DEVICES:
        import numpy as np

        return np.empty(shape, dtype=_np_dtype(dtype))
    if fw == "cupy":
        import cupy

        with cupy.cuda.Device(dev_id):
            return cupy.empty(shape, dtype=_np_dtype(dtype))
    # jax: our own memory. It holds the inputs until it is freed, since jax could reuse
    # their memory as soon as they are dropped, while the kernel may still be reading.
    return _native.DeviceBuffer(dev_id, list(shape), dtype, keep_alive=list(inputs))


def _to_caller(fw: Optional[str], like: Any, dev_type: int, t: Any) -> Any:
    """Hands an output back in the caller's array type (only jax needs converting)."""
    if fw != "jax":
        return t
    import jax

    if dev_type in _HOST_DEVICES:
        return jax.device_put(t, next(iter(like.devices())))
    return jax.dlpack.from_dlpack(t)
