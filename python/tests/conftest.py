"""Shared fixtures: random inputs and a float64 numpy reference (independent of the Rust
code), in the (batch, seqlen, heads, head_dim) layout."""

import numpy as np
import pytest


def bottom_right_mask(nq: int, nk: int) -> np.ndarray:
    """(nq, nk) bool, True where query i may see key j: j <= i + nk - nq."""
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    return j <= i + (nk - nq)


def numpy_attention(q, k, v, *, causal=False, scale=None):
    """O (B, Nq, H, D) and LSE (B, H, Nq) in float64 from (B, N, H, D) inputs. Rows with
    no visible key give O = 0 and LSE = -inf (flashkernels' convention)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = np.where(bottom_right_mask(q.shape[1], k.shape[1]), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (np.log(denom) + m)[..., 0]
        p = np.where(denom > 0, p / denom, 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def randn(rng):
    """randn(*shape, dtype=np.float32): standard normal values (never all zeros)."""

    def make(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    return make


@pytest.fixture
def reference():
    """The float64 numpy reference, `numpy_attention`."""
    return numpy_attention


@pytest.fixture
def causal_mask():
    """`bottom_right_mask(nq, nk)`."""
    return bottom_right_mask
