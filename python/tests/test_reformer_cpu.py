"""Reformer LSH attention (issue 16) on numpy arrays (the CPU reference) against an
independent float64 numpy definition written from Hugging Face's ``LSHSelfAttention``
(transformers 5.x): hashing by the first argmax of [xR; -xR] (padded tokens in the extra
bucket, rounds offset by r · (n_buckets + padded)), one stable sort of all rounds by
(bucket, position), chunks attending to their neighbours circularly over all rounds, keys
qk / rms(qk) / sqrt(D), masked scores replaced (causal and padded keys, then the
query's own token), per-round logsumexp, rounds combined by softmax of their logsumexps,
unsorted. float32 tightly, float16 / bfloat16 within one rounding (the op reads the
stored inputs exactly, computes in float64, rounds O once, LSE to float32; its backward
takes the stored O, LSE, dO and rounds each gradient once).

Also: given buckets reproduce O; the Hugging Face golden fixtures (tests/fixtures/reformer,
written by scripts/make_reformer_fixtures.py); the errors of bad calls.
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
FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "reformer"

# (b, n, h, d), (n_hashes, n_buckets, C), (before, after), causal, padded
CASES = {
    "one_round": ((2, 16, 2, 8), (1, 4, 4), (1, 0), False, False),
    "rounds_causal": ((1, 24, 3, 8), (3, 6, 4), (1, 0), True, False),
    "padded": ((2, 32, 2, 8), (3, 8, 8), (1, 0), False, True),
    "after_causal_padded": ((2, 24, 1, 16), (2, 4, 6), (1, 1), True, True),
    "n_equals_c": ((1, 12, 2, 8), (2, 4, 12), (1, 0), False, False),
    "n_below_c": ((2, 7, 2, 4), (3, 4, 16), (1, 0), True, True),
    "wraps_onto_itself": ((1, 16, 2, 8), (4, 2, 4), (2, 1), False, False),
    "no_lookback": ((3, 20, 2, 12), (2, 10, 5), (0, 0), False, True),
}


def f64(a):
    """The stored values, exactly, as float64 (float64 itself unchanged)."""
    return None if a is None else np.asarray(a).astype(np.float64)


def make(rng, case, dtype):
    (b, n, h, d), (nh, nb, c), (before, after), causal, padded = CASES[case]
    qk = (rng.standard_normal((b, n, h, d)) * 2).astype(dtype)
    v = rng.standard_normal((b, n, h, d)).astype(dtype)
    rot = rng.standard_normal((h, d, nh, nb // 2)).astype(np.float32)
    mask = None
    if padded:
        mask = np.zeros((b, n), bool)
        mask[::2, -3:] = True  # the last tokens of every other sequence
        mask[0, n // 2] = True
    kw = dict(chunk_length=c, chunks_before=before, chunks_after=after, causal=causal)
    return qk, v, rot, mask, kw


# ---------------------------------------------------------------------------------------
# The definition.


def define_buckets(qk, rot, mask):
    """(B, H, n_hashes, N) int64, offset per round, as HF's ``_hash_vectors``."""
    qk, rot = f64(qk), np.asarray(rot, np.float64)
    b, n, h, _ = qk.shape
    nh, half = rot.shape[2], rot.shape[3]
    nb = 2 * half
    pad = np.zeros((b, n), bool) if mask is None else np.asarray(mask)
    extra = int(pad.any())
    out = np.zeros((b, h, nh, n), np.int64)
    for bi in range(b):
        for hi in range(h):
            proj = np.einsum("nd,dra->rna", qk[bi, :, hi], rot[hi])
            arg = np.argmax(np.concatenate([proj, -proj], -1), -1)  # first argmax
            if extra:
                arg[:, pad[bi]] = nb
            out[bi, hi] = arg + np.arange(nh)[:, None] * (nb + extra)
    return out


def _logsumexp(s, axis):
    m = s.max(axis, keepdims=True)
    return (np.log(np.exp(s - m).sum(axis, keepdims=True)) + m).squeeze(axis)


def _windows(bk, n, c, before, after):
    """[(query positions, key positions)] over the sorted concatenation of the rounds
    (positions p = r · N + i); the unhashed call (bk None) is one window of all tokens."""
    if bk is None:
        return [(np.arange(n), np.arange(n))]
    order = np.argsort(bk.reshape(-1), kind="stable")  # by (bucket, position)
    nc = len(order) // c
    chunks = order.reshape(nc, c)
    return [
        (chunks[ci], np.concatenate([chunks[(ci + o) % nc] for o in range(-before, after + 1)])) for ci in range(nc)
    ]


