"""Type stubs of the extension module `flashkernels._native` (rust/python.rs).

Low level: the public API is in `flashkernels/__init__.py`.
"""

from typing import Any, Callable, Optional, Sequence, Tuple, Union

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
    window_left: Optional[int] = None,
    window_right: Optional[int] = None,
    cu_seqlens_q: Optional[Sequence[int]] = None,
    cu_seqlens_k: Optional[Sequence[int]] = None,
    stream: int = 0,
) -> None:
    """Consumes DLPack capsules q, k, v ((B, N, H, D), or (B, H, N, D) with heads_first;
    k and v may have fewer heads than q, a divisor of them: GQA), validates them, calls
    `alloc(out_shape, lse_shape, dtype_name)` for the output capsules and fills them: with
    the CPU reference for host memory, with the CUDA kernel queued on `stream` (a CUstream
    as an integer; 0 = legacy default stream) for device memory.

    `out_shape` is q's shape in kernel order ((B, Nq, H, D)), in q's dtype; `lse_shape` is
    (B, H, Nq), float32. `window_left` / `window_right`: sliding window, non-negative (None
    = unbounded; `causal` caps the right side at 0), bottom-right aligned. With
    `cu_seqlens_q` and `cu_seqlens_k` (B+1 offsets each, both or neither) the batch is
    variable-length: q, k, v are packed (total, heads, head_dim), heads_first must be
    False, out is (total_q, H, D) and lse (H, total_q).

    Raises ValueError (shapes, strides, scale, windows, offsets, devices), TypeError
    (dtypes, non-capsules) or RuntimeError (CUDA unavailable or failing).
    """

def attention_backward(
    q: _Capsule,
    k: _Capsule,
    v: _Capsule,
    out: _Capsule,
    lse: _Capsule,
    dout: _Capsule,
    alloc: Callable[[Tuple[int, ...], Tuple[int, ...], str], Tuple[_Capsule, _Capsule, _Capsule]],
    *,
    heads_first: bool,
    causal: bool,
    scale: Optional[float] = None,
    window_left: Optional[int] = None,
    window_right: Optional[int] = None,
    cu_seqlens_q: Optional[Sequence[int]] = None,
    cu_seqlens_k: Optional[Sequence[int]] = None,
    stream: int = 0,
) -> None:
    """The gradients of attention_forward: consumes q, k, v, out, lse (as the forward
    returned them) and dout (out's gradient, laid out like q), with the forward's options;
    calls `alloc(q_shape, kv_shape, dtype_name)` (kernel order, q's dtype) for the
    capsules `(dq, dk, dv)` and fills them (CPU reference or CUDA kernels on `stream`).
    For GQA, dk and dv sum over each group's query heads. Deterministic. The CUDA path
    needs a contiguous lse.

    Raises as attention_forward.
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
