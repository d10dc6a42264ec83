"""The DLPack glue around the native module, shared by every op (attention, convolution
and pooling, Longformer) and by their torch integration: which framework an array
comes from, how to export it to the Rust side, and where a call's outputs are
allocated (``Placement``: the caller's framework, device and stream).

Imports nothing but the native module (numpy, ml_dtypes, torch, cupy and jax are
imported where an array of theirs is handled), so every module of the package can
import from here without a cycle.
"""

from __future__ import annotations

import math
import operator
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


# ---------------------------------------------------------------------------------------
# Argument checks shared by every public function: each names the argument and the
# value it got (never an array's contents), and raises before anything is allocated.

# The largest int option the native module takes (an int64, as torch's op schemas do).
MAX_INT = 2**63 - 1


def type_name(x: Any) -> str:
    """'numpy.ndarray', 'torch.Tensor', 'jax.ArrayImpl', ... (short, no contents)."""
    t = type(x)
    root = t.__module__.partition(".")[0]
    return t.__name__ if root == "builtins" else f"{'jax' if root == 'jaxlib' else root}.{t.__name__}"


def is_bool(x: Any) -> bool:
    """Python's bool or numpy's (np.bool_)."""
    if isinstance(x, bool):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.bool_)


def _is_jax_tracer(x: Any) -> bool:
    if framework(x) != "jax":
        return False
    import jax

    return isinstance(x, jax.core.Tracer)


def check_not_traced(name: str, x: Any) -> None:
    """jax tracers (jit, grad, vmap) hold no data flashkernels could read."""
    if _is_jax_tracer(x):
        raise TypeError(
            f"{name}: flashkernels cannot be called inside jax tracing (jit, grad, vmap); got a "
            f"{type(x).__name__}. Call it outside jax.jit, on concrete arrays"
        )


def check_arrays(named: Sequence[Tuple[str, Any]]) -> None:
    """Every (name, array) of one call: DLPack arrays, not jax tracers, all of one
    framework (mixing them would return the first one's type and drop torch's autograd of
    the others; other DLPack producers go with anything but torch). TypeError naming each
    argument's type."""
    present = list(named)
    for name, x in present:
        check_not_traced(name, x)
        if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
            raise TypeError(
                f"{name}: expected an array or tensor that supports DLPack (numpy, torch, "
                f"cupy, jax), got {type_name(x)}"
            )
    kinds = {framework(x) for _, x in present}
    known = kinds - {None}
    if len(known) > 1 or ("torch" in known and None in kinds):
        listed = ", ".join(f"{n}: {type_name(x)}" for n, x in present)
        raise TypeError(
            "all arrays of one call must come from one framework (all torch tensors, all numpy "
            f"arrays, ...); got {listed}"
        )


def check_bool(name: str, x: Any) -> bool:
    """A real bool (Python's or numpy's), not any truthy value: ``causal='no'`` is an error."""
    if is_bool(x):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {type_name(x)} {_short_repr(x)}")


def check_int(name: str, x: Any, *, minimum: int = 0, maximum: Optional[int] = MAX_INT) -> int:
    """A Python (or numpy) int, not a bool, in [minimum, maximum] (None: no maximum)."""
    if is_bool(x):
        raise TypeError(f"{name} must be an int, got {x!r}")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type_name(x)} {_short_repr(x)}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} is too large: {v} (at most {maximum})")
    return int(v)


def check_scale(name: str, x: Any) -> Optional[float]:
    """None, or a finite positive float that float32 (the kernels' type) can hold."""
    if x is None:
        return None
    if isinstance(x, (str, bytes)) or is_bool(x):
        raise TypeError(f"{name} must be a float or None, got {type_name(x)} {_short_repr(x)}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float or None, got {type_name(x)} {_short_repr(x)}") from None
    except OverflowError:
        raise ValueError(f"{name} must be finite and positive, got {_short_repr(x)}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and positive, got {_short_repr(x)}")
    if not (_F32_TINY <= v <= _F32_MAX):
        raise ValueError(
            f"{name} must be finite and positive within float32's range [{_F32_TINY:.3g}, {_F32_MAX:.3g}] "
            f"(the kernels compute in float32), got {_short_repr(x)}"
        )
    return v


_F32_TINY = 2.0**-149  # the smallest positive float32 (subnormal)
_F32_MAX = 3.4028234663852886e38


def _short_repr(x: Any) -> str:
    """A value for a message: scalars as they are, arrays by their shape only."""
    shape = getattr(x, "shape", None)
    if shape is not None and tuple(shape) != ():
        return f"of shape {tuple(int(n) for n in shape)}"
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


class Placement:
    """Where a call's tensors live, and how to allocate, export and hand back arrays
    there: the caller's framework, device and stream."""

    def __init__(self, named: Sequence[Tuple[str, Any]]):
        check_arrays(named)
        devices = []
        for _, x in named:
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
