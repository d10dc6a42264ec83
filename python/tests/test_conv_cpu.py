"""The CPU path of conv2d / max_pool2d / avg_pool2d (numpy arrays) against torch's
results stored in tests/fixtures/conv/ (written by scripts/make_conv_fixtures.py; numpy
only here), and against jax.lax.conv_general_dilated / jax.vjp, independent oracles."""

import json
import pathlib

import numpy as np
import pytest

import flashkernels as fk

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "conv"


def _load(name):
    with np.load(FIXTURES / name) as f:
        data = {k: f[k] for k in f.files}
    return json.loads(str(data.pop("config"))), data


def _names(prefix):
    names = sorted(p.name for p in FIXTURES.glob(f"{prefix}_*.npz"))
    assert names, f"no {prefix} fixtures in {FIXTURES}"
    return names


def _close(got, want, tol=2e-5):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", _names("conv"))
def test_conv_matches_torch_fixture(name):
    cfg, a = _load(name)
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    bias = a.get("bias")
    y = fk.conv2d(a["x"], a["weight"], bias, activation=cfg["activation"], **kw)
    assert y.dtype == np.float32
    _close(y, a["y"])
    # Without the activation: the pre-activation.
    _close(fk.conv2d(a["x"], a["weight"], bias, **kw), a["y_pre"])
    dx, dw, db = fk.conv2d_backward(a["dy"], a["x"], a["weight"], bias=bias, activation=cfg["activation"], **kw)
    _close(dx, a["dx"], 1e-4)
    _close(dw, a["dweight"], 1e-4)
    if bias is not None:
        _close(db, a["dbias"], 1e-4)
    # The pre-activation gradient given directly.
    dx2, _, db2 = fk.conv2d_backward(a["dy_pre"], a["x"], a["weight"], **kw)
    _close(dx2, a["dx"], 1e-4)


@pytest.mark.parametrize("name", _names("conv"))
def test_conv_channels_last_is_the_same_call(name):
    cfg, a = _load(name)
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    nhwc = np.ascontiguousarray(a["x"].transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not nhwc.flags.c_contiguous
    y = fk.conv2d(nhwc, a["weight"], a.get("bias"), activation=cfg["activation"], **kw)
    np.testing.assert_array_equal(y, fk.conv2d(a["x"], a["weight"], a.get("bias"), activation=cfg["activation"], **kw))


@pytest.mark.parametrize("name", _names("maxpool"))
def test_max_pool_matches_torch_fixture(name):
    cfg, a = _load(name)
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], ceil_mode=cfg["ceil_mode"])
    y, idx = fk.max_pool2d(a["x"], cfg["kernel_size"], return_indices=True, **kw)
    np.testing.assert_array_equal(y, a["y"])
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, a["indices"])
    np.testing.assert_array_equal(fk.max_pool2d(a["x"], cfg["kernel_size"], **kw), a["y"])
    dx = fk.max_pool2d_backward(a["dy"], a["x"], idx, cfg["kernel_size"], **kw)
    _close(dx, a["dx"], 1e-6)


@pytest.mark.parametrize("name", _names("avgpool"))
def test_avg_pool_matches_torch_fixture(name):
    cfg, a = _load(name)
    kw = dict(
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg["ceil_mode"],
        count_include_pad=cfg["count_include_pad"],
        divisor_override=cfg["divisor_override"],
    )
    _close(fk.avg_pool2d(a["x"], cfg["kernel_size"], **kw), a["y"], 1e-6)
    _close(fk.avg_pool2d_backward(a["dy"], a["x"], cfg["kernel_size"], **kw), a["dx"], 1e-6)


# ---------------------------------------------------------------------------------------
# jax as an independent oracle.


