"""The fused feed-forward block on numpy arrays (the CPU reference) against a float64 numpy
definition: float32 tightly, float16 / bfloat16 within one rounding of each output (the
reference computes in float64 from the stored inputs, rounds the hidden activation once
to the dtype, then y once; every gradient once, dW2 from the rounded hidden activation).
"""

import math
import zlib

import ml_dtypes
import numpy as np
import pytest

import flashkernels as fk
from _rounding import spacing

ACTS = ("relu", "gelu", "gelu_tanh", "silu")
_erf = np.vectorize(math.erf, otypes=[np.float64])


def act(name, u):
    if name == "relu":
        return np.maximum(u, 0.0)
    if name == "gelu":
        return 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))
    return u / (1.0 + np.exp(-u))


def act_grad(name, u):
    if name == "relu":
        return (u > 0).astype(np.float64)
    if name == "gelu":
        return 0.5 * (1.0 + _erf(u / math.sqrt(2.0))) + u * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        t = np.tanh(k * (u + 0.044715 * u**3))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * u * u)
    s = 1.0 / (1.0 + np.exp(-u))
    return s * (1.0 + u * (1.0 - s))


def f64(a):
    return None if a is None else np.asarray(np.asarray(a).astype(np.float32), np.float64)


def define(x, w1, w2, w3, b1, b2, b3, activation, residual, dtype):
    """(u, g, h exact, h rounded to dtype, y) in float64 from the stored inputs."""
    x, w1, w2, w3, b1, b2, b3 = map(f64, (x, w1, w2, w3, b1, b2, b3))
    u = x @ w1.T + (0 if b1 is None else b1)
    g = None if w3 is None else x @ w3.T + (0 if b3 is None else b3)
    h = act(activation, u) * (1.0 if g is None else g)
    h_r = f64(h.astype(dtype)) if dtype != np.float32 else h
    y = h_r @ w2.T + (0 if b2 is None else b2) + (x if residual else 0)
    return u, g, h, h_r, y


def define_grads(dy, x, w1, w2, w3, b1, b2, b3, activation, residual, dtype):
    u, g, h, h_r, _ = define(x, w1, w2, w3, b1, b2, b3, activation, residual, dtype)
    dy, x, w1, w2, w3 = map(f64, (dy, x, w1, w2, w3))
    dh = dy @ w2
    du = dh * (1.0 if g is None else g) * act_grad(activation, u)
    dg = None if g is None else dh * act(activation, u)
    dx = du @ w1 + (0 if dg is None else dg @ w3) + (dy if residual else 0)
    return dict(
        dx=dx,
        dw1=du.T @ x,
        dw2=dy.T @ h_r,
        db1=du.sum(0),
        db2=dy.sum(0),
        dw3=None if dg is None else dg.T @ x,
        db3=None if dg is None else dg.sum(0),
    )


def make(rng, tokens, d_model, d_hidden, dtype, *, gated, bias, lead=None):
    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    x = r(*((lead or (tokens,)) + (d_model,)))
    w1 = r(d_hidden, d_model, scale=d_model**-0.5)
    w2 = r(d_model, d_hidden, scale=d_hidden**-0.5)
    w3 = r(d_hidden, d_model, scale=d_model**-0.5) if gated else None
    b1 = r(d_hidden, scale=0.5) if bias else None
    b2 = r(d_model, scale=0.5) if bias else None
    b3 = r(d_hidden, scale=0.5) if bias and gated else None
    return x, w1, w2, w3, b1, b2, b3


def tie_slack(h, dtype, rel=1e-5):
    """Where h lies within rel * |h| of a rounding tie of dtype, the reference (whose
    activations are accurate to about that, not to float64's last bit) may round it
    either way: one spacing there, 0 elsewhere."""
    if dtype == np.float32:
        return np.zeros_like(h)
    sp = spacing(h, dtype)
    to_tie = np.abs(np.abs(h - f64(h.astype(dtype))) - sp / 2)
    return np.where(to_tie <= rel * np.abs(h), sp, 0.0)


def _check(got, want, dtype, what, extra=0.0):
    """float32: 1e-5 relative; halves: within one rounding of want (plus ``extra``, what
    an ambiguous rounding of h can move it, and a 1e-5 slack of the largest element)."""
    got = np.asarray(np.asarray(got).astype(np.float32), np.float64)
    assert got.shape == want.shape, what
    if dtype == np.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()), err_msg=what)
        return
    bound = spacing(want, dtype) / 2 + 1e-5 * max(np.abs(want).max(), 1e-30) + extra
    err = np.abs(got - want)
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} of {err.size} beyond one rounding; worst {err.max():.3e}"


DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True)])
def test_forward_and_backward_match_definition(dtype, activation, gated, bias, residual):
    rng = np.random.default_rng(zlib.crc32(repr((activation, gated, bias, residual)).encode()))
    x, w1, w2, w3, b1, b2, b3 = make(rng, 13, 24, 40, dtype, gated=gated, bias=bias)
    kw = dict(w3=w3, b3=b3, activation=activation, residual=residual)
    y = fk.feed_forward(x, w1, w2, b1, b2, **kw)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    _, _, h, _, want = define(x, w1, w2, w3, b1, b2, b3, activation, residual, dtype)
    slack = tie_slack(h, dtype)
    _check(y, want, dtype, f"y {activation} gated={gated}", slack @ np.abs(f64(w2)).T)

    dy = rng.standard_normal(x.shape).astype(dtype)
    got = fk.feed_forward_backward(dy, x, w1, w2, b1, b2, **kw)
    want = define_grads(dy, x, w1, w2, w3, b1, b2, b3, activation, residual, dtype)
    extra = dict(dw2=np.abs(f64(dy)).T @ slack)
    for name, g in zip(("dx", "dw1", "dw2", "db1", "db2", "dw3", "db3"), got):
        if want[name] is None or (name in ("db1", "db2") and not bias) or (name == "db3" and b3 is None):
            assert g is None, name
            continue
        assert g.dtype == np.dtype(dtype), name
        _check(g, want[name], dtype, f"{name} {activation} gated={gated}", extra.get(name, 0.0))


