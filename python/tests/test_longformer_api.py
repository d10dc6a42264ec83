"""flashkernels.longformer_attention on the CPU (numpy, torch CPU, jax CPU) against an
independent dense-mask implementation of the semantics written in its docstring:

- local (non-global, non-padded) query i, head h: keys i + d_h * t, t in [-w, w]
  (causal: [-w, 0]), in range and not padded, plus every global key (causal: j <= i), with
  q, k, v;
- global query i: every non-padded key (causal: j <= i), with q_global, k_global, v_global
  (q, k, v when not given);
- padded query rows: out 0, lse -inf.

Also the Hugging Face fixtures (tests/fixtures/longformer), torch autograd against torch's
own autograd through the dense reference, torch.library.opcheck and torch.compile, and the
error messages. numpy is required; torch and jax tests skip without them.
"""

from __future__ import annotations

import math
import pathlib
import zlib

import numpy as np
import pytest

import flashkernels as fk
from _rounding import assert_one_rounding

try:
    import torch
except ImportError:  # pragma: no cover - CI without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "longformer"


# ---------------------------------------------------------------------------------------
# The dense reference (numpy, float64).


def allowed_mask(n, window, dilation, causal, glob, pad, heads):
    """(B, H, N, N) bool: may query i see key j. glob, pad: (B, N) bool; dilation an int or
    one per head."""
    dil = np.broadcast_to(np.asarray(dilation, dtype=np.int64).reshape(-1), (heads,))
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    delta = j - i
    b = glob.shape[0]
    out = np.zeros((b, heads, n, n), bool)
    for h in range(heads):
        d = int(dil[h])
        band = (delta % d == 0) & (np.abs(delta) <= window * d)
        if causal:
            band &= delta <= 0
        for bb in range(b):
            keys = ~pad[bb][None, :]
            local = (band | glob[bb][None, :]) & keys
            glob_row = np.broadcast_to(keys, (n, n))
            if causal:
                local = local & (delta <= 0)
                glob_row = glob_row & (delta <= 0)
            m = np.where(glob[bb][:, None], glob_row, local)
            m = m & ~pad[bb][:, None]
            out[bb, h] = m
    return out