@pytest.mark.parametrize(
    "n,c,h,w,k,r,s,stride,padding,dilation,groups",
    [
        (2, 4, 9, 8, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1),
        (1, 6, 11, 10, 6, 3, 3, (2, 1), (0, 2), (2, 1), 3),
        (2, 8, 7, 7, 8, 3, 3, (1, 1), (1, 1), (1, 1), 8),
        (1, 3, 16, 15, 4, 7, 7, (2, 2), (3, 3), (1, 1), 1),
        (2, 5, 6, 6, 7, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    ],
)
def test_conv_matches_jax(n, c, h, w, k, r, s, stride, padding, dilation, groups):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(n * 100 + c)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((k, c // groups, r, s)).astype(np.float32)
    dy_shape = fk.conv2d(x, wt, None, stride, padding, dilation, groups).shape
    dy = rng.standard_normal(dy_shape).astype(np.float32)

    def f(x, wt):
        return jax.lax.conv_general_dilated(
            x,
            wt,
            window_strides=stride,
            padding=[(p, p) for p in padding],
            rhs_dilation=dilation,
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            feature_group_count=groups,
            precision=jax.lax.Precision.HIGHEST,
        )

    with jax.default_device(jax.devices("cpu")[0]):
        want, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(wt))
        wdx, wdw = vjp(jnp.asarray(dy))
    _close(fk.conv2d(x, wt, None, stride, padding, dilation, groups), np.asarray(want), 1e-5)
    dx, dw, _ = fk.conv2d_backward(dy, x, wt, stride, padding, dilation, groups)
    _close(dx, np.asarray(wdx), 1e-4)
    _close(dw, np.asarray(wdw), 1e-4)


def test_padding_same_and_valid():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 7, 6)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 5)).astype(np.float32)
    same = fk.conv2d(x, w, padding="same")
    assert same.shape == (1, 3, 7, 6)
    np.testing.assert_array_equal(same, fk.conv2d(x, w, padding=(1, 2)))
    assert fk.conv2d(x, w, padding="valid").shape == (1, 3, 5, 2)


def test_half_precision_dtypes_round_trip():
    x = np.linspace(-2, 2, 2 * 4 * 5 * 5, dtype=np.float32).reshape(2, 4, 5, 5)
    w = np.linspace(-1, 1, 6 * 4 * 3 * 3, dtype=np.float32).reshape(6, 4, 3, 3)
    y32 = fk.conv2d(x, w, activation="gelu")
    y16 = fk.conv2d(x.astype(np.float16), w.astype(np.float16), activation="gelu")
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=1e-2, atol=1e-2 * np.abs(y32).max())


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, w: fk.conv2d(x[0], w), ValueError, "rank-4"),
        (lambda x, w: fk.conv2d(x, w, groups=3), ValueError, "groups = 3"),
        (lambda x, w: fk.conv2d(x, w, stride=0), ValueError, "stride"),
        (lambda x, w: fk.conv2d(x, w, stride=-1), ValueError, "non-negative"),
        (lambda x, w: fk.conv2d(x, w, stride="2"), TypeError, "pair of ints"),
        (lambda x, w: fk.conv2d(x, w.astype(np.float16)), TypeError, "float16"),
        (lambda x, w: fk.conv2d(x, w, np.zeros(5, np.float32)), ValueError, "bias"),
        (lambda x, w: fk.conv2d(x, w, activation="tanh"), ValueError, "activation"),
        (lambda x, w: fk.conv2d(x, w, algo="fft"), ValueError, "algo"),
        (lambda x, w: fk.conv2d(x, w, padding="same", stride=2), ValueError, "same"),
        (lambda x, w: fk.conv2d(x[:, :, :2], w), ValueError, "larger than the padded"),
        (lambda x, w: fk.conv2d(x.astype(np.int32), w), TypeError, "int32"),
        (lambda x, w: fk.max_pool2d(x, 3, padding=2), ValueError, "half the kernel"),
        (lambda x, w: fk.avg_pool2d(x, 2, divisor_override=0), ValueError, "divisor_override"),
        (lambda x, w: fk.max_pool2d(x, 0), ValueError, "kernel_size"),
    ],
)
def test_errors(call, exc, match):
    x = np.zeros((2, 4, 6, 6), np.float32)
    w = np.zeros((6, 4, 3, 3), np.float32)
    with pytest.raises(exc, match=match):
        call(x, w)


def test_max_pool_backward_refuses_indices_of_the_wrong_size():
    """Indices cross into Rust with their shape: a short (or long) array is a ValueError,
    never a read past its end (it was a segfault when indices went as a raw address)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y, idx = fk.max_pool2d(x, 2, return_indices=True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    want = fk.max_pool2d_backward(dy, x, idx, 2)
    assert want.shape == x.shape and np.count_nonzero(want) == dy.size
    for bad in (idx[:, :, :3], idx[:1], idx.reshape(-1)[:5], np.zeros((0,), np.int64)):
        with pytest.raises(ValueError, match=r"indices must be int32 \[2, 3, 4, 4\]"):
            fk.max_pool2d_backward(dy, x, bad, 2)
