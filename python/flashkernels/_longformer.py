"""Longformer self-attention: the public functions and their DLPack glue.

q, k, v (and the optional global projections) are (B, N, H, D) arrays of any framework
(numpy, torch, cupy, jax); the masks are (B, N) boolean arrays of any framework, read on
the host (the native op builds its work lists there). numpy (and any CPU DLPack array)
runs the CPU reference; CUDA tensors run the CUDA kernels. torch tensors are
differentiable (see ``_torch_longformer``).
"""

from __future__ import annotations

import operator
from typing import Any, List, Optional, Sequence, Tuple

from . import _native
from ._dlpack import (
    Placement,
    check_arrays,
    check_bool,
    check_not_traced,
    check_scale,
    dtype_name,
    framework,
    is_bool,
    is_torch,
)

# (bytes, shape): a host mask as the native module takes it (one byte per token).
HostMask = Tuple[bytes, Tuple[int, ...]]

_QKV = ("q", "k", "v")
_BIG = 2**62
_GLOBAL_QKV = ("q_global", "k_global", "v_global")


# ---------------------------------------------------------------------------------------
# Arguments.


class LongformerOptions:
    """The scalar options of a call, normalised and checked (the native module checks
    them again, with the shapes)."""

    def __init__(self, window: Any, dilation: Any, causal: Any, scale: Any):
        if isinstance(window, bool):
            raise TypeError(f"window must be an int (the one-sided window w), got {window!r}")
        try:
            window = operator.index(window)
        except TypeError:
            raise TypeError(f"window must be an int (the one-sided window w), got {window!r}") from None
        if window < 0:
            raise ValueError(f"window must be >= 0 (one-sided), got {window}")
        # Anything past the sequence length is clipped to it (same result); keep the value
        # within what the native module's 64-bit integers take.
        self.window = min(int(window), _BIG)
        self.dilation = _dilation(dilation)
        self.causal = check_bool("causal", causal)
        self.scale: Optional[float] = check_scale("scale", scale)

    def native(self) -> dict:
        return dict(window=self.window, dilation=list(self.dilation), causal=self.causal, scale=self.scale)


def _dilation(dilation: Any) -> List[int]:
    """An int, or one int per head, as a non-empty list of ints >= 1."""
    if isinstance(dilation, (list, tuple)):
        values = list(dilation)
    elif hasattr(dilation, "tolist"):  # a numpy / torch scalar or array of per-head dilations
        values = dilation.tolist()
        values = values if isinstance(values, list) else [values]
    else:
        values = [dilation]
    out = []
    for d in values:
        if isinstance(d, bool):
            raise TypeError(f"dilation must be an int or a sequence of ints (one per head), got {dilation!r}")
        try:
            out.append(int(operator.index(d)))
        except TypeError:
            raise TypeError(f"dilation must be an int or a sequence of ints (one per head), got {dilation!r}") from None
    if not out:
        raise ValueError("dilation: give one value, or one per head (got an empty sequence)")
    for d in out:
        if d < 1:
            raise ValueError(f"dilation must be >= 1, got {d} in {out}")
    return [min(d, _BIG) for d in out]  # past N, a dilation is clipped to N: same result


