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
- ``feed_forward(x, w1, w2, b1=None, b2=None, *, w3=None, b3=None, activation="gelu",
  residual=False)``: the fused feed-forward block ``act(x W1ᵀ + b1) W2ᵀ + b2`` (gated with
  w3: SwiGLU, GeGLU) on nn.Linear-shaped weights; ``feed_forward_backward`` for numpy users;
  ``FeedForward(d_model, d_hidden, ...)``, a torch.nn.Module drop-in whose state_dict is
  that of nn.Linear layers (loaded on first use, since it imports torch; see ``_ffn``).
- ``linformer_attention(q, k, v, e, f=None, *, key_padding_mask=None, softmax_scale=None,
  return_aux=False)``: Linformer attention ``softmax(scale · Q (E K)ᵀ) (F V)`` with
  projections E, F (He/Hf, k, N_max) shared per head or across heads, F = E when f is
  None; ``linformer_attention_backward`` for numpy users; ``LinformerAttention(dim,
  seq_len, k, heads, ...)``, a torch.nn.Module whose state_dict loads lucidrains/linformer's
  ``LinformerSelfAttention`` weights (loaded on first use; see ``_linformer``).
- ``lsh_attention(qk, v, rotations, *, chunk_length, chunks_before=1, chunks_after=0,
  causal=False, n_buckets=None, key_padding_mask=None, buckets=None,
  return_buckets=False, return_aux=False)``: Reformer LSH attention, Hugging Face's
  ``LSHSelfAttention`` before its output dense (shared-QK hashing, sorted chunks, rounds
  combined by logsumexp; given buckets skip the hashing); ``lsh_attention_backward`` for
  numpy users; CPU reference only so far (see ``_reformer``).
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

The backward itself is not differentiable (no double backward): under
``create_graph=True`` the gradients come back requiring grad, and differentiating them
again (a gradient penalty, say) raises a RuntimeError, on both routes.

flashkernels never imports torch itself unless torch tensors are used: the ops are
registered when ``flashkernels`` is imported after torch, or else right after torch's
own import completes (a one-shot import hook), or at the latest on the first call with a
torch tensor. ``flashkernels.register_torch_ops()`` registers them explicitly.

How arrays are handled
----------------------
- Inputs are read through DLPack (``__dlpack__`` / ``__dlpack_device__``): shape,
  strides, dtype and device pointer, no copy. Any unit-last-stride view works.
- CPU arrays (numpy, torch, or any CPU DLPack producer) run the CPU reference (f32
  accumulation). float32, float16, and bfloat16 (numpy through ml_dtypes). It reads a
  strided view element by element (a small view of a big array costs the view's size),
  raises MemoryError when a buffer cannot be allocated, and stops with
  KeyboardInterrupt on Ctrl-C (it checks for signals about every 100 ms).
- The arrays of one call come from one framework: mixing them (a numpy q with torch k
  and v, say) is a TypeError. Options are checked for their type too: bools must be
  bools, ints ints (any size: window sides past 2**31 - 1 are unbounded, other options
  past 2**63 - 1 a ValueError), scales finite positive floats within float32's range.
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

import sys
from typing import Any, Optional

from . import _native
from ._attention import attention_backward, flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from ._conv import avg_pool2d, avg_pool2d_backward, conv2d, conv2d_backward, max_pool2d, max_pool2d_backward
from ._ffn import feed_forward, feed_forward_backward
from ._linformer import linformer_attention, linformer_attention_backward
from ._longformer import longformer_attention, longformer_attention_backward
from ._reformer import lsh_attention, lsh_attention_backward

# The package is this file's re-exports and the torch registration below. The modules
# behind it import one another in one direction only: _dlpack (the DLPack glue) <- the
# ops (_attention, _conv, _longformer) <- their torch integration (_torch, _torch_conv,
# _torch_longformer, built with _torch_ops) and ring; none imports the package itself.
# The ops load their torch module on the first call with a torch tensor (numpy / jax
# users never import torch).

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
    "feed_forward",
    "feed_forward_backward",
    "linformer_attention",
    "linformer_attention_backward",
    "lsh_attention",
    "lsh_attention_backward",
]


def cuda_available() -> bool:
    """True when flashkernels was built with CUDA and a driver with a GPU is present."""
    return _native.cuda_available()


def register_torch_ops() -> None:
    """Registers the torch.library ops ``torch.ops.flashkernels.attention_fwd``,
    ``attention_bwd``, ``conv2d_fwd``, ``conv2d_bwd``, ``longformer_fwd`` and
    ``longformer_bwd``, ``ffn_fwd``, ``ffn_bwd``, ``linformer_fwd``, ``linformer_bwd``,
    ``reformer_fwd``, ``reformer_bwd`` (importing torch). Not needed in the
    usual cases (see the module docs); idempotent."""
    from . import (
        _torch,  # noqa: F401  (registers on import)
        _torch_conv,  # noqa: F401  (conv2d / pooling ops, likewise)
        _torch_ffn,  # noqa: F401  (feed-forward ops, likewise)
        _torch_linformer,  # noqa: F401  (Linformer ops, likewise)
        _torch_longformer,  # noqa: F401  (Longformer ops, likewise)
        _torch_reformer,  # noqa: F401  (Reformer LSH ops, likewise)
    )


# Ring (context-parallel) attention over torch.distributed (python/flashkernels/ring.py).
# It imports torch, so it is loaded when first asked for (``flashkernels.ring_attention``),
# and kept out of __all__ (``from flashkernels import *`` must not import torch).
_RING_NAMES = ("ring_attention", "merge_attention_states")


def __getattr__(name: str) -> Any:
    if name in _RING_NAMES:
        from . import ring

        return getattr(ring, name)
    if name == "FeedForward":  # a torch.nn.Module: loaded on first use, like ring
        from . import _torch_ffn

        return _torch_ffn.FeedForward
    if name == "LinformerAttention":  # likewise
        from . import _torch_linformer

        return _torch_linformer.LinformerAttention
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
