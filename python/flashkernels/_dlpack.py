"""The DLPack glue around the native module, shared by every op (attention, convolution
and pooling, Longformer) and by their torch integration: which framework an array
comes from, how to export it to the Rust side, and where a call's outputs are
allocated (``Placement``: the caller's framework, device and stream).

Imports nothing but the native module (numpy, ml_dtypes, torch, cupy and jax are
imported where an array of theirs is handled), so every module of the package can
import from here without a cycle.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Sequence, Tuple

from . import _native

# DLPack device types.
HOST_DEVICES = {1, 3}  # kDLCPU, kDLCUDAHost
CUDA_DEVICES = {2, 13}  # kDLCUDA, kDLCUDAManaged
DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 13: "cuda_managed"}


def framework(x: Any) -> Optional[str]:
    """'numpy', 'torch', 'cupy', 'jax', or None, judged without importing anything."""
    root = type(x).__module__.partition(".")[0]
    if root in ("jax", "jaxlib"):
        return "jax"
    if root in ("numpy", "torch", "cupy"):
        return root
    return None


def is_torch(x: Any) -> bool:
    # Also what torch.compile sees for a traced tensor (type() is torch.Tensor there).
    return type(x).__module__.partition(".")[0] == "torch"


def dtype_name(x: Any) -> str:
    """x's dtype as flashkernels names it ("float16", "bfloat16", "float32", ...), for
    allocating outputs in x's dtype (an unsupported one is refused when x is imported)."""
    return str(getattr(x.dtype, "name", x.dtype)).rpartition(".")[2]


def shape_list(x: Any) -> List[int]:
    return [int(n) for n in x.shape]


def np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    import numpy as np

    return np.dtype(name)


def export(name: str, x: Any, stream: Any = None, *, for_cuda: bool = False) -> Any:
    """x's DLPack capsule (what the Rust side consumes). For CUDA, `stream` is the stream
    the data will be used on (the producer orders its pending work before it)."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.ndarray) and x.dtype.name == "bfloat16":
        # numpy cannot export ml_dtypes' bfloat16: export the bits, tagged.
        return (export(name, x.view(np.uint16)), "bfloat16")
    if getattr(x, "requires_grad", False) and framework(x) == "torch":
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


class Placement:
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
            if framework(x) == "jax":
                import jax

                if isinstance(x, jax.core.Tracer):
                    raise TypeError(f"{name}: flashkernels cannot be called inside jax tracing (jit, grad, vmap)")
            dev_type, dev_id = x.__dlpack_device__()
            devices.append((int(dev_type), int(dev_id)))
        if len(set(devices)) != 1:
            names = [n for n, _ in named]
            listed = ", ".join(names[:-1]) + " and " + names[-1]
            where = ", ".join(
                f"{n} on {DEVICE_NAMES.get(t, f'device type {t}')}:{i}" for n, (t, i) in zip(names, devices)
            )
            raise ValueError(f"{listed} must be on one device, got {where}")
        self.inputs = tuple(x for _, x in named)
        self.like = self.inputs[0]
        self.dev_type, self.dev_id = devices[0]
        self.fw = fw = framework(self.like)

        if self.dev_type in HOST_DEVICES:
            self.stream, self.dl_stream, self.for_cuda = 0, None, False
        elif self.dev_type in CUDA_DEVICES:
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
        return export(name, x, self.dl_stream, for_cuda=self.for_cuda)

    def export_inputs(self, names: Sequence[str]) -> list:
        return [self.export(n, x) for n, x in zip(names, self.inputs)]

    def empty(self, shape: tuple, dtype: str) -> Any:
        """An uninitialised output, from the caller's framework where it has mutable arrays."""
        if self.fw == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.like.device)
        if self.dev_type in HOST_DEVICES:
            import numpy as np

            return np.empty(shape, dtype=np_dtype(dtype))
        if self.fw == "cupy":
            import cupy

            with cupy.cuda.Device(self.dev_id):
                return cupy.empty(shape, dtype=np_dtype(dtype))
        # jax: our own memory. It holds the inputs until it is freed, since jax could reuse
        # their memory as soon as they are dropped, while the kernel may still be reading.
        return _native.DeviceBuffer(self.dev_id, list(shape), dtype, keep_alive=list(self.inputs))

    def to_caller(self, t: Any) -> Any:
        """Hands an output back in the caller's array type (only jax needs converting)."""
        if self.fw != "jax":
            return t
        import jax

        if self.dev_type in HOST_DEVICES:
            return jax.device_put(t, next(iter(self.like.devices())))
        return jax.dlpack.from_dlpack(t)
