"""torch.library registration of the attention op, so that torch.compile can trace calls
to flashkernels (fullgraph included) instead of breaking the graph at an opaque call.

Eager calls do not go through the op (its dispatch costs microseconds per call); only
calls made while torch.compile traces do. Registered when flashkernels is imported after
torch, or on the first eager call with torch tensors.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


@torch.library.custom_op("flashkernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads_first: bool,
    causal: bool,
    scale: Optional[float],
) -> Tuple[torch.Tensor, torch.Tensor]:
    from . import _attention_eager

    return _attention_eager(
        (q, k, v), heads_first=heads_first, causal=causal, scale=scale, return_lse=True
    )


@attention_fwd.register_fake
def _(q, k, v, heads_first, causal, scale):
    # Same shapes, dtypes and strides as the real op: O's memory is (B, Nq, H, D)
    # contiguous, returned as its (B, H, Nq, D) view for heads-first callers.
    if heads_first:
        b, h, nq, d = q.shape
    else:
        b, nq, h, d = q.shape
    out = q.new_empty((b, nq, h, d))
    if heads_first:
        out = out.transpose(1, 2)
    return out, q.new_empty((b, h, nq), dtype=torch.float32)
