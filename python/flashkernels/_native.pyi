"""Type stubs of the extension module `flashkernels._native` (rust/python.rs).

Low level: the public API is in `flashkernels/__init__.py`.
"""

from typing import Any, Callable, Optional, Tuple, Union

__version__: str

# A DLPack capsule, or (capsule, "bfloat16") to read a 16-bit integer tensor as bfloat16.
_Capsule = Union[Any, Tuple[Any, str]]

def cuda_available() -> bool:
    """True when this build has CUDA support and a driver with a GPU is present."""

def check_cuda(device: int) -> None:
    """Raises RuntimeError unless CUDA device `device` can be used."""

def attention_forward(
    q: _Capsule,
    k: _Capsule,
    v: _Capsule,
    alloc: Callable[[Tuple[int, ...], Tuple[int, ...], str], Tuple[_Capsule, _Capsule]],
    *,
    heads_first: bool,
    causal: bool,
    scale: Optional[float] = None,
    stream: int = 0,
) -> None:
    """Consumes DLPack capsules q, k, v ((B, N, H, D), or (B, H, N, D) with heads_first),
    validates them, calls `alloc(out_shape, lse_shape, dtype_name)` for the output
    capsules ((B, Nq, H, D) in q's dtype and (B, H, Nq) float32) and fills them: with the
    CPU reference for host memory, with the CUDA kernel queued on `stream` (a CUstream
    as an integer; 0 = legacy default stream) for device memory.

    Raises ValueError (shapes, strides, scale, devices), TypeError (dtypes, non-capsules)
    or RuntimeError (CUDA unavailable or failing).
    """

class DeviceBuffer:
    """Contiguous CUDA memory allocated by flashkernels (stream-ordered, on the legacy
    default stream), filled with NaN, exported through DLPack. Present in CUDA builds."""

    def __init__(
        self, device_id: int, shape: list[int], dtype: str, keep_alive: list[Any] = ...
    ) -> None:
        """`keep_alive`: objects to hold until the buffer is freed (the inputs of the
        asynchronous kernel that writes it)."""
    @property
    def shape(self) -> list[int]: ...
    @property
    def dtype(self) -> str: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    def __dlpack__(
        self,
        *,
        stream: Optional[int] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
