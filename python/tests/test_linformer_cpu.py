"""Linformer attention (issue 15) on numpy arrays (the CPU reference) against an independent
float64 numpy definition: float32 tightly, float16 / bfloat16 within one rounding of each
output. The op reads the stored inputs exactly, rounds the projected keys and values kp,
vp once to the dtype, then O once (LSE is float32); its backward takes the stored O, LSE,
kp, vp, rounds dkp, dvp once, then each gradient once. The definition below does the
same roundings where the op stores something, so every output is one rounding away.

Also: the golden fixtures from lucidrains/linformer 0.2.3 (tests/fixtures/linformer,
written by scripts/make_linformer_fixtures.py), and the errors of bad calls.
"""

import math
import pathlib
import zlib

import ml_dtypes
import numpy as np
import pytest

import flashkernels as fk
from _rounding import assert_one_rounding

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
# How E and F are shared: (E heads, F heads or None for F = E), "kv" standing for H_kv.
SHARINGS = {
    "per_head": ("kv", "kv"),
    "headwise": (1, 1),
    "kv_per_head": ("kv", None),
    "kv_headwise": (1, None),
    "mixed": (1, "kv"),
}
FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "linformer"


def f64(a):
    return None if a is None else np.asarray(np.asarray(a).astype(np.float32), np.float64)


def rounded(x, dtype):
    """x rounded once to dtype, as float64 (float64 itself: unchanged)."""
    return x if dtype is None else f64(np.asarray(x).astype(dtype))


def _heads(e, hkv):
    """E (He, k, N) as one projection per K/V head (Hkv, k, N)."""
    return np.repeat(e, hkv, axis=0) if e.shape[0] == 1 else e


def define(q, k, v, e, f, mask, scale, dtype):
    """The forward in float64 from the stored inputs: dict(kp, vp (rounded to dtype when
    dtype is not None), out (exact, from the rounded kp, vp), lse, and what the backward
    definition needs."""
    q, k, v, e, f = map(f64, (q, k, v, e, f))
    b, n, h, d = q.shape
    hkv = k.shape[2]
    keep = np.ones((b, n)) if mask is None else (~np.asarray(mask)).astype(np.float64)
    kt, vt = k * keep[:, :, None, None], v * keep[:, :, None, None]
    ef = _heads(e[:, :, :n], hkv)
    ff = ef if f is None else _heads(f[:, :, :n], hkv)
    kp = rounded(np.einsum("hjn,bnhd->bjhd", ef, kt), dtype)
    vp = rounded(np.einsum("hjn,bnhd->bjhd", ff, vt), dtype)
    g = h // hkv
    ke, ve = np.repeat(kp, g, axis=2), np.repeat(vp, g, axis=2)
    scale = d**-0.5 if scale is None else scale
    s = np.einsum("bnhd,bjhd->bhnj", q, ke) * scale
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (np.log(p.sum(-1, keepdims=True)) + m)[..., 0]
    out = np.einsum("bhnj,bjhd->bnhd", p / p.sum(-1, keepdims=True), ve)
    return dict(kp=kp, vp=vp, out=out, lse=lse, kt=kt, vt=vt, ef=ef, ff=ff, scale=scale)


