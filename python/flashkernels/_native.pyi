"""Type stubs of the extension module `flashkernels._native` (rust/python/).

Low level: the public API is in `flashkernels/__init__.py`. Every op writes into outputs
the caller allocated (DLPack capsules on the inputs' device, shaped as the `*_shape(s)`
functions say); CUDA work is queued on `stream` (a CUstream as an integer, 0 = legacy
default stream) and not synchronized.
"""

from typing import Any, List, Optional, Sequence, Tuple, Union

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
    out: _Capsule,
    lse: _Capsule,
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
    k and v may have fewer heads than q, a divisor of them: GQA), validates them and fills
    the caller's outputs, of the shapes `attention_shapes` gives: `out` (q's shape in
    kernel order, (B, Nq, H, D), q's dtype) and `lse` (float32 (B, H, Nq)); with the CPU
    reference for host memory, with the CUDA kernel queued on `stream` for device memory.

    `window_left` / `window_right`: sliding window, non-negative (None = unbounded;
    `causal` caps the right side at 0), bottom-right aligned. With `cu_seqlens_q` and
    `cu_seqlens_k` (B+1 offsets each, both or neither) the batch is variable-length: q, k,
    v are packed (total, heads, head_dim), heads_first must be False, out is
    (total_q, H, D) and lse (H, total_q).

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
    dq: _Capsule,
    dk: _Capsule,
    dv: _Capsule,
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
    returned them) and dout (out's gradient, laid out like q), with the forward's options,
    and fills the caller's `dq`, `dk`, `dv` (q's dtype, of the shapes `attention_shapes`
    gives, kernel order) (CPU reference or CUDA kernels on `stream`). For GQA, dk and dv
    sum over each group's query heads. Deterministic. The CUDA path needs a contiguous lse.

    Raises as attention_forward.
    """

def attention_shapes(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    v_shape: Sequence[int],
    *,
    heads_first: bool,
    causal: bool,
    scale: Optional[float] = None,
    window_left: Optional[int] = None,
    window_right: Optional[int] = None,
    cu_seqlens_q: Optional[Sequence[int]] = None,
    cu_seqlens_k: Optional[Sequence[int]] = None,
) -> Tuple[List[int], List[int], List[int]]:
    """(out and dq, lse, dk and dv) shapes of an attention call on q, k, v of these shapes
    with the same options, validated; out / dq are q's shape in kernel order."""

def conv2d_forward(
    x: _Capsule,
    weight: _Capsule,
    bias: Optional[_Capsule],
    y: _Capsule,
    y_pre: Optional[_Capsule] = None,
    *,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    activation: Optional[str] = None,
    algo: Optional[str] = None,
    stream: int = 0,
) -> None:
    """y = act(conv(x, weight) + bias) (torch's conv2d) on DLPack capsules, x (N, C, H, W)
    and weight (K, C / groups, R, S) in any memory order, bias (K) or None. Fills the
    caller's `y` and, when given, `y_pre` (conv + bias), each (N, K, P, Q) from
    `conv2d_output_shape`, in x's dtype, any strides. `activation`: None, "relu", "gelu",
    "silu"; `algo` (CUDA): None, "im2col", "implicit_gemm"."""

def conv2d_backward(
    x: _Capsule,
    weight: _Capsule,
    dy: _Capsule,
    dx: Optional[_Capsule] = None,
    dweight: Optional[_Capsule] = None,
    dbias: Optional[_Capsule] = None,
    *,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    algo: Optional[str] = None,
    stream: int = 0,
) -> None:
    """From dy (the gradient of conv + bias), the gradients whose outputs are given: `dx`
    like x, `dweight` like weight, `dbias` (K), in x's dtype, any strides."""

def conv2d_output_shape(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
) -> List[int]:
    """(N, K, P, Q) of a convolution of x (N, C, H, W) by weight (K, C / groups, R, S),
    validated."""

def pool2d_forward(
    x: _Capsule,
    y: _Capsule,
    indices: Optional[_Capsule] = None,
    *,
    kind: str,
    kernel_size: Tuple[int, int],
    stride: Optional[Tuple[int, int]],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    ceil_mode: bool,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
    stream: int = 0,
) -> None:
    """torch's max_pool2d (`kind="max"`) / avg_pool2d (`"avg"`) into the caller's `y`
    (N, C, P, Q) from `pool2d_output_shape`, x's dtype, any strides; max pooling writes
    int32 argmax indices (h * W + w) to `indices` (contiguous, y's shape)."""

def pool2d_backward(
    dy: _Capsule,
    dx: _Capsule,
    indices: Optional[_Capsule] = None,
    *,
    kind: str,
    kernel_size: Tuple[int, int],
    stride: Optional[Tuple[int, int]],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    ceil_mode: bool,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
    stream: int = 0,
) -> None:
    """Fills the caller's `dx` (the forward's x shape, dy's dtype, any strides) from dy and,
    for max pooling, the forward's int32 `indices` (y's shape)."""