def split_global_tokens(global_tokens: Any) -> Tuple[Any, Optional[List[List[int]]]]:
    """(mask, None), (None, index lists) or (None, None). A mask is anything array-like
    with a shape ((B, N) booleans, any framework); a list or tuple holds one sequence of
    token indices per batch element."""
    if global_tokens is None:
        return None, None
    if hasattr(global_tokens, "shape") or hasattr(global_tokens, "__dlpack__"):
        return global_tokens, None
    if not isinstance(global_tokens, (list, tuple)):
        raise TypeError(
            "global_tokens must be None, a (batch, seqlen) boolean mask, or one sequence of token "
            f"indices per batch element; got {type(global_tokens).__name__}"
        )
    lists = []
    for b, seq in enumerate(global_tokens):
        if hasattr(seq, "tolist") and not isinstance(seq, (list, tuple)):
            seq = seq.tolist()  # a 1-D integer array of indices
        if not isinstance(seq, (list, tuple)):
            raise TypeError(
                f"global_tokens[{b}] must be a sequence of token indices, got {type(seq).__name__} "
                "(pass a boolean mask as an array, not as nested lists)"
            )
        row = []
        for i in seq:
            if is_bool(i):
                raise TypeError(
                    f"global_tokens[{b}] holds booleans: index lists hold ints; pass a boolean mask "
                    "as an array (numpy, torch, ...)"
                )
            try:
                i = int(operator.index(i))
            except TypeError:
                raise TypeError(f"global_tokens[{b}] must hold ints (token indices), got {i!r}") from None
            if abs(i) > _BIG:
                raise ValueError(f"global token index {i} of sequence {b} is out of range")
            row.append(i)
        lists.append(row)
    return None, lists


def split_global_qkv(global_qkv: Any) -> Optional[Tuple[Any, Any, Any]]:
    if global_qkv is None:
        return None
    if not isinstance(global_qkv, (list, tuple)) or len(global_qkv) != 3 or any(t is None for t in global_qkv):
        raise TypeError(
            "global_qkv must be None or a triple (q_global, k_global, v_global) of arrays shaped "
            f"like q; got {type(global_qkv).__name__}"
            + (f" of length {len(global_qkv)}" if isinstance(global_qkv, (list, tuple)) else "")
        )
    return tuple(global_qkv)  # type: ignore[return-value]


def host_mask(name: str, m: Any) -> Optional[HostMask]:
    """A (B, N) mask of any framework (bool, or integers: nonzero = set) as host bytes
    and its shape. Device arrays are copied to the host (a synchronization)."""
    if m is None:
        return None
    fw = framework(m)
    if fw == "torch":
        import torch

        t = m.detach()
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{name} must be a boolean (or integer 0/1) tensor, got {str(t.dtype).rpartition('.')[2]}")
        t = (t != 0).to(device="cpu", dtype=torch.uint8).contiguous()
        shape = tuple(int(n) for n in t.shape)
        try:
            data = t.numpy().tobytes()
        except (ImportError, RuntimeError):  # torch without numpy
            data = bytes(t.reshape(-1).tolist())
        return data, shape
    check_not_traced(name, m)
    if fw == "cupy":
        m = m.get()
    import numpy as np

    try:
        a = np.asarray(m)
    except Exception as e:  # e.g. a ragged nested list
        raise TypeError(f"{name} must be a (batch, seqlen) boolean array: {e}") from None
    if a.dtype.kind not in "biu":
        raise TypeError(f"{name} must be a boolean (or integer 0/1) array, got dtype {a.dtype}")
    a = np.ascontiguousarray(a != 0, dtype=np.uint8)
    return a.tobytes(), tuple(int(n) for n in a.shape)


class HostMasks:
    """The masks of a call in the native module's form: read once, reused for the
    backward."""

    def __init__(
        self, global_mask: Any = None, global_indices: Optional[List[List[int]]] = None, padding_mask: Any = None
    ):
        self.global_mask = host_mask("global_tokens", global_mask)
        self.global_indices = global_indices
        self.padding_mask = host_mask("padding_mask", padding_mask)

    def native(self) -> dict:
        return dict(global_mask=self.global_mask, global_indices=self.global_indices, padding_mask=self.padding_mask)


# ---------------------------------------------------------------------------------------
# The public functions.