def _scores(x, kk, qp, kp, n, pad_b, causal, f16):
    """(scores, replaced) of one window: q_i · k_j with masked entries replaced."""
    maskv, selfv = (-1e4, -1e3) if f16 else (-1e9, -1e5)
    qt, kt = qp % n, kp % n
    s = x[qt] @ kk[kt].T
    masked = np.broadcast_to(pad_b[kt][None, :], s.shape).copy()
    if causal:
        masked |= kt[None, :] > qt[:, None]
    s[masked] = maskv
    own = qt[:, None] == kt[None, :]
    s[own] = selfv
    return s, masked | own


def _keys(x):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) / math.sqrt(x.shape[-1])


def define(qk, v, rot, mask, buckets, *, chunk_length, chunks_before=1, chunks_after=0, causal=False):
    """(out, lse (B, H, rounds, N), buckets or None) in float64 from the stored inputs;
    ``buckets`` None: hashed (when N > C)."""
    f16 = np.asarray(qk).dtype == np.float16
    qk, v = f64(qk), f64(v)
    b, n, h, d = qk.shape
    nh = np.asarray(rot).shape[2]
    hashed = n > chunk_length
    if hashed and buckets is None:
        buckets = define_buckets(qk, rot, mask)
    rounds = nh if hashed else 1
    pad = np.zeros((b, n), bool) if mask is None else np.asarray(mask)
    out, lse = np.zeros((b, n, h, d)), np.zeros((b, h, rounds, n))
    for bi in range(b):
        for hi in range(h):
            x = qk[bi, :, hi]
            kk, vv = _keys(x), v[bi, :, hi]
            o_r = np.zeros((rounds, n, d))
            bk = buckets[bi, hi] if hashed else None
            for qp, kp in _windows(bk, n, chunk_length, chunks_before, chunks_after):
                s, _ = _scores(x, kk, qp, kp, n, pad[bi], causal, f16)
                ls = _logsumexp(s, -1)
                o_r[qp // n, qp % n] = np.exp(s - ls[:, None]) @ vv[kp % n]
                lse[bi, hi, qp // n, qp % n] = ls
            w = np.exp(lse[bi, hi] - _logsumexp(lse[bi, hi], 0)[None])
            out[bi, :, hi] = (w[..., None] * o_r).sum(0)
    return out, lse, (np.asarray(buckets, np.int64) if hashed else None)


def define_grads(
    dout, qk, v, rot, mask, buckets, out, lse, *, chunk_length, chunks_before=1, chunks_after=0, causal=False
):
    """(dqk, dv) in float64 from the stored O, LSE, dO, the buckets fixed: one softmax
    over all rounds' window entries, P = exp(s - logsumexp_r lse_r), Delta = rowsum(dO ∘ O),
    replaced scores constant; dqk gets the query's and the keys' (through their
    normalisation) gradients."""
    f16 = np.asarray(qk).dtype == np.float16
    qk, v, dout, out, lse = (f64(t) for t in (qk, v, dout, out, lse))
    b, n, h, d = qk.shape
    hashed = n > chunk_length
    pad = np.zeros((b, n), bool) if mask is None else np.asarray(mask)
    dqk, dv = np.zeros_like(qk), np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            x, vv, do = qk[bi, :, hi], v[bi, :, hi], dout[bi, :, hi]
            kk = _keys(x)
            total = _logsumexp(lse[bi, hi], 0)  # (N,)
            delta = (do * out[bi, :, hi]).sum(-1)
            dx, dk, dvv = np.zeros_like(x), np.zeros_like(x), np.zeros_like(vv)
            bk = buckets[bi, hi] if hashed else None
            for qp, kp in _windows(bk, n, chunk_length, chunks_before, chunks_after):
                qt, kt = qp % n, kp % n
                s, const = _scores(x, kk, qp, kp, n, pad[bi], causal, f16)
                p = np.exp(s - total[qt][:, None])
                np.add.at(dvv, kt, p.T @ do[qt])
                ds = p * (do[qt] @ vv[kt].T - delta[qt][:, None])
                ds[const] = 0.0
                np.add.at(dx, qt, ds @ kk[kt])
                np.add.at(dk, kt, ds.T @ x[qt])
            # k = x · r / sqrt(D), r = (mean(x²) + 1e-6)^-½.
            r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
            dx += (r / math.sqrt(d)) * (dk - x * (x * dk).sum(-1, keepdims=True) * r * r / d)
            dqk[bi, :, hi], dv[bi, :, hi] = dx, dvv
    return dqk, dv


def check(got, want, dtype, what):
    """float32: 2e-6 relative to the largest element; halves: one rounding."""
    if np.dtype(dtype) == np.float32:
        got = f64(got)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        tol = 2e-6 * max(np.abs(want).max(), 1e-30)
        err = np.abs(got - want).max()
        assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e}"
    else:
        assert_one_rounding(got, want, dtype, what=what)


# ---------------------------------------------------------------------------------------
# The op vs the definition.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_definition(case, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{case} {np.dtype(dtype).name}".encode()))
    qk, v, rot, mask, kw = make(rng, case, dtype)
    out, lse, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_aux=True, **kw)
    dt = np.dtype(dtype)
    assert out.dtype == dt and lse.dtype == np.float32 and out.shape == qk.shape
    hashed = qk.shape[1] > kw["chunk_length"]
    if hashed:
        assert bk.dtype == np.int64 and bk.shape == (qk.shape[0], qk.shape[2], rot.shape[2], qk.shape[1])
        np.testing.assert_array_equal(bk, define_buckets(qk, rot, mask), err_msg=f"{case}: buckets")
    else:
        assert bk is None
    want_out, want_lse, _ = define(qk, v, rot, mask, bk, **kw)
    check(out, want_out, dtype, f"{case} out")
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-5, err_msg=f"{case} lse")
    # The backward, buckets given (as training holds them) and hashed again: the same.
    dout = np.random.default_rng(zlib.crc32(case.encode())).standard_normal(out.shape).astype(dtype)
    got = fk.lsh_attention_backward(dout, qk, v, rot, out, lse, key_padding_mask=mask, buckets=bk, **kw)
    want = define_grads(dout, qk, v, rot, mask, bk, out, lse, **kw)
    for name, g, w in zip(("dqk", "dv"), got, want):
        assert g.dtype == dt and g.shape == qk.shape, (case, name, g.dtype, g.shape)
        check(g, w, dtype, f"{case} {name}")
    again = fk.lsh_attention_backward(dout, qk, v, rot, out, lse, key_padding_mask=mask, **kw)
    for g, a in zip(got, again):
        np.testing.assert_array_equal(g, a)