def pool2d_output_shape(
    input_shape: Sequence[int],
    *,
    kind: str,
    kernel_size: Tuple[int, int],
    stride: Optional[Tuple[int, int]],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    ceil_mode: bool,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> List[int]:
    """(N, C, P, Q) of a pooling call, validated."""

def ffn_forward(
    x: _Capsule,
    w1: _Capsule,
    w2: _Capsule,
    y: _Capsule,
    w3: Optional[_Capsule] = None,
    b1: Optional[_Capsule] = None,
    b2: Optional[_Capsule] = None,
    b3: Optional[_Capsule] = None,
    hidden: Optional[_Capsule] = None,
    *,
    activation: str,
    residual: bool,
    stream: int = 0,
) -> None:
    """y = act(x W1ᵀ + b1) W2ᵀ + b2 (+ x), gated with w3: (act(x W1ᵀ + b1) ∘ (x W3ᵀ + b3))
    W2ᵀ + b2 (+ x); x (tokens, d_model), w1 / w3 (d_hidden, d_model), w2 (d_model,
    d_hidden). Fills the caller's `y` (and `hidden`), shaped as `ffn_shapes` says, in x's
    dtype, any strides. `activation`: "relu", "gelu", "gelu_tanh" or "silu". CUDA:
    float16 / bfloat16, widths multiples of 8, on `stream`, not synchronized."""

def ffn_backward(
    x: _Capsule,
    w1: _Capsule,
    w2: _Capsule,
    dy: _Capsule,
    w3: Optional[_Capsule] = None,
    b1: Optional[_Capsule] = None,
    b2: Optional[_Capsule] = None,
    b3: Optional[_Capsule] = None,
    *,
    dx: Optional[_Capsule] = None,
    dw1: Optional[_Capsule] = None,
    dw2: Optional[_Capsule] = None,
    dw3: Optional[_Capsule] = None,
    db1: Optional[_Capsule] = None,
    db2: Optional[_Capsule] = None,
    db3: Optional[_Capsule] = None,
    activation: str,
    residual: bool,
    stream: int = 0,
) -> None:
    """Fills the given gradient outputs (each shaped like its input, x's dtype, any
    strides); dw3 needs w3 and db_i needs b_i."""

def ffn_shapes(
    x_shape: Sequence[int],
    w1_shape: Sequence[int],
    w2_shape: Sequence[int],
    w3_shape: Optional[Sequence[int]] = None,
    b1_shape: Optional[Sequence[int]] = None,
    b2_shape: Optional[Sequence[int]] = None,
    b3_shape: Optional[Sequence[int]] = None,
    *,
    activation: str,
    residual: bool,
) -> Tuple[List[int], List[int]]:
    """(y, hidden) shapes, ((tokens, d_model), (tokens, d_hidden)), validated."""

# A host mask: one byte per token (nonzero = set) and its shape, (batch, seqlen).
_HostMask = Tuple[bytes, Sequence[int]]

def longformer_forward(
    q: _Capsule,
    k: _Capsule,
    v: _Capsule,
    out: _Capsule,
    lse: _Capsule,
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
    the host. Fills the caller's `out` (like q) and `lse` (float32 (B, H, N), contiguous),
    of the shapes `longformer_shapes` gives (CPU reference, or CUDA kernels queued on
    `stream`, not synchronized).

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
    dq: _Capsule,
    dk: _Capsule,
    dv: _Capsule,
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
    dq_global: Optional[_Capsule] = None,
    dk_global: Optional[_Capsule] = None,
    dv_global: Optional[_Capsule] = None,
    stream: int = 0,
) -> None:
    """The gradients of longformer_forward from its inputs, `out`, `lse` and `dout`
    (out's gradient, shaped like q), with the forward's options. Fills the caller's `dq`,
    `dk`, `dv` and, exactly when the global projections are given, `dq_global`,
    `dk_global`, `dv_global` (writable, contiguous, q's shape and dtype); without the
    projections the global rows' gradients are folded into dq, dk, dv. Deterministic.

    Raises as longformer_forward.
    """

def longformer_shapes(q_shape: Sequence[int]) -> Tuple[List[int], List[int]]:
    """(out and every gradient, lse) shapes of a Longformer call on q (B, N, H, D): q's
    shape and (B, H, N)."""

def linformer_forward(
    q: _Capsule,
    k: _Capsule,
    v: _Capsule,
    e: _Capsule,
    out: _Capsule,
    lse: _Capsule,
    kp: _Capsule,
    vp: _Capsule,
    f: Optional[_Capsule] = None,
    key_padding_mask: Optional[_HostMask] = None,
    *,
    scale: Optional[float] = None,
    stream: int = 0,
) -> None:
    """Linformer forward on DLPack capsules: O = softmax(scale Q (E K)^T) (F V). q
    (B, N, H, D), k and v (B, N, H_kv, D), e (He, k, N_max) and f (Hf, k, N_max) or None
    (F = E), He, Hf in {1, H_kv}, N <= N_max (the first N columns are used); any
    strides. `key_padding_mask`: host (B, N) bytes, nonzero = padded key (excluded from
    the projection). Writes `out` (q's dtype), `lse` (float32 (B, H, N)) and the projected
    keys and values `kp`, `vp` ((B, k, H_kv, D), q's dtype), caller-allocated of the shapes
    `linformer_shapes` gives (CPU reference, or CUDA kernels queued on `stream`).

    Raises ValueError (shapes, mask, scale, devices), TypeError (dtypes) or RuntimeError
    (CUDA unavailable or failing).
    """

def linformer_backward(
    q: _Capsule,
    k: _Capsule,
    v: _Capsule,
    e: _Capsule,
    out: _Capsule,
    lse: _Capsule,
    kp: _Capsule,
    vp: _Capsule,
    grad_output: _Capsule,
    dq: _Capsule,
    dk: _Capsule,
    dv: _Capsule,
    de: _Capsule,
    f: Optional[_Capsule] = None,
    df: Optional[_Capsule] = None,
    key_padding_mask: Optional[_HostMask] = None,
    *,
    scale: Optional[float] = None,
    stream: int = 0,
) -> None:
    """Linformer backward on DLPack capsules: from the forward's inputs, out, lse, kp, vp
    and out's gradient, writes dq, dk, dv, de and, exactly when f is given, df (each like
    its input, q's dtype, caller-allocated). Without f, de holds both projections'
    contributions. Deterministic."""

def linformer_shapes(
    q: Sequence[int],
    k: Sequence[int],
    v: Sequence[int],
    e: Sequence[int],
    f: Optional[Sequence[int]] = None,
    mask_shape: Optional[Sequence[int]] = None,
    *,
    scale: Optional[float] = None,
) -> Tuple[List[int], List[int], List[int], List[int]]:
    """(out, lse, kp, vp) shapes ((B, N, H, D), (B, H, N), (B, k, H_kv, D) twice) of a
    Linformer call on inputs of these shapes, validated (mismatched E / F, k = 0,
    N > N_max, a key padding mask not (B, N): ValueError)."""

_HostBuckets = Tuple[bytes, Sequence[int]]

def reformer_forward(
    qk: _Capsule,
    v: _Capsule,
    rotations: _Capsule,
    out: _Capsule,
    lse: _Capsule,
    key_padding_mask: Optional[_HostMask] = None,
    buckets: Optional[_HostBuckets] = None,
    *,
    chunk_length: int,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal: bool = False,
    n_buckets: Optional[int] = None,
    stream: int = 0,
) -> Optional[bytes]:
    """Reformer LSH attention forward on DLPack capsules (HF's LSHSelfAttention before
    its output dense). qk, v (B, N, H, D), rotations (H, D, n_hashes, n_buckets / 2), any
    strides. `key_padding_mask`: host (B, N) bytes, nonzero = padded; `buckets`: host
    native-endian int32 bytes (B, H, n_hashes, N), offset per round, used instead of
    hashing (N > C only). Writes `out` (qk's dtype) and `lse` (float32 (B, H, rounds,
    N)), caller-allocated of the shapes `reformer_shapes` gives; returns the buckets used
    as int32 bytes, or None when N <= C (full attention). CUDA tensors run the kernels
    (float16 / bfloat16, D <= 128, float32 contiguous rotations), queued on `stream`;
    hashed buckets are downloaded (a wait for the stream).

    Raises ValueError (shapes, odd n_buckets, C = 0, N not a multiple of C, bad buckets
    or mask, devices) or TypeError (dtypes).
    """

def reformer_backward(
    qk: _Capsule,
    v: _Capsule,
    rotations: _Capsule,
    out: _Capsule,
    lse: _Capsule,
    grad_output: _Capsule,
    dqk: _Capsule,
    dv: _Capsule,
    key_padding_mask: Optional[_HostMask] = None,
    buckets: Optional[_HostBuckets] = None,
    *,
    chunk_length: int,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal: bool = False,
    n_buckets: Optional[int] = None,
    stream: int = 0,
) -> None:
    """Reformer backward on DLPack capsules, the buckets held fixed (given, or hashed
    again): writes dqk and dv (like qk, v; qk's dtype, caller-allocated). Deterministic."""

def reformer_shapes(
    qk: Sequence[int],
    v: Sequence[int],
    rotations: Sequence[int],
    mask_shape: Optional[Sequence[int]] = None,
    buckets_shape: Optional[Sequence[int]] = None,
    *,
    chunk_length: int,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal: bool = False,
    n_buckets: Optional[int] = None,
) -> Tuple[List[int], List[int], Optional[List[int]]]:
    """(out, lse, buckets) shapes ((B, N, H, D), (B, H, rounds, N), (B, H, n_hashes, N) or
    None when N <= C) of a Reformer call on inputs of these shapes, validated (odd
    n_buckets, rotations of the wrong shape, C = 0, N not a multiple of C, mask or buckets
    of the wrong shape: ValueError)."""

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