def longformer_attention(
    q: Any,
    k: Any,
    v: Any,
    window: int,
    *,
    dilation: Any = 1,
    causal: bool = False,
    global_tokens: Any = None,
    padding_mask: Any = None,
    global_qkv: Optional[Tuple[Any, Any, Any]] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Any:
    """Longformer self-attention (Beltagy et al. 2020): sliding-window attention with
    dilation, global tokens and padding, on (batch, seqlen, heads, head_dim) arrays.

    Arguments
        q, k, v: (B, N, H, D) arrays or tensors of one framework (torch, cupy, jax, numpy)
            on one device: float16 / bfloat16 on the GPU, float32 / float16 / bfloat16 on
            the CPU (the CPU reference accumulates in float32).
        window: the ONE-sided window w >= 0. Hugging Face's ``attention_window`` is the
            two-sided size: pass ``config.attention_window[layer] // 2``.
        dilation: an int >= 1, or one per head (a sequence of H ints).
        causal: autoregressive Longformer: the window is t in [-w, 0] and no position ever
            sees a later key, global rows and columns included.
        global_tokens: None; a (B, N) boolean mask, True for global tokens (any framework,
            any device); or a sequence of B sequences of token indices (duplicates and
            indices outside [0, N) raise ValueError).
        padding_mask: None or a (B, N) boolean mask, True for PADDED tokens. Hugging Face's
            ``attention_mask`` is the other way round (1 = real token, 0 = padding, and
            ``LongformerModel`` marks global tokens with 2): pass
            ``padding_mask=attention_mask == 0`` and ``global_tokens=attention_mask == 2``.
        global_qkv: None, or a triple (q_global, k_global, v_global) shaped like q: the
            projections used by the global rows (Hugging Face's ``query_global``,
            ``key_global``, ``value_global`` applied to the hidden states; only the rows of
            global tokens of q_global are read). When None, q, k, v serve the global rows.
        scale: softmax scale, default 1/sqrt(D) (what Hugging Face applies to the query).
        return_lse: also return the log-sum-exp of each row's scaled scores.

    Semantics, per sequence b and head h (dilation d_h, scores ``scale * q_i . k_j``):

    - a local (non-global, non-padded) token i attends, with q, k, v, to the keys
      i + d_h * t for t in [-w, w] (causal: [-w, 0]) that lie in [0, N) and are not
      padded, plus every global token (causal: only those j <= i); a global token inside
      the window counts once;
    - a global token i attends, with q_global, k_global, v_global, to every non-padded key
      (causal: j <= i);
    - a padded token outputs 0 (lse -inf) and gets zero gradients. A padded token cannot
      be global (ValueError).

    Returns ``out`` (B, N, H, D) in q's dtype, contiguous, of the caller's array type on
    q's device; with ``return_lse=True``, ``(out, lse)``, lse float32 (B, H, N).

    torch tensors are differentiable in q, k, v and, when given, the global projections
    (eagerly through a ``torch.autograd.Function``, under torch.compile through the custom
    ops ``torch.ops.flashkernels.longformer_fwd`` / ``longformer_bwd``). The masks are not
    differentiable. Without ``global_qkv`` the global rows' gradients are folded into dq,
    dk, dv.

    Masks are read on the host: the native op builds its work schedule (which key tiles
    each query tile visits) there. A mask on the GPU therefore costs a device-to-host copy
    and a synchronization: once per call (an eager torch backward reuses the forward's
    copy; under torch.compile the backward op reads it again). Pass index lists or host
    masks to avoid it. Under torch.compile, index lists are constants of the graph (a
    different list recompiles).
    """
    opts = LongformerOptions(window, dilation, causal, scale)
    return_lse = check_bool("return_lse", return_lse)
    gmask, gidx = split_global_tokens(global_tokens)
    gqkv = split_global_qkv(global_qkv)
    check_arrays(_named((q, k, v) + (gqkv or ())))
    if is_torch(q):
        from . import _torch_longformer

        out, lse = _torch_longformer.forward(q, k, v, gqkv, gmask, gidx, padding_mask, opts)
    else:
        masks = HostMasks(gmask, gidx, padding_mask)
        out, lse = lf_forward((q, k, v) + (gqkv or ()), masks, opts)
    return (out, lse) if return_lse else out


def longformer_attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dout: Any,
    window: int,
    *,
    dilation: Any = 1,
    causal: bool = False,
    global_tokens: Any = None,
    padding_mask: Any = None,
    global_qkv: Optional[Tuple[Any, Any, Any]] = None,
    scale: Optional[float] = None,
) -> Tuple[Any, ...]:
    """The gradients of :func:`longformer_attention` for frameworks whose autograd
    flashkernels does not plug into (numpy, cupy, jax outside tracing): ``out`` and
    ``lse`` as the forward returned them (``return_lse=True``), ``dout`` the gradient of
    ``out`` (shaped like q), and the forward's options. Returns ``(dq, dk, dv)``, or
    ``(dq, dk, dv, dq_global, dk_global, dv_global)`` when ``global_qkv`` is given
    (without it the global rows' gradients are folded into dq, dk, dv). Contiguous, q's
    dtype, the caller's array type. Deterministic. With torch tensors it records nothing
    for autograd."""
    opts = LongformerOptions(window, dilation, causal, scale)
    gmask, gidx = split_global_tokens(global_tokens)
    gqkv = split_global_qkv(global_qkv)
    check_arrays(_named((q, k, v) + (gqkv or ())) + [("out", out), ("lse", lse), ("dout", dout)])
    if is_torch(q):
        from . import _torch_longformer

        return _torch_longformer.backward(q, k, v, out, lse, dout, gqkv, gmask, gidx, padding_mask, opts)
    masks = HostMasks(gmask, gidx, padding_mask)
    return lf_backward((q, k, v) + (gqkv or ()), out, lse, dout, masks, opts)