def numpy_longformer(q, k, v, window, *, dilation=1, causal=False, glob=None, pad=None, gqkv=None, scale=None):
    """out (B, N, H, D), lse (B, H, N) in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    qg, kg, vg = (q, k, v) if gqkv is None else (np.asarray(x, np.float64) for x in gqkv)
    b, n, h, d = q.shape
    glob = np.zeros((b, n), bool) if glob is None else np.asarray(glob, bool)
    pad = np.zeros((b, n), bool) if pad is None else np.asarray(pad, bool)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    allowed = allowed_mask(n, window, dilation, causal, glob, pad, h)
    s_local = np.einsum("bihd,bjhd->bhij", q, k) * scale
    s_glob = np.einsum("bihd,bjhd->bhij", qg, kg) * scale
    is_g = glob[:, None, :, None]
    s = np.where(is_g, s_glob, s_local)
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (np.log(den) + m)[..., 0]
        p = np.where(den > 0, p / den, 0.0)
    out_local = np.einsum("bhij,bjhd->bihd", np.where(is_g, 0.0, p), v)
    out_glob = np.einsum("bhij,bjhd->bihd", np.where(is_g, p, 0.0), vg)
    return out_local + out_glob, lse


def _close(got, want, tol, what=""):
    got = np.asarray(got, np.float64)
    err = np.abs(got - want).max() if got.size else 0.0
    assert err <= tol * max(1.0, np.abs(want).max()), f"{what}: max err {err:.3e} > {tol}"


def _lse_close(got, want, tol=1e-5):
    got = np.asarray(got, np.float64)
    fin = np.isfinite(want)
    assert (np.isneginf(got) == ~fin).all(), "lse -inf exactly on padded rows"
    _close(got[fin], want[fin], tol, "lse")


def _make_masks(rng, b, n, n_global, pad_kind):
    """(glob, pad) bool (B, N): padding none / tail / arbitrary; globals on non-padded
    tokens, including the first and the last real token when there are enough."""
    pad = np.zeros((b, n), bool)
    for bb in range(b):
        if pad_kind == "tail":
            length = max(1, n - 1 - 2 * bb - rng.integers(0, max(1, n // 3)))
            pad[bb, length:] = True
        elif pad_kind == "random":
            pad[bb] = rng.random(n) < 0.3
            pad[bb, rng.integers(0, n)] = False
    glob = np.zeros((b, n), bool)
    for bb in range(b):
        real = np.flatnonzero(~pad[bb])
        picks = []
        if n_global >= 1:
            picks.append(real[0])
        if n_global >= 2:
            picks.append(real[-1])
        if n_global >= 3:
            picks.extend(rng.choice(real, size=min(len(real), n_global - 2), replace=False))
        glob[bb, picks] = True
    return glob, pad


CASES = [
    # (b, n, h, d, window, dilation, causal, n_global, pad_kind, separate globals)
    (1, 13, 1, 8, 1, 1, False, 0, "none", False),
    (2, 17, 3, 8, 2, [1, 2, 4], False, 3, "tail", True),
    (2, 23, 3, 16, 3, [3, 1, 2], True, 4, "random", True),
    (1, 9, 1, 4, 0, 1, False, 2, "none", True),
    (2, 11, 1, 8, 0, 2, True, 1, "tail", False),
    (1, 10, 3, 8, 25, [1, 2, 3], False, 2, "random", True),  # w beyond N
    (2, 31, 3, 8, 4, [2, 3, 4], False, 5, "tail", False),
    (2, 19, 1, 32, 2, 4, True, 0, "random", False),
    (1, 37, 3, 8, 5, 1, True, 6, "none", True),
    (2, 8, 3, 4, 1, [1, 1, 2], False, 8, "none", True),  # (nearly) everything global
]


def _inputs(rng, case, dtype=np.float32):
    b, n, h, d, w, dil, causal, ng, pk, sep = case
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(dtype) for _ in range(3))
    gqkv = tuple(rng.standard_normal((b, n, h, d)).astype(dtype) for _ in range(3)) if sep else None
    glob, pad = _make_masks(rng, b, n, ng, pk)
    return q, k, v, gqkv, glob, pad


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "b{}n{}h{}d{}w{}dil{}{}g{}{}{}".format(
        *c[:5], c[5], "c" if c[6] else "", c[7], c[8], "sep" if c[9] else ""
    ),
)
def test_numpy_matches_dense_reference(case):
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    b, n, h, d, w, dil, causal, ng, pk, sep = case
    q, k, v, gqkv, glob, pad = _inputs(rng, case)
    out, lse = fk.longformer_attention(
        q, k, v, w, dilation=dil, causal=causal, global_tokens=glob, padding_mask=pad, global_qkv=gqkv, return_lse=True
    )
    assert isinstance(out, np.ndarray) and out.shape == q.shape and out.dtype == np.float32
    assert lse.shape == (b, h, n) and lse.dtype == np.float32
    want, want_lse = numpy_longformer(q, k, v, w, dilation=dil, causal=causal, glob=glob, pad=pad, gqkv=gqkv)
    _close(out, want, 2e-5, "out")
    _lse_close(lse, want_lse)
    assert (out[pad] == 0).all()
    # index lists give the same result
    idx = [list(np.flatnonzero(glob[bb])) for bb in range(b)]
    out2 = fk.longformer_attention(
        q, k, v, w, dilation=dil, causal=causal, global_tokens=idx, padding_mask=pad, global_qkv=gqkv
    )
    np.testing.assert_array_equal(out2, out)


def test_scale_and_tuple_dilation():
    rng = np.random.default_rng(5)
    case = (2, 14, 2, 8, 2, (2, 3), False, 2, "tail", False)
    q, k, v, _, glob, pad = _inputs(rng, case)
    out = fk.longformer_attention(q, k, v, 2, dilation=(2, 3), global_tokens=glob, padding_mask=pad, scale=0.3)
    want, _ = numpy_longformer(q, k, v, 2, dilation=[2, 3], glob=glob, pad=pad, scale=0.3)
    _close(out, want, 2e-5)


def test_numpy_backward_matches_finite_differences():
    """The numpy backward against central differences of the float64 reference."""
    rng = np.random.default_rng(7)
    case = (1, 9, 2, 4, 1, [1, 2], False, 2, "tail", True)
    q, k, v, gqkv, glob, pad = _inputs(rng, case, np.float32)
    kw = dict(dilation=[1, 2], global_tokens=glob, padding_mask=pad)
    out, lse = fk.longformer_attention(q, k, v, 1, global_qkv=gqkv, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = fk.longformer_attention_backward(q, k, v, out, lse, dout, 1, global_qkv=gqkv, **kw)
    assert len(grads) == 6
    inputs = [x.astype(np.float64) for x in (q, k, v) + gqkv]

    def loss(xs):
        o, _ = numpy_longformer(*xs[:3], 1, dilation=[1, 2], glob=glob, pad=pad, gqkv=xs[3:])
        return float((o * dout).sum())

    eps = 1e-6
    for t, g in enumerate(grads):
        num = np.zeros_like(inputs[t])
        for ix in np.ndindex(*inputs[t].shape):
            xs = [x.copy() for x in inputs]
            xs[t][ix] += eps
            up = loss(xs)
            xs[t][ix] -= 2 * eps
            num[ix] = (up - loss(xs)) / (2 * eps)
        _close(g, num, 1e-4, f"grad {t}")
    # without the projections, three gradients
    out, lse = fk.longformer_attention(q, k, v, 1, return_lse=True, **kw)
    assert len(fk.longformer_attention_backward(q, k, v, out, lse, dout, 1, **kw)) == 3


def test_bfloat16_and_float16_numpy():
    rng = np.random.default_rng(3)
    case = (2, 15, 2, 8, 2, 1, False, 2, "tail", False)
    q, k, v, _, glob, pad = _inputs(rng, case)
    want, _ = numpy_longformer(q, k, v, 2, glob=glob, pad=pad)
    out = fk.longformer_attention(
        q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), 2, global_tokens=glob, padding_mask=pad
    )
    assert out.dtype == np.float16
    _close(out, want, 5e-3)
    # Per element: one rounding of O from f32, against float64 on the stored inputs.
    stored, _ = numpy_longformer(*(x.astype(np.float16) for x in (q, k, v)), 2, glob=glob, pad=pad)
    assert_one_rounding(out, stored, np.float16, what="O f16")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = ml_dtypes.bfloat16
    out = fk.longformer_attention(q.astype(bf), k.astype(bf), v.astype(bf), 2, global_tokens=glob, padding_mask=pad)
    assert out.dtype == bf
    _close(out.astype(np.float32), want, 3e-2)
    stored, _ = numpy_longformer(*(x.astype(bf) for x in (q, k, v)), 2, glob=glob, pad=pad)
    assert_one_rounding(out, stored, bf, what="O bf16")


# ---------------------------------------------------------------------------------------
# Hugging Face fixtures.


def parse_fixture(path):
    """(config dict, {name: array}) from one fixture file (format: see
    scripts/make_longformer_fixtures.py)."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    cfg = {}
    for item in lines[0].split()[1:]:
        key, val = item.split("=")
        cfg[key] = float(val) if key == "scale" else int(val)
    tensors = {}
    for head, body in zip(lines[1::2], lines[2::2]):
        _, name, dtype, shape = head.split()
        shape = tuple(int(s) for s in shape.split(","))
        if dtype == "bool":
            arr = np.array([x == "1" for x in body.split()], dtype=bool)
        else:
            arr = np.array(body.split(), dtype=np.float32)
        tensors[name] = arr.reshape(shape)
    return cfg, tensors


FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.txt"))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_hugging_face_fixtures(name):
    cfg, t = parse_fixture(FIXTURES / name)
    out = fk.longformer_attention(
        t["q"],
        t["k"],
        t["v"],
        cfg["window"],
        dilation=cfg["dilation"],
        causal=bool(cfg["causal"]),
        global_tokens=t["global_mask"],
        padding_mask=t["padding_mask"],
        global_qkv=(t["q_g"], t["k_g"], t["v_g"]),
        scale=cfg["scale"],
    )
    err = np.abs(out - t["out_hf"]).max()
    assert err <= 2e-5, f"{name}: max |out - out_hf| = {err:.3e}"
    assert (out[t["padding_mask"]] == 0).all()
    # HF's attention_mask convention: 0 = padding, 1 = local, 2 = global
    attention_mask = np.where(t["padding_mask"], 0, np.where(t["global_mask"], 2, 1))
    out2 = fk.longformer_attention(
        t["q"],
        t["k"],
        t["v"],
        cfg["window"],
        global_tokens=attention_mask == 2,
        padding_mask=attention_mask == 0,
        global_qkv=(t["q_g"], t["k_g"], t["v_g"]),
    )
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)


def test_fixtures_present():
    assert FIXTURE_NAMES, f"no fixtures in {FIXTURES}"