def test_definition_backward_is_the_gradient():
    """The definition's backward against central differences of its forward (f64)."""
    rng = np.random.default_rng(5)
    qk, v, rot, mask, kw = make(rng, "after_causal_padded", np.float32)
    qk, v = qk[:1, :, :, :4].astype(np.float64), v[:1, :, :, :4].astype(np.float64)
    rot = rot[:, :4]
    mask = mask[:1]
    bk = define_buckets(qk, rot, mask)
    out, lse, _ = define(qk, v, rot, mask, bk, **kw)
    dout = rng.standard_normal(out.shape)

    def loss(q_, v_):
        return (define(q_, v_, rot, mask, bk, **kw)[0] * dout).sum()

    dqk, dv = define_grads(dout, qk, v, rot, mask, bk, out, lse, **kw)
    eps = 1e-3
    for t, g in ((qk, dqk), (v, dv)):
        for idx in [tuple(rng.integers(0, s) for s in t.shape) for _ in range(12)]:
            tp, tm = t.copy(), t.copy()
            tp[idx] += eps
            tm[idx] -= eps
            args_p = (tp, v) if t is qk else (qk, tp)
            args_m = (tm, v) if t is qk else (qk, tm)
            fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
            assert abs(fd - g[idx]) <= 1e-4 * (1 + abs(fd)), (idx, fd, g[idx])


def test_given_buckets_reproduce_the_output():
    rng = np.random.default_rng(11)
    qk, v, rot, mask, kw = make(rng, "padded", np.float32)
    out, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)
    for given in (bk, bk.astype(np.int32), bk.astype(np.uint16)):
        out2, bk2 = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=given, return_buckets=True, **kw)
        np.testing.assert_array_equal(out, out2)
        np.testing.assert_array_equal(bk, bk2)
    # Other buckets (valid ones, shuffled within their rounds) give another output, as
    # the definition with those buckets says.
    other = bk.copy()
    rng.shuffle(other.reshape(-1, other.shape[-1]).T)
    out3 = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=other, **kw)
    check(out3, define(qk, v, rot, mask, other, **kw)[0], np.float32, "shuffled buckets")