def define_grads(dout, q, k, v, e, f, mask, scale, dtype, out, lse, kp, vp):
    """(dq, dk, dv, de, df) in float64 from the stored forward outputs (out, lse, kp, vp,
    as the op returned them), dkp and dvp rounded once to dtype, as the op's backward."""
    x = define(q, k, v, e, f, mask, scale, None)
    q, dout, out, lse, kp, vp = map(f64, (q, dout, out, lse, kp, vp))
    b, n, h, d = q.shape
    hkv = kp.shape[2]
    g = h // hkv
    sc = x["scale"]
    ke, ve = np.repeat(kp, g, axis=2), np.repeat(vp, g, axis=2)
    p = np.exp(np.einsum("bnhd,bjhd->bhnj", q, ke) * sc - lse[..., None])
    dvp = np.einsum("bhnj,bnhd->bjhd", p, dout)
    dp = np.einsum("bnhd,bjhd->bhnj", dout, ve)
    delta = np.einsum("bnhd,bnhd->bhn", dout, out)[..., None]
    ds = p * (dp - delta)
    dq = np.einsum("bhnj,bjhd->bnhd", ds, ke) * sc
    dkp = np.einsum("bhnj,bnhd->bjhd", ds, q) * sc

    def group(t):  # (B, k, H, D) -> (B, k, Hkv, D), summed over each group
        return t.reshape(b, t.shape[1], hkv, g, d).sum(3)

    dkp, dvp = rounded(group(dkp), dtype), rounded(group(dvp), dtype)
    keep = np.ones((b, n)) if mask is None else (~np.asarray(mask)).astype(np.float64)
    dk = np.einsum("hjn,bjhd->bnhd", x["ef"], dkp) * keep[:, :, None, None]
    dv = np.einsum("hjn,bjhd->bnhd", x["ff"], dvp) * keep[:, :, None, None]

    def dproj(proj, dp_, t):  # the gradient of a (He, k, N_max) projection
        full = np.einsum("bjhd,bnhd->hjn", dp_, t)
        full = full.sum(0, keepdims=True) if proj.shape[0] == 1 else full
        res = np.zeros(proj.shape)
        res[:, :, :n] = full
        return res

    de = dproj(np.asarray(e), dkp, x["kt"])
    if f is None:
        de = de + dproj(np.asarray(e), dvp, x["vt"])
        df = None
    else:
        df = dproj(np.asarray(f), dvp, x["vt"])
    return dq, dk, dv, de, df


def make(rng, b, n, h, hkv, d, kproj, n_max, dtype, sharing, *, pad=None):
    """(q, k, v, e, f, mask): pad None, "some" (random padded keys) or "full" (the last
    sequence entirely padded, the others partly)."""

    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    eh, fh = (hkv if x == "kv" else x for x in SHARINGS[sharing])
    q, k, v = r(b, n, h, d), r(b, n, hkv, d), r(b, n, hkv, d)
    e = r(eh, kproj, n_max, scale=n**-0.5)
    f = None if fh is None else r(fh, kproj, n_max, scale=n**-0.5)
    mask = None
    if pad is not None:
        mask = rng.random((b, n)) < 0.3
        mask[0] = False
        if pad == "full":
            mask[-1] = True
    return q, k, v, e, f, mask


def check(got, want, dtype, what):
    """float32: 2e-6 relative to the largest element; halves: one rounding."""
    if dtype == np.float32:
        got = f64(got)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        tol = 2e-6 * max(np.abs(want).max(), 1e-30)
        err = np.abs(got - want).max()
        assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e}"
    else:
        assert_one_rounding(got, want, dtype, what=what)


def run_and_check(q, k, v, e, f, mask, dtype, what, scale=None):
    kw = dict(key_padding_mask=mask, softmax_scale=scale)
    out, lse, kp, vp = fk.linformer_attention(q, k, v, e, f, return_aux=True, **kw)
    dt = np.dtype(dtype)
    assert out.dtype == dt and kp.dtype == dt and vp.dtype == dt and lse.dtype == np.float32
    x = define(q, k, v, e, f, mask, scale, dtype)
    check(kp, x["kp"], dtype, f"{what} kp")
    check(vp, x["vp"], dtype, f"{what} vp")
    check(out, x["out"], dtype, f"{what} out")
    np.testing.assert_allclose(lse, x["lse"], rtol=1e-6, atol=1e-6, err_msg=f"{what} lse")
    dout = np.random.default_rng(zlib.crc32(what.encode())).standard_normal(out.shape).astype(dtype)
    got = fk.linformer_attention_backward(dout, q, k, v, e, out, lse, kp, vp, f, **kw)
    want = define_grads(dout, q, k, v, e, f, mask, scale, dtype, out, lse, kp, vp)
    for name, g, w, like in zip(("dq", "dk", "dv", "de", "df"), got, want, (q, k, v, e, f)):
        if w is None:
            assert g is None, f"{what}: {name} given without f"
            continue
        assert g.dtype == dt and g.shape == like.shape, (what, name, g.dtype, g.shape)
        check(g, w, dtype, f"{what} {name}")
    return out, lse, kp, vp, got


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sharing", list(SHARINGS))
def test_matches_definition_gqa_padding(dtype, sharing):
    """GQA (4 query heads on 2 K/V heads), odd N < N_max, padding with one sequence fully
    padded, every sharing level, every dtype."""
    rng = np.random.default_rng(zlib.crc32(f"{sharing} {np.dtype(dtype).name}".encode()))
    b, n, h, hkv, d, kproj, n_max = 3, 7, 4, 2, 8, 5, 9
    q, k, v, e, f, mask = make(rng, b, n, h, hkv, d, kproj, n_max, dtype, sharing, pad="full")
    out, lse, kp, vp, (dq, dk, dv, de, df) = run_and_check(q, k, v, e, f, mask, dtype, f"{sharing}")
    # The fully padded sequence: kp = vp = 0, uniform softmax over k zero keys.
    assert not f64(kp[-1]).any() and not f64(vp[-1]).any()
    assert not f64(out[-1]).any()
    np.testing.assert_allclose(lse[-1], math.log(kproj), rtol=1e-6)
    for g in (dq, dk, dv):
        assert not f64(g[-1]).any()
    # Padded keys get no gradient; columns past N get none either.
    assert not f64(dk)[mask].any() and not f64(dv)[mask].any()
    for g in (de, df):
        if g is not None:
            assert not f64(g)[:, :, n:].any()


