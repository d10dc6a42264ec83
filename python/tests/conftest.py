"""Shared fixtures: random inputs and a float64 numpy reference (independent of the Rust
code), in the (batch, seqlen, heads, head_dim) layout."""

import numpy as np
import pytest


def bottom_right_mask(nq: int, nk: int) -> np.ndarray:
    """(nq, nk) bool, True where query i may see key j: j <= i + nk - nq."""
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    return j <= i + (nk - nq)


def attention_mask(nq: int, nk: int, *, causal=False, window=(None, None)) -> np.ndarray:
    """(nq, nk) bool, True where query i may see key j, flashkernels' (and flash-attn's)
    bottom-right aligned rule: i + nk - nq - left <= j <= i + nk - nq + right, causal
    capping right at 0, None (or -1) sides unbounded."""
    left, right = (None if w is None or w < 0 else w for w in window)
    if causal:
        right = 0 if right is None else min(right, 0)
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    diag = i + nk - nq
    mask = np.ones((nq, nk), bool)
    if left is not None:
        mask &= j >= diag - left
    if right is not None:
        mask &= j <= diag + right
    return mask


def numpy_attention(q, k, v, *, causal=False, scale=None, window=(None, None)):
    """O (B, Nq, H, D) and LSE (B, H, Nq) in float64 from (B, N, H, D) inputs (k, v may
    have fewer heads: GQA). Rows with no visible key give O = 0 and LSE = -inf
    (flashkernels' convention)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = (np.repeat(x, group, axis=2) for x in (k, v))
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal or window != (None, None):
        s = np.where(attention_mask(q.shape[1], k.shape[1], causal=causal, window=window), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (np.log(denom) + m)[..., 0]
        p = np.where(denom > 0, p / denom, 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def varlen_mask(lens_q, lens_k, *, causal=False, window=(None, None)) -> np.ndarray:
    """(B, max_q, max_k) bool: each sequence's `attention_mask` in the top-left corner of
    a padded batch, False on padding."""
    mq, mk = max(max(lens_q), 1), max(max(lens_k), 1)
    mask = np.zeros((len(lens_q), mq, mk), bool)
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        mask[b, :nq, :nk] = attention_mask(nq, nk, causal=causal, window=window)
    return mask


def pad_varlen(x, cu, max_len=None) -> np.ndarray:
    """Packed (total, H, D) -> zero-padded (B, max_len, H, D)."""
    x = np.asarray(x)
    lens = np.diff(cu)
    max_len = max(int(lens.max()), 1) if max_len is None else max_len
    out = np.zeros((len(lens), max_len) + x.shape[1:], x.dtype)
    for b in range(len(lens)):
        out[b, : lens[b]] = x[cu[b] : cu[b + 1]]
    return out


def unpad_varlen(x, cu) -> np.ndarray:
    """Padded (B, N, ...) -> packed (total, ...)."""
    return np.concatenate([x[b, : cu[b + 1] - cu[b]] for b in range(len(cu) - 1)])


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


@pytest.fixture
def window_mask():
    """`attention_mask(nq, nk, *, causal, window)`."""
    return attention_mask


def pytest_addoption(parser):
    parser.addoption(
        "--fk-quick",
        action="store_true",
        help="keep a covering subset of each parametrized test: the first item for every "
        "(parameter, value) pair, so every op, dtype and option value still runs once "
        "(the GPU check's quick step, scripts/gpu_check.py)",
    )
    parser.addoption(
        "--fk-require-gpu",
        action="store_true",
        help="on the GPU machine: a test skipped for want of a CUDA device (or torch) fails "
        "instead, so a broken GPU setup cannot pass as skips (cupy / jax-GPU skips stay)",
    )


# Skip reasons that mean "no GPU here"; with --fk-require-gpu they are failures.
NO_GPU_REASONS = ("needs a CUDA device", "needs a CUDA device and torch")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.config.getoption("--fk-require-gpu"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if reason.removeprefix("Skipped: ") in NO_GPU_REASONS:
            report.outcome = "failed"
            report.longrepr = f"skipped on the GPU machine: {reason}"


def covering_subset(items):
    """(kept, dropped): greedy, in collection order, an item is kept when it brings a
    (test function, parameter, value) triple not yet covered."""
    seen, kept, dropped = set(), [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        fn = (item.path, item.originalname)
        keys = {(fn, name, repr(value)) for name, value in params.items()} or {(fn, None, None)}
        if keys - seen:
            seen |= keys
            kept.append(item)
        else:
            dropped.append(item)
    return kept, dropped


def pytest_collection_modifyitems(config, items):
    if config.getoption("--fk-quick"):
        kept, dropped = covering_subset(items)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