def test_native_buckets_out():
    """The native forward's ``buckets_out`` (the CUDA path's way to keep the buckets on
    the device) receives the buckets the call returns otherwise, and is checked."""
    from flashkernels import _native

    rng = np.random.default_rng(12)
    qk, v, rot, mask, kw = make(rng, "padded", np.float32)
    want = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)[1]
    hm = (np.ascontiguousarray(mask, np.uint8).tobytes(), mask.shape)

    def call(bout, buckets=None):
        out = np.empty(qk.shape, np.float32)
        lse = np.empty((qk.shape[0], qk.shape[2], rot.shape[2], qk.shape[1]), np.float32)
        caps = [t.__dlpack__() for t in (qk, v, rot, out, lse, bout)]
        return _native.reformer_forward(*caps[:5], hm, buckets, caps[5], **kw)

    bout = np.full(want.shape, -7, np.int32)
    assert call(bout) is None
    np.testing.assert_array_equal(bout, want)
    with pytest.raises(ValueError, match="buckets_out must be int32"):
        call(np.empty((1,) + want.shape[1:], np.int32))
    with pytest.raises(ValueError, match="contiguous"):
        call(np.empty(want.shape[::-1], np.int32).T)
    with pytest.raises(TypeError, match="int32"):
        call(np.empty(want.shape, np.int64))
    given = (want.astype(np.int32).tobytes(), want.shape)
    with pytest.raises(ValueError, match="only a call that hashes"):
        call(np.empty(want.shape, np.int32), given)