@pytest.mark.parametrize(
    "b,n,h,hkv,d,kproj,n_max",
    [
        (1, 1, 1, 1, 4, 1, 1),  # one token, k = 1
        (2, 5, 2, 2, 8, 12, 5),  # k > N
        (1, 33, 3, 1, 16, 8, 40),  # odd N < N_max, MQA
        (2, 17, 6, 3, 3, 7, 17),  # odd head dim, GQA 2
    ],
)
def test_sizes(b, n, h, hkv, d, kproj, n_max):
    rng = np.random.default_rng(n * 100 + kproj)
    q, k, v, e, f, mask = make(rng, b, n, h, hkv, d, kproj, n_max, np.float32, "per_head")
    run_and_check(q, k, v, e, f, None, np.float32, f"sizes {(b, n, h, hkv, d, kproj, n_max)}")


def test_scale_and_no_mask_equals_all_false_mask():
    rng = np.random.default_rng(5)
    q, k, v, e, f, _ = make(rng, 2, 6, 2, 1, 8, 4, 8, np.float32, "headwise")
    run_and_check(q, k, v, e, f, None, np.float32, "scale 0.3", scale=0.3)
    a = fk.linformer_attention(q, k, v, e, f)
    b = fk.linformer_attention(q, k, v, e, f, key_padding_mask=np.zeros((2, 6), bool))
    np.testing.assert_array_equal(a, b)


def test_strided_inputs_are_the_same_call():
    """lucidrains' E = proj_k.T[None] (a strided view of (N_max, k)), and q, k, v in
    (B, H, N, D) memory, give exactly what contiguous copies give."""
    rng = np.random.default_rng(7)
    q, k, v, e, f, mask = make(rng, 2, 9, 2, 2, 8, 4, 11, np.float32, "headwise", pad="some")
    proj_k = np.ascontiguousarray(e[0].T)  # (N_max, k), as lucidrains stores it
    proj_v = np.ascontiguousarray(f[0].T)
    e_view, f_view = proj_k.T[None], proj_v.T[None]
    assert not e_view.flags.c_contiguous
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    a = fk.linformer_attention(q, k, v, e, f, key_padding_mask=mask, return_aux=True)
    b = fk.linformer_attention(qt, k, v, e_view, f_view, key_padding_mask=mask, return_aux=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    ga = fk.linformer_attention_backward(np.ones_like(a[0]), q, k, v, e, *a, f, key_padding_mask=mask)
    gb = fk.linformer_attention_backward(np.ones_like(a[0]), qt, k, v, e_view, *b, f_view, key_padding_mask=mask)
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x, y)