@pytest.mark.parametrize("tokens,d_model,d_hidden", [(1, 3, 5), (7, 9, 11), (33, 16, 24)])
def test_odd_sizes(tokens, d_model, d_hidden):
    rng = np.random.default_rng(tokens)
    x, w1, w2, w3, b1, b2, b3 = make(rng, tokens, d_model, d_hidden, np.float32, gated=True, bias=True)
    y = fk.feed_forward(x, w1, w2, b1, b2, w3=w3, b3=b3, activation="silu")
    _check(y, define(x, w1, w2, w3, b1, b2, b3, "silu", False, np.float32)[-1], np.float32, "y")


def test_leading_dims_and_one_token():
    rng = np.random.default_rng(1)
    x, w1, w2, *_ = make(rng, 0, 8, 16, np.float32, gated=False, bias=False, lead=(2, 3, 5))
    y = fk.feed_forward(x, w1, w2)
    assert y.shape == (2, 3, 5, 8)
    flat = fk.feed_forward(x.reshape(30, 8), w1, w2)
    np.testing.assert_array_equal(y.reshape(30, 8), flat)
    one = fk.feed_forward(x[1, 2, 3], w1, w2)
    assert one.shape == (8,)
    np.testing.assert_allclose(one, flat[28], rtol=1e-6, atol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw1, dw2, db1, db2, dw3, db3 = fk.feed_forward_backward(dy, x, w1, w2)
    assert dx.shape == x.shape and db1 is None and db2 is None and dw3 is None and db3 is None
    dx2, dw1b, *_ = fk.feed_forward_backward(dy.reshape(30, 8), x.reshape(30, 8), w1, w2)
    np.testing.assert_array_equal(dx.reshape(30, 8), dx2)
    np.testing.assert_array_equal(dw1, dw1b)


def test_row_strided_x_is_the_same_call():
    rng = np.random.default_rng(2)
    x, w1, w2, w3, b1, b2, b3 = make(rng, 9, 8, 16, np.float32, gated=True, bias=True)
    wide = np.zeros((9, 20), np.float32)
    wide[:, 3:11] = x
    view = wide[:, 3:11]
    assert not view.flags.c_contiguous
    kw = dict(w3=w3, b3=b3, activation="gelu_tanh", residual=True)
    np.testing.assert_array_equal(fk.feed_forward(view, w1, w2, b1, b2, **kw), fk.feed_forward(x, w1, w2, b1, b2, **kw))
    # Transposed weights (column-major) are read through their strides too, when Rust
    # takes them; otherwise a clear ValueError.
    try:
        got = fk.feed_forward(x, np.asfortranarray(w1), w2, b1, b2, **kw)
    except ValueError as e:
        assert "w1" in str(e)
    else:
        np.testing.assert_allclose(got, fk.feed_forward(x, w1, w2, b1, b2, **kw), rtol=1e-6, atol=1e-6)


def test_errors():
    rng = np.random.default_rng(3)
    x, w1, w2, w3, b1, b2, b3 = make(rng, 4, 8, 16, np.float32, gated=True, bias=True)
    with pytest.raises(ValueError, match="w1"):
        fk.feed_forward(x, w1[:, :4], w2)
    with pytest.raises(ValueError, match="w2"):
        fk.feed_forward(x, w1, w2[:, :8])
    with pytest.raises(ValueError, match="w3"):
        fk.feed_forward(x, w1, w2, w3=w3[:8])
    with pytest.raises(ValueError, match="b1"):
        fk.feed_forward(x, w1, w2, b1[:3])
    with pytest.raises(ValueError, match="b2"):
        fk.feed_forward(x, w1, w2, None, b1)
    with pytest.raises(ValueError, match="b3"):
        fk.feed_forward(x, w1, w2, b3=b3)
    with pytest.raises(TypeError, match="w1"):
        fk.feed_forward(x, w1.astype(np.float16), w2)
    with pytest.raises(ValueError, match="activation"):
        fk.feed_forward(x, w1, w2, activation="swish")
    with pytest.raises(TypeError, match="activation"):
        fk.feed_forward(x, w1, w2, activation=None)
    with pytest.raises(TypeError, match="residual"):
        fk.feed_forward(x, w1, w2, residual="yes")
    with pytest.raises(TypeError, match="w1"):
        fk.feed_forward(x, [[1.0]], w2)
    with pytest.raises(ValueError, match="grad_output"):
        fk.feed_forward_backward(x[:2], x, w1, w2)
    with pytest.raises(ValueError):
        fk.feed_forward(x[:0], w1, w2)
    with pytest.raises(ValueError, match="scalar"):
        fk.feed_forward(np.array(1.0, np.float32), w1, w2)