def test_strided_inputs_are_the_same_call():
    rng = np.random.default_rng(3)
    qk, v, rot, mask, kw = make(rng, "rounds_causal", np.float32)
    out = fk.lsh_attention(qk, v, rot, **kw)
    qk_t = np.ascontiguousarray(qk.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # (B, H, N, D) memory
    rot_t = np.asfortranarray(rot)
    np.testing.assert_array_equal(out, fk.lsh_attention(qk_t, v, rot_t, **kw))


def test_no_mask_equals_all_false_mask():
    rng = np.random.default_rng(4)
    qk, v, rot, _, kw = make(rng, "one_round", np.float32)
    a, ba = fk.lsh_attention(qk, v, rot, return_buckets=True, **kw)
    b, bb = fk.lsh_attention(qk, v, rot, key_padding_mask=np.zeros(qk.shape[:2], bool), return_buckets=True, **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ba, bb)


# ---------------------------------------------------------------------------------------
# Golden fixtures from Hugging Face transformers' LSHSelfAttention.


def parse(path):
    """(config dict, {name: array}) from one fixture file: ``config k=v ...``, then
    ``tensor <name> <f32|f64> <shape>`` lines each followed by one line of values."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith("config "), path
    cfg = {}
    for item in lines[0].split()[1:]:
        key, val = item.split("=")
        cfg[key] = int(val)
    tensors = {}
    rest = lines[1:]
    assert len(rest) % 2 == 0, path
    for head, body in zip(rest[0::2], rest[1::2]):
        tag, name, dtype, shape = head.split()
        assert tag == "tensor" and name not in tensors and dtype in ("f32", "f64"), head
        shape = tuple(int(s) for s in shape.split(","))
        vals = body.split()
        assert len(vals) == math.prod(shape), (name, len(vals), shape)
        tensors[name] = np.array(vals, dtype=np.float32 if dtype == "f32" else np.float64).reshape(shape)
    return cfg, tensors


FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.txt"))


def test_fixtures_present():
    assert len(FIXTURE_NAMES) >= 7, f"expected the 7 committed fixtures in {FIXTURES}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_hugging_face_fixture(name):
    cfg, t = parse(FIXTURES / name)
    b, n, h, d = (cfg[x] for x in ("batch", "seqlen", "heads", "head_dim"))
    kw = dict(
        chunk_length=cfg["chunk_length"],
        chunks_before=cfg["chunks_before"],
        chunks_after=cfg["chunks_after"],
        causal=cfg["causal"] == 1,
    )
    qk, v, rot, want = t["qk"], t["v"], t["rotations"], t["out"]
    assert qk.shape == (b, n, h, d) and rot.shape == (h, d, cfg["num_hashes"], cfg["num_buckets"] // 2)
    mask = None if "attention_mask" not in t else t["attention_mask"] == 0
    hf_buckets = t.get("buckets")
    assert (hf_buckets is not None) == (n > kw["chunk_length"]), name
    hf_buckets = None if hf_buckets is None else hf_buckets.astype(np.int64)
    # The definition with HF's float64 rotations is HF: its buckets, its output.
    out, _, bk = define(qk, v, rot, mask, None, **kw)
    if hf_buckets is not None:
        np.testing.assert_array_equal(bk, hf_buckets, err_msg=f"{name}: buckets")
    assert np.abs(out - want).max() <= 1e-9, name
    # The op (f32; rotations rounded to f32, so HF's buckets are given) matches HF...
    got, got_bk = fk.lsh_attention(
        qk, v, rot.astype(np.float32), key_padding_mask=mask, buckets=hf_buckets, return_buckets=True, **kw
    )
    np.testing.assert_allclose(f64(got), want, rtol=0, atol=2e-6 * (1 + np.abs(want).max()), err_msg=name)
    if hf_buckets is not None:
        np.testing.assert_array_equal(got_bk, hf_buckets)
    else:
        assert got_bk is None
    # ...and HF's layout of the mask (1 = token) is refused: only booleans.
    if mask is not None:
        with pytest.raises(TypeError, match="boolean"):
            fk.lsh_attention(qk, v, rot.astype(np.float32), key_padding_mask=t["attention_mask"], **kw)


# ---------------------------------------------------------------------------------------
# Bad calls: a ValueError / TypeError naming the reason, before anything runs.


def _base(case="padded"):
    rng = np.random.default_rng(0)
    return make(rng, case, np.float32)


def test_odd_bucket_counts():
    qk, v, rot, mask, kw = _base()
    with pytest.raises(ValueError, match="n_buckets = 7: the bucket count must be even"):
        fk.lsh_attention(qk, v, rot, n_buckets=7, **kw)
    with pytest.raises(ValueError, match="n_buckets = 0"):
        fk.lsh_attention(qk, v, rot, n_buckets=0, **kw)
    with pytest.raises(ValueError, match="n_buckets = 4, but the rotations"):
        fk.lsh_attention(qk, v, rot, n_buckets=4, **kw)  # the rotations give 8
    out = fk.lsh_attention(qk, v, rot, n_buckets=8, **kw)
    np.testing.assert_array_equal(out, fk.lsh_attention(qk, v, rot, **kw))
    with pytest.raises(ValueError, match="n_buckets = 3"):
        fk.lsh_attention_backward(out, qk, v, rot, out, np.zeros((2, 2, 3, 32), np.float32), n_buckets=3, **kw)


def test_rotations_of_the_wrong_shape():
    qk, v, rot, _, kw = _base()
    with pytest.raises(ValueError, match=r"rotations have shape \[3, 8, 3, 4\], expected \(heads, head_dim\)"):
        fk.lsh_attention(qk, v, np.zeros((3, 8, 3, 4), np.float32), **kw)
    with pytest.raises(ValueError, match="rotations have shape"):
        fk.lsh_attention(qk, v, rot[:, :4], **kw)  # head_dim 4, qk's is 8
    with pytest.raises(ValueError, match="rotations"):
        fk.lsh_attention(qk, v, rot[..., 0], **kw)  # rank 3
    with pytest.raises(ValueError, match="rotations"):
        fk.lsh_attention(qk, v, rot[..., :0], **kw)  # no bucket columns
    with pytest.raises(ValueError, match="rotations"):
        fk.lsh_attention(qk, v, rot[:, :, :0], **kw)  # no rounds
    with pytest.raises(TypeError, match="rotations"):
        fk.lsh_attention(qk, v, rot.astype(np.float64), **kw)


def test_chunk_length():
    qk, v, rot, _, kw = _base()
    kw = dict(kw)
    for c, msg in (
        (0, "chunk_length = 0: the chunk length must be positive"),
        (5, "not a multiple of chunk_length C = 5"),
    ):
        kw["chunk_length"] = c
        with pytest.raises(ValueError, match=msg):
            fk.lsh_attention(qk, v, rot, **kw)
    with pytest.raises(ValueError, match="chunk_length must be >= 0"):
        fk.lsh_attention(qk, v, rot, chunk_length=-1)
    with pytest.raises(TypeError, match="chunk_length must be an int"):
        fk.lsh_attention(qk, v, rot, chunk_length=8.0)
    with pytest.raises(TypeError):
        fk.lsh_attention(qk, v, rot)  # chunk_length is required
    # N <= C, whatever C: full attention.
    out, bk = fk.lsh_attention(qk, v, rot, chunk_length=1000, return_buckets=True)
    assert bk is None and out.shape == qk.shape


def test_bad_buckets():
    qk, v, rot, mask, kw = _base()
    out, lse, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_aux=True, **kw)
    call = lambda b, m=mask: fk.lsh_attention(qk, v, rot, key_padding_mask=m, buckets=b, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"buckets have shape \[2, 2, 2, 32\], expected"):
        call(bk[:, :, :2])
    with pytest.raises(ValueError, match="buckets"):
        call(bk[0])  # rank 3
    bad = bk.copy()
    bad[0, 0, 1, 5] = 0  # round 1's buckets start at 9 (8 buckets + the padding bucket)
    with pytest.raises(ValueError, match=r"round 1\) is outside \[9, 18\)"):
        call(bad)
    # Without padding a round spans 8 values: the padded call's round-2 values are out.
    with pytest.raises(ValueError, match="is outside"):
        call(bk, None)
    bad = bk.copy()
    bad[1, 1, 0, 0] = -1
    with pytest.raises(ValueError, match="is outside"):
        call(bad)
    with pytest.raises(ValueError, match="int32 range"):
        call(bk + 2**40)
    with pytest.raises(TypeError, match="integer"):
        call(bk.astype(np.float32))
    with pytest.raises(TypeError, match="integer"):
        call(bk > 3)
    with pytest.raises(ValueError, match="buckets"):
        fk.lsh_attention_backward(out, qk, v, rot, out, lse, key_padding_mask=mask, buckets=bad, **kw)
    # Buckets for a call that does not hash (N <= C).
    with pytest.raises(ValueError, match="buckets were given, but seqlen N = 32 <= chunk_length C = 64"):
        fk.lsh_attention(qk, v, rot, buckets=bk, chunk_length=64)


def test_bad_shapes_dtypes_and_masks():
    qk, v, rot, mask, kw = _base()
    with pytest.raises(ValueError, match="v has shape"):
        fk.lsh_attention(qk, v[:, :16], rot, **kw)
    with pytest.raises(TypeError, match="v is float16 but qk is float32"):
        fk.lsh_attention(qk, v.astype(np.float16), rot, **kw)
    with pytest.raises(ValueError, match="qk"):
        fk.lsh_attention(qk[0], v[0], rot, **kw)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        fk.lsh_attention(qk, v, rot, key_padding_mask=mask[:, :5], **kw)
    with pytest.raises(TypeError, match="boolean"):
        fk.lsh_attention(qk, v, rot, key_padding_mask=mask.astype(np.int64), **kw)
    with pytest.raises(TypeError, match="causal must be a bool"):
        fk.lsh_attention(qk, v, rot, **{**kw, "causal": 1})
    with pytest.raises(TypeError, match="return_buckets must be a bool"):
        fk.lsh_attention(qk, v, rot, return_buckets="yes", **kw)
    with pytest.raises(TypeError, match="DLPack"):
        fk.lsh_attention(qk.tolist(), v, rot, **kw)


def test_bad_backward_calls():
    qk, v, rot, mask, kw = _base()
    out, lse, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_aux=True, **kw)
    bw = fk.lsh_attention_backward
    with pytest.raises(ValueError, match="lse has shape"):
        bw(out, qk, v, rot, out, lse[:, :, :1], key_padding_mask=mask, buckets=bk, **kw)
    with pytest.raises(TypeError, match="lse"):
        bw(out, qk, v, rot, out, lse.astype(np.float16), key_padding_mask=mask, buckets=bk, **kw)
    with pytest.raises(ValueError, match="dout has shape|grad_output"):
        bw(out[:, :16], qk, v, rot, out, lse, key_padding_mask=mask, buckets=bk, **kw)
    with pytest.raises(TypeError, match="out is float16"):
        bw(out, qk, v, rot, out.astype(np.float16), lse, key_padding_mask=mask, buckets=bk, **kw)