# ---------------------------------------------------------------------------------------
# Errors.


def _small(rng=None, b=2, n=10, h=2, d=8):
    rng = rng or np.random.default_rng(0)
    return tuple(rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(global_tokens=[[0, 10], [1]]), ValueError, "out of range"),
        (dict(global_tokens=[[-1], [1]]), ValueError, "out of range"),
        (dict(global_tokens=[[10**30], [1]]), ValueError, "out of range"),
        (dict(global_tokens=[[3, 3], []]), ValueError, "listed twice"),
        (dict(global_tokens=[[3]]), ValueError, "sequences"),
        (dict(global_tokens=np.zeros((2, 9), bool)), ValueError, "global_mask has shape"),
        (dict(global_tokens=np.zeros((2, 10, 1), bool)), ValueError, "rank|dimension|global_mask"),
        (dict(padding_mask=np.zeros((3, 10), bool)), ValueError, "padding_mask has shape"),
        (dict(padding_mask=np.zeros((2, 10), np.float32)), TypeError, "boolean"),
        (dict(global_tokens=[[True, False]]), TypeError, "boolean mask"),
        (dict(global_tokens="abc"), TypeError, "global_tokens"),
        (
            dict(global_tokens=[[9], [0]], padding_mask=np.arange(10)[None].repeat(2, 0) >= 8),
            ValueError,
            "both global and padded",
        ),
        (dict(window=-1), ValueError, "window must be >= 0"),
        (dict(window=1.5), TypeError, "window must be an int"),
        (dict(dilation=0), ValueError, "dilation must be >= 1"),
        (dict(dilation=[1, 0]), ValueError, "dilation must be >= 1"),
        (dict(dilation=[1, 2, 3]), ValueError, "one per head"),
        (dict(dilation=[]), ValueError, "dilation"),
        (dict(dilation=1.5), TypeError, "dilation must be an int"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(global_qkv=(1, 2)), TypeError, "global_qkv"),
        (dict(global_qkv="qkv"), TypeError, "global_qkv"),
    ],
)
def test_errors(kwargs, exc, match):
    q, k, v = _small()
    kwargs = dict(kwargs)
    window = kwargs.pop("window", 2)
    with pytest.raises(exc, match=match):
        fk.longformer_attention(q, k, v, window, **kwargs)


def test_huge_window_and_dilation_clip_to_the_sequence():
    q, k, v = _small()
    want = fk.longformer_attention(q, k, v, 10, dilation=[10, 1], global_tokens=[[1], []])
    got = fk.longformer_attention(q, k, v, 10**30, dilation=[10**30, 1], global_tokens=[[1], []])
    np.testing.assert_array_equal(got, want)


def test_shape_errors():
    q, k, v = _small()
    with pytest.raises(ValueError, match="rank|shape"):
        fk.longformer_attention(q[0], k[0], v[0], 2)
    with pytest.raises(ValueError, match="shape"):
        fk.longformer_attention(q, k[:, :9], v, 2)
    with pytest.raises(ValueError, match="q_global has shape"):
        fk.longformer_attention(q, k, v, 2, global_qkv=(q[:, :5], k, v))
    with pytest.raises(ValueError, match="shape"):
        fk.longformer_attention(q, k, v, 2, global_qkv=(q, k, v[..., :4]))
    with pytest.raises(TypeError):
        fk.longformer_attention(q, k.astype(np.float16), v, 2)
    with pytest.raises(TypeError, match="DLPack"):
        fk.longformer_attention(q.tolist(), k, v, 2)
    out, lse = fk.longformer_attention(q, k, v, 2, return_lse=True)
    with pytest.raises(ValueError, match="lse"):
        fk.longformer_attention_backward(q, k, v, out, lse[:, :1], out, 2)


