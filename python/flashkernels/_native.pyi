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

def conv2d_forward(
    x: Any,
    weight: Any,
    bias: Any,
    alloc: Callable[[Tuple[int, ...], str], Any],
    *,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    activation: Optional[str] = None,
    algo: Optional[str] = None,
    keep_pre: bool = False,
    stream: int = 0,
) -> None:
    """y = act(conv(x, weight) + bias) (torch's conv2d) on DLPack capsules, x (N, C, H, W)
    and weight (K, C / groups, R, S) in any memory order, bias (K) or None. Calls
    `alloc(shape, dtype_name)` for y and, with `keep_pre`, for y_pre (conv + bias), each a
    writable (N, K, P, Q) capsule on the inputs' device. `activation`: None, "relu",
    "gelu", "silu"; `algo` (CUDA): None, "im2col", "implicit_gemm"."""

def conv2d_backward(
    x: Any,
    weight: Any,
    dy: Any,
    alloc: Callable[[Tuple[int, ...], str], Any],
    *,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    need: Tuple[bool, bool, bool] = ...,
    algo: Optional[str] = None,
    stream: int = 0,
) -> None:
    """dx, dweight, dbias (those `need` asks for, allocated in that order through
    `alloc(shape, dtype_name)`) from dy, the gradient of conv + bias."""

def pool2d_forward(
    x: Any,
    alloc: Callable[[Tuple[int, ...], str], Any],
    *,
    kind: str,
    kernel_size: Tuple[int, int],
    stride: Optional[Tuple[int, int]],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    ceil_mode: bool,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
    indices: int = 0,
    stream: int = 0,
) -> None:
    """torch's max_pool2d (`kind="max"`) / avg_pool2d (`"avg"`). Calls `alloc` for y;
    max pooling writes int32 argmax indices (h * W + w) to the contiguous buffer at address
    `indices` (y's element count, on x's device)."""

def pool2d_backward(
    dy: Any,
    input_shape: list[int],
    alloc: Callable[[Tuple[int, ...], str], Any],
    *,
    kind: str,
    kernel_size: Tuple[int, int],
    stride: Optional[Tuple[int, int]],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    ceil_mode: bool,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
    indices: int = 0,
    stream: int = 0,
) -> None:
    """dx of `input_shape` from dy (and the forward's int32 indices at `indices` for max
    pooling); calls `alloc` for dx."""

def pool2d_output_shape(
    input_shape: list[int],
    *,
    kind: str,
    kernel_size: Tuple[int, int],
    stride: Optional[Tuple[int, int]],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    ceil_mode: bool,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> list[int]:
    """(N, C, P, Q) of a pooling call, validated."""

# A host mask: one byte per token (nonzero = set) and its shape, (batch, seqlen).
_HostMask = Tuple[bytes, Sequence[int]]

def longformer_forward(
    q: _Capsule,
    k: _Capsule,
    v: _Capsule,
    alloc: Callable[[Tuple[int, ...], Tuple[int, ...], str], Tuple[_Capsule, _Capsule]],
    *,
    window: int,
    dilation: Sequence[int],
    causal: bool = False,
    scale: Optional[float] = None,
    global_mask: Optional[_HostMask] = None,
    global_indices: Optional[Sequence[Sequence[int]]] = None,
    padding_mask: Optional[_HostMask] = None,
    q_global: Optional[_Capsule] = None,
    k_global: Optional[_Capsule] = None,
    v_global: Optional[_Capsule] = None,
    stream: int = 0,
) -> None:
    """Longformer forward on DLPack capsules q, k, v ((B, N, H, D); optionally
    q_global, k_global, v_global, all three or none, for the global rows). `window`:
    one-sided w >= 0; `dilation`: one value >= 1, or one per head. Global tokens come
    from `global_mask` or `global_indices` (per-sequence index lists; not both);
    `padding_mask` marks padded tokens. Masks are host data: the work lists are built on
    the host. After validation calls `alloc(out_shape, lse_shape, dtype_name)` for
    capsules (out like q, lse float32 (B, H, N) contiguous) and fills them (CPU
    reference, or CUDA kernels queued on `stream`, not synchronized).

    Raises ValueError (shapes, masks, indices, window, dilation, scale, devices),
    TypeError (dtypes) or RuntimeError (CUDA unavailable or failing).
    """

def longformer_backward(
    q: _Capsule,
    k: _Capsule,
    v: _Capsule,
    out: _Capsule,
    lse: _Capsule,
    dout: _Capsule,
    alloc: Callable[[Tuple[int, ...], Tuple[int, ...], str], Tuple[_Capsule, ...]],
    *,
    window: int,
    dilation: Sequence[int],
    causal: bool = False,
    scale: Optional[float] = None,
    global_mask: Optional[_HostMask] = None,
    global_indices: Optional[Sequence[Sequence[int]]] = None,
    padding_mask: Optional[_HostMask] = None,
    q_global: Optional[_Capsule] = None,
    k_global: Optional[_Capsule] = None,
    v_global: Optional[_Capsule] = None,
    stream: int = 0,
) -> None:
    """The gradients of longformer_forward from its inputs, `out`, `lse` and `dout`
    (out's gradient, shaped like q), with the forward's options. Calls
    `alloc(shape, shape, dtype_name)` for 3 capsules (dq, dk, dv), or 6 (then dq_global,
    dk_global, dv_global) when the global projections are given (contiguous, q's shape
    and dtype); without them the global rows' gradients are folded into dq, dk, dv.
    Deterministic.

    Raises as longformer_forward.
    """

class DeviceBuffer:
    """Contiguous CUDA memory allocated by flashkernels (stream-ordered, on the legacy
    default stream), filled with NaN, exported through DLPack. Present in CUDA builds."""

    def __init__(self, device_id: int, shape: list[int], dtype: str, keep_alive: list[Any] = ...) -> None:
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