# ---------------------------------------------------------------------------------------
# The DLPack glue (any framework; torch's autograd.Function and custom ops call these).


def _named(tensors: Sequence[Any]) -> List[Tuple[str, Any]]:
    names = _QKV + _GLOBAL_QKV
    if len(tensors) not in (3, 6):
        raise TypeError("q, k, v, and optionally the three global projections")
    return list(zip(names, tensors))


def _native_globals(place: Placement, named: List[Tuple[str, Any]]) -> dict:
    if len(named) == 3:
        return {}
    return {n: place.export(n, x) for n, x in named[3:]}


def lf_forward(tensors: Sequence[Any], masks: HostMasks, opts: LongformerOptions) -> Tuple[Any, Any]:
    """(out, lse) in the caller's framework from q, k, v [, q_global, k_global, v_global]."""
    named = _named(tensors)
    place = Placement(named)
    out_shape, lse_shape = _native.longformer_shapes([int(n) for n in tensors[0].shape])
    out = place.empty(tuple(out_shape), dtype_name(tensors[0]))
    lse = place.empty(tuple(lse_shape), "float32")
    _native.longformer_forward(
        *(place.export(n, x) for n, x in named[:3]),
        place.export("out", out),
        place.export("lse", lse),
        stream=place.stream,
        **_native_globals(place, named),
        **opts.native(),
        **masks.native(),
    )
    return place.to_caller(out), place.to_caller(lse)


def lf_backward(
    tensors: Sequence[Any], out: Any, lse: Any, dout: Any, masks: HostMasks, opts: LongformerOptions
) -> Tuple[Any, ...]:
    """(dq, dk, dv) or, with the global projections, (dq, dk, dv, dq_g, dk_g, dv_g)."""
    named = _named(tensors)
    place = Placement(named + [("out", out), ("lse", lse), ("dout", dout)])
    grad_names = ("dq", "dk", "dv", "dq_global", "dk_global", "dv_global")[: len(named)]
    shape, _ = _native.longformer_shapes([int(n) for n in tensors[0].shape])
    made = [place.empty(tuple(shape), dtype_name(tensors[0])) for _ in grad_names]
    grads = {n: place.export(n, t) for n, t in zip(grad_names, made)}
    _native.longformer_backward(
        *(place.export(n, x) for n, x in named[:3]),
        place.export("out", out),
        place.export("lse", lse),
        place.export("dout", dout),
        grads.pop("dq"),
        grads.pop("dk"),
        grads.pop("dv"),
        stream=place.stream,
        **grads,
        **_native_globals(place, named),
        **opts.native(),
        **masks.native(),
    )
    return tuple(place.to_caller(t) for t in made)


__all__ = ["longformer_attention", "longformer_attention_backward"]