# ---------------------------------------------------------------------------------------
# jax.


def test_jax_cpu_matches_numpy():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(11)
    case = (2, 17, 3, 8, 2, [1, 2, 3], False, 3, "tail", True)
    q, k, v, gqkv, glob, pad = _inputs(rng, case)
    with jax.default_device(jax.devices("cpu")[0]):
        args = [jnp.asarray(x) for x in (q, k, v)]
        g = tuple(jnp.asarray(x) for x in gqkv)
        out, lse = fk.longformer_attention(
            *args,
            2,
            dilation=[1, 2, 3],
            global_tokens=jnp.asarray(glob),
            padding_mask=jnp.asarray(pad),
            global_qkv=g,
            return_lse=True,
        )
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    want = fk.longformer_attention(
        q, k, v, 2, dilation=[1, 2, 3], global_tokens=glob, padding_mask=pad, global_qkv=gqkv
    )
    np.testing.assert_array_equal(np.asarray(out), want)
    with pytest.raises(TypeError, match="jax tracing|DLPack"):
        jax.jit(lambda a, b, c: fk.longformer_attention(a, b, c, 2))(*args)


# ---------------------------------------------------------------------------------------
# torch (CPU): autograd, custom ops, torch.compile.


def torch_longformer(q, k, v, window, *, dilation=1, causal=False, glob=None, pad=None, gqkv=None, scale=None):
    """Dense-mask Longformer with torch ops (differentiable through torch's autograd), on
    q's device; glob, pad: numpy (B, N) bool."""
    b, n, h, d = q.shape
    qg, kg, vg = (q, k, v) if gqkv is None else gqkv
    glob = np.zeros((b, n), bool) if glob is None else np.asarray(glob, bool)
    pad = np.zeros((b, n), bool) if pad is None else np.asarray(pad, bool)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    allowed = torch.from_numpy(allowed_mask(n, window, dilation, causal, glob, pad, h)).to(q.device)
    is_g = torch.from_numpy(glob)[:, None, :, None].to(q.device)
    s = torch.where(is_g, torch.einsum("bihd,bjhd->bhij", qg, kg), torch.einsum("bihd,bjhd->bhij", q, k)) * scale
    any_row = allowed.any(dim=-1, keepdim=True)
    s = torch.where(any_row, s.masked_fill(~allowed, float("-inf")), torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * allowed
    lse = torch.where(any_row[..., 0], torch.logsumexp(s, dim=-1), torch.full_like(s[..., 0], float("-inf")))
    out = torch.einsum("bhij,bjhd->bihd", torch.where(is_g, 0.0, p), v) + torch.einsum(
        "bhij,bjhd->bihd", torch.where(is_g, p, 0.0), vg
    )
    return out, lse


def _leaves(arrays, dtype):
    return [torch.tensor(x, dtype=dtype, requires_grad=True) for x in arrays]


TORCH_CASES = [CASES[1], CASES[2], CASES[4], CASES[5], CASES[6], CASES[9]]


@needs_torch
@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
@pytest.mark.parametrize("mask_kind", ["tensor", "numpy", "indices"])
def test_torch_autograd_matches_torch_reference(case, mask_kind):
    rng = np.random.default_rng(zlib.crc32(f"{case}{mask_kind}".encode()))
    b, n, h, d, w, dil, causal, ng, pk, sep = case
    q, k, v, gqkv, glob, pad = _inputs(rng, case)
    arrays = (q, k, v) + (gqkv or ())
    mine = _leaves(arrays, torch.float32)
    ref = _leaves(arrays, torch.float64)
    if mask_kind == "tensor":
        gt, pt = torch.from_numpy(glob), torch.from_numpy(pad)
    elif mask_kind == "numpy":
        gt, pt = glob, pad
    else:
        gt, pt = [np.flatnonzero(glob[bb]).tolist() for bb in range(b)], torch.from_numpy(pad).to(torch.int64)
    out, lse = fk.longformer_attention(
        *mine[:3],
        w,
        dilation=dil,
        causal=causal,
        global_tokens=gt,
        padding_mask=pt,
        global_qkv=tuple(mine[3:]) if sep else None,
        return_lse=True,
    )
    want, want_lse = torch_longformer(
        *ref[:3], w, dilation=dil, causal=causal, glob=glob, pad=pad, gqkv=tuple(ref[3:]) if sep else None
    )
    assert out.dtype == torch.float32 and out.shape == q.shape and not lse.requires_grad
    _close(out.detach().numpy(), want.detach().numpy(), 2e-5, "out")
    _lse_close(lse.numpy(), want_lse.detach().numpy())
    dout = torch.from_numpy(rng.standard_normal(q.shape))
    out.backward(dout.float())
    want.backward(dout)
    for t, (a, r) in enumerate(zip(mine, ref)):
        assert a.grad is not None, f"no gradient for input {t}"
        _close(a.grad.numpy(), r.grad.numpy(), 1e-4, f"grad {t}")


@needs_torch
def test_torch_sum_backward_and_no_grad():
    rng = np.random.default_rng(2)
    q, k, v, gqkv, glob, pad = _inputs(rng, CASES[1])
    leaves = _leaves((q, k, v), torch.float32)
    fk.longformer_attention(*leaves, 2, global_tokens=torch.from_numpy(glob)).sum().backward()  # expanded dout
    ref = _leaves((q, k, v), torch.float64)
    torch_longformer(*ref, 2, glob=glob)[0].sum().backward()
    for a, r in zip(leaves, ref):
        _close(a.grad.numpy(), r.grad.numpy(), 1e-4)
    with torch.no_grad():
        assert not fk.longformer_attention(*leaves, 2).requires_grad
    # the functional backward with torch tensors equals autograd's
    t = [x.detach() for x in leaves]
    out, lse = fk.longformer_attention(*t, 2, global_tokens=torch.from_numpy(glob), return_lse=True)
    grads = fk.longformer_attention_backward(
        *t, out, lse, torch.ones_like(out), 2, global_tokens=torch.from_numpy(glob)
    )
    for g, a in zip(grads, leaves):
        torch.testing.assert_close(g, a.grad)


@needs_torch
def test_torch_bfloat16_cpu():
    rng = np.random.default_rng(4)
    case = (2, 15, 2, 8, 2, [1, 2], True, 2, "tail", True)
    q, k, v, gqkv, glob, pad = _inputs(rng, case)
    leaves = _leaves((q, k, v) + gqkv, torch.bfloat16)
    out = fk.longformer_attention(
        *leaves[:3],
        2,
        dilation=[1, 2],
        causal=True,
        global_tokens=torch.from_numpy(glob),
        padding_mask=torch.from_numpy(pad),
        global_qkv=tuple(leaves[3:]),
    )
    assert out.dtype == torch.bfloat16
    ref = _leaves([x.astype(np.float32) for x in (q, k, v) + gqkv], torch.float64)
    want, _ = torch_longformer(*ref[:3], 2, dilation=[1, 2], causal=True, glob=glob, pad=pad, gqkv=tuple(ref[3:]))
    _close(out.float().detach().numpy(), want.detach().numpy(), 3e-2)
    stored = [x.detach().double() for x in leaves]
    exact, _ = torch_longformer(
        *stored[:3], 2, dilation=[1, 2], causal=True, glob=glob, pad=pad, gqkv=tuple(stored[3:])
    )
    assert_one_rounding(out.detach().float().numpy(), exact.numpy(), "bfloat16", what="O bf16 (torch)")
    out.float().sum().backward()
    want.sum().backward()
    for a, r in zip(leaves, ref):
        _close(a.grad.float().numpy(), r.grad.numpy(), 5e-2)


def _op_args(rng, sep=True, kind="mask"):
    b, n, h, d = 2, 12, 2, 8
    t = [torch.randn(b, n, h, d, requires_grad=True) for _ in range(6 if sep else 3)]
    glob, pad = _make_masks(rng, b, n, 2, "tail")
    gm = torch.from_numpy(glob) if kind == "mask" else None
    flat = [int(i) for bb in range(b) for i in np.flatnonzero(glob[bb])] if kind == "indices" else None
    counts = [int(glob[bb].sum()) for bb in range(b)] if kind == "indices" else None
    qg, kg, vg = t[3:] if sep else (None, None, None)
    return (*t[:3], qg, kg, vg, gm, torch.from_numpy(pad), flat, counts, 2, [1, 2], False, None)


@needs_torch
@pytest.mark.parametrize("sep", [True, False])
@pytest.mark.parametrize("kind", ["mask", "indices"])
def test_torch_opcheck(sep, kind):
    fk.register_torch_ops()
    args = _op_args(np.random.default_rng(0), sep, kind)
    torch.library.opcheck(torch.ops.flashkernels.longformer_fwd.default, args)
    out, lse = torch.ops.flashkernels.longformer_fwd(*args)
    dout = torch.randn_like(out)
    bargs = (dout, *args[:3], out.detach(), lse, *args[3:])
    bargs = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in bargs)
    torch.library.opcheck(torch.ops.flashkernels.longformer_bwd.default, bargs)