def test_shared_kv_is_f_equals_e():
    """f None is F = E: the same output as passing E twice, and dE is the sum of the two
    projections' gradients."""
    rng = np.random.default_rng(11)
    q, k, v, e, _, mask = make(rng, 2, 8, 2, 2, 8, 4, 8, np.float32, "kv_per_head", pad="some")
    a = fk.linformer_attention(q, k, v, e, None, key_padding_mask=mask, return_aux=True)
    b = fk.linformer_attention(q, k, v, e, e.copy(), key_padding_mask=mask, return_aux=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    dout = rng.standard_normal(a[0].shape).astype(np.float32)
    _, _, _, de, df = fk.linformer_attention_backward(dout, q, k, v, e, *a, None, key_padding_mask=mask)
    _, _, _, de2, df2 = fk.linformer_attention_backward(dout, q, k, v, e, *b, e.copy(), key_padding_mask=mask)
    assert df is None
    np.testing.assert_allclose(de, de2 + df2, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Golden fixtures from lucidrains/linformer 0.2.3.


def parse(path):
    """(config dict, {name: array}) from one fixture file: ``config k=v ...``, then
    ``tensor <name> <f32|f64> <shape>`` lines each followed by one line of values."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith("config "), path
    cfg = {}
    for item in lines[0].split()[1:]:
        key, val = item.split("=")
        cfg[key] = float(val) if key == "scale" else int(val)
    tensors = {}
    rest = lines[1:]
    assert len(rest) % 2 == 0, path
    for head, body in zip(rest[0::2], rest[1::2]):
        tag, name, dtype, shape = head.split()
        assert tag == "tensor" and name not in tensors and dtype in ("f32", "f64"), head
        shape = tuple(int(s) for s in shape.split(","))
        vals = body.split()
        assert len(vals) == math.prod(shape), (name, len(vals), shape)
        # f32 values are written as their shortest repr: parsed as float32, they are exact.
        tensors[name] = np.array(vals, dtype=np.float32 if dtype == "f32" else np.float64).reshape(shape)
    return cfg, tensors


FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.txt"))


def test_fixtures_present():
    assert len(FIXTURE_NAMES) >= 6, f"expected the 6 committed fixtures in {FIXTURES}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_lucidrains_fixture(name):
    cfg, t = parse(FIXTURES / name)
    b, n, n_max, h, hkv, d, kproj = (cfg[x] for x in ("batch", "seqlen", "n_max", "heads", "heads_kv", "head_dim", "k"))
    assert cfg["scale"] == d**-0.5
    shared = cfg["share_kv"] == 1
    q, k, e, want = t["q"], t["k"], t["e"], t["out"]
    v = k if shared else t["v"]
    f = None if shared else t["f"]
    assert shared == ("f" not in t) == ("v" not in t)
    assert q.shape == (b, n, h, d) and k.shape == (b, n, hkv, d) and e.shape == (1, kproj, n_max)
    # The definition (unrounded) is lucidrains' formula...
    exact = define(q, k, v, e, f, None, None, None)["out"]
    assert np.abs(exact - want).max() <= 1e-12, name
    # ...and the op matches it within f32 roundings of kp, vp and O.
    out = fk.linformer_attention(q, k, v, e, f)
    check(out, define(q, k, v, e, f, None, None, np.float32)["out"], np.float32, name)
    np.testing.assert_allclose(f64(out), want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=name)
    # lucidrains' layout: E = proj_k.T, a strided view of (n_max, k).
    proj_k = np.ascontiguousarray(e[0].T)
    proj_v = None if f is None else np.ascontiguousarray(f[0].T)
    out2 = fk.linformer_attention(q, k, v, proj_k.T[None], None if proj_v is None else proj_v.T[None])
    np.testing.assert_array_equal(out, out2)


# ---------------------------------------------------------------------------------------
# Bad calls: a ValueError / TypeError naming the reason, before anything runs.


def _base(dtype=np.float32):
    rng = np.random.default_rng(0)
    return make(rng, 2, 6, 2, 2, 8, 4, 8, dtype, "per_head")


def test_mismatched_projections():
    q, k, v, e, f, _ = _base()
    with pytest.raises(ValueError, match="E and F must agree on k and n_max"):
        fk.linformer_attention(q, k, v, e, f[:, :3])
    with pytest.raises(ValueError, match="E and F must agree on k and n_max"):
        fk.linformer_attention(q, k, v, e, np.zeros((2, 4, 9), np.float32))
    with pytest.raises(ValueError, match="one per key/value head"):
        fk.linformer_attention(q, k, v, np.zeros((3, 4, 8), np.float32), f)
    with pytest.raises(ValueError, match="one per key/value head"):
        fk.linformer_attention(q, k, v, e, np.zeros((3, 4, 8), np.float32))
    with pytest.raises(ValueError, match="rank"):
        fk.linformer_attention(q, k, v, e[0], f)


def test_k_zero_and_n_over_n_max():
    q, k, v, e, f, _ = _base()
    with pytest.raises(ValueError, match="k = 0"):
        fk.linformer_attention(q, k, v, e[:, :0], f[:, :0])
    with pytest.raises(ValueError, match="k = 0"):
        fk.linformer_attention(q, k, v, e[:, :0])
    with pytest.raises(ValueError, match=r"N = 6 exceeds the projections' n_max = 5"):
        fk.linformer_attention(q, k, v, e[:, :, :5], f[:, :, :5])


def test_bad_shapes_and_dtypes():
    q, k, v, e, f, _ = _base()
    with pytest.raises(ValueError, match="not a multiple"):
        fk.linformer_attention(q[:, :, :1], k, v, e, f)
    with pytest.raises(ValueError, match="k's shape"):
        fk.linformer_attention(q, k, v[:, :5], e, f)
    with pytest.raises(TypeError, match="e is float16 but q is float32"):
        fk.linformer_attention(q, k, v, e.astype(np.float16), f)
    with pytest.raises(TypeError, match="float64"):
        fk.linformer_attention(*(x.astype(np.float64) for x in (q, k, v, e, f)))
    with pytest.raises(TypeError, match="f must be an array"):
        fk.linformer_attention(q, k, v, e, [1.0])
    with pytest.raises(TypeError, match="one framework"):
        import torch

        fk.linformer_attention(q, k, v, torch.from_numpy(e), f)


def test_bad_masks():
    q, k, v, e, f, _ = _base()
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \[2, 5\], expected"):
        fk.linformer_attention(q, k, v, e, f, key_padding_mask=np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        fk.linformer_attention(q, k, v, e, f, key_padding_mask=np.zeros((2, 6, 1), bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a boolean array"):
        fk.linformer_attention(q, k, v, e, f, key_padding_mask=np.zeros((2, 6), np.int64))
    with pytest.raises(TypeError, match="key_padding_mask must be a boolean array"):
        fk.linformer_attention(q, k, v, e, f, key_padding_mask=np.zeros((2, 6), np.float32))


def test_bad_options():
    q, k, v, e, f, _ = _base()
    with pytest.raises(TypeError, match="return_aux must be a bool"):
        fk.linformer_attention(q, k, v, e, f, return_aux=1)
    with pytest.raises(TypeError, match="softmax_scale must be a float"):
        fk.linformer_attention(q, k, v, e, f, softmax_scale=True)
    with pytest.raises(ValueError, match="softmax_scale must be finite and positive"):
        fk.linformer_attention(q, k, v, e, f, softmax_scale=0.0)


def test_bad_backward_calls():
    q, k, v, e, f, _ = _base()
    out, lse, kp, vp = fk.linformer_attention(q, k, v, e, f, return_aux=True)
    dout = np.ones_like(out)
    with pytest.raises(ValueError, match="kp has shape"):
        fk.linformer_attention_backward(dout, q, k, v, e, out, lse, kp[:, :3], vp, f)
    with pytest.raises(TypeError, match="lse"):
        fk.linformer_attention_backward(dout, q, k, v, e, out, lse.astype(np.float16), kp, vp, f)
    with pytest.raises(ValueError, match="dout has shape|grad_output"):
        fk.linformer_attention_backward(dout[:, :5], q, k, v, e, out, lse, kp, vp, f)
    # The native entry: df exactly when f.
    from flashkernels import _native

    cap = [x.__dlpack__() for x in (q, k, v, e, out, lse, kp, vp, dout)]
    grads = [np.empty_like(x).__dlpack__() for x in (q, k, v, e)]
    with pytest.raises(ValueError, match="df: give it exactly when f is given"):
        _native.linformer_backward(*cap, *grads, None, np.empty_like(e).__dlpack__())