@needs_torch
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    rng = np.random.default_rng(9)
    case = (2, 14, 2, 8, 2, [1, 3], False, 3, "tail", True)
    q, k, v, gqkv, glob, pad = _inputs(rng, case)
    gt, pt = torch.from_numpy(glob), torch.from_numpy(pad)

    def f(q, k, v, qg, kg, vg, gt, pt):
        o, lse = fk.longformer_attention(
            q, k, v, 2, dilation=[1, 3], global_tokens=gt, padding_mask=pt, global_qkv=(qg, kg, vg), return_lse=True
        )
        return o * 2.0, lse

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    mine = _leaves((q, k, v) + gqkv, torch.float32)
    eager = _leaves((q, k, v) + gqkv, torch.float32)
    out, lse = compiled(*mine, gt, pt)
    want, want_lse = f(*eager, gt, pt)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    out.sum().backward()
    want.sum().backward()
    for a, r in zip(mine, eager):
        torch.testing.assert_close(a.grad, r.grad)
    # index lists (graph constants), no global projections
    idx = [np.flatnonzero(glob[bb]).tolist() for bb in range(2)]
    g = torch.compile(
        lambda q, k, v: fk.longformer_attention(q, k, v, 2, global_tokens=idx), fullgraph=True, backend=backend
    )
    torch.testing.assert_close(g(*mine[:3]), fk.longformer_attention(*eager[:3], 2, global_tokens=gt))


@needs_torch
def test_torch_errors():
    q, k, v = (torch.randn(2, 10, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="out of range"):
        fk.longformer_attention(q, k, v, 2, global_tokens=[[10], []])
    with pytest.raises(ValueError, match="listed twice"):
        fk.longformer_attention(q, k, v, 2, global_tokens=[[1, 1], []])
    with pytest.raises(ValueError, match="global_mask has shape"):
        fk.longformer_attention(q, k, v, 2, global_tokens=torch.zeros(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="both global and padded"):
        fk.longformer_attention(q, k, v, 2, global_tokens=[[9], []], padding_mask=torch.arange(10).expand(2, 10) >= 9)
    with pytest.raises(ValueError, match="q_global has shape"):
        fk.longformer_attention(q, k, v, 2, global_qkv=(q[:, :4], k, v))
    with pytest.raises(TypeError, match="torch tensor"):
        fk.longformer_attention(q, k, v, 2, global_qkv=(q.numpy(), k, v))
    with pytest.raises(TypeError, match="boolean"):
        fk.longformer_attention(q, k, v, 2, padding_mask=torch.zeros(2, 10))
    qr = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="one per head"):
        fk.longformer_attention(qr, k, v, 2, dilation=[1, 2, 3])
