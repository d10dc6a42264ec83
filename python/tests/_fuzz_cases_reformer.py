# ruff: noqa: E501  (the case table: one-line code snippets, kept whole for reading)
"""Fuzz cases (name, code, expectation) of Reformer LSH attention (issue 16):
lsh_attention / lsh_attention_backward on numpy arrays (random valid calls checked against
test_reformer_cpu.py's float64 definition, given buckets, the N <= C fallback; bad
dtypes, shapes, rotations, bucket counts, chunk options, masks, buckets, backward tensors,
huge sizes); run by test_fuzz.py with REFORMER_SETUP after the harness' prelude."""

from _fuzz import BAD_FLOATS, NEGATIVE_INTS, OK, REJECT, REJECT_OR_OOM

# Inputs (B 2, N 16, H 2, D 8; 2 rounds of 4 buckets; C 4) and the definition of
# test_reformer_cpu.py (hashing, one stable sort of all rounds, circular look-back,
# replaced masks, logsumexp combination, unsort).
REFORMER_SETUP = r"""
from test_reformer_cpu import define, define_grads
rqk, rv, rdo = randn(2, 16, 2, 8), randn(2, 16, 2, 8), randn(2, 16, 2, 8)
rrot = randn(2, 8, 2, 2)
rmask = np.zeros((2, 16), bool); rmask[0, -3:] = True
RKW = dict(chunk_length=4)

def ref_lsh(qk, v, rot, mask=None, buckets=None, **kw):
    return define(qk, v, rot, mask, buckets, **kw)

def lsh_grads(qk, v, rot, mask=None, dout=None, **kw):
    out, lse, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_aux=True, **kw)
    dout = rdo[: qk.shape[0], : qk.shape[1], : qk.shape[2], : qk.shape[3]].astype(qk.dtype) if dout is None else dout
    got = fk.lsh_attention_backward(dout, qk, v, rot, out, lse, key_padding_mask=mask, buckets=bk, **kw)
    want = define_grads(dout, qk, v, rot, mask, bk, out, lse, **kw)
    return got, want
"""


def reformer_cases():
    c = []
    add = c.append
    for name, kw in {
        "1 round, C 4": "chunk_length=4",
        "causal": "chunk_length=4, causal=True",
        "look-ahead": "chunk_length=4, chunks_after=1",
        "no look-around": "chunk_length=4, chunks_before=0",
        "windows wrap onto themselves": "chunk_length=8, chunks_before=2, chunks_after=1",
        "N = C fallback": "chunk_length=16",
        "N < C fallback, causal": "chunk_length=64, causal=True",
    }.items():
        for masked in (False, True):
            m = "rmask" if masked else "None"
            tag = f"reformer {name}{' masked' if masked else ''}"
            add(
                (
                    tag,
                    f"out, lse, bk = fk.lsh_attention(rqk, rv, rrot, key_padding_mask={m}, return_aux=True, {kw}); want = ref_lsh(rqk, rv, rrot, {m}, None, {kw}); close(out, want[0]); close(lse, want[1], 1e-5); assert (bk is None) == (want[2] is None) and (bk is None or np.array_equal(bk, want[2]))",
                    OK,
                )
            )
            add(
                (
                    f"{tag} backward",
                    f"g, w = lsh_grads(rqk, rv, rrot, {m}, {kw}); close(g[0], w[0], 5e-5); close(g[1], w[1], 5e-5)",
                    OK,
                )
            )
    for name, code in {
        "given buckets reproduce O": "out, bk = fk.lsh_attention(rqk, rv, rrot, return_buckets=True, **RKW); np.testing.assert_array_equal(fk.lsh_attention(rqk, rv, rrot, buckets=bk, **RKW), out)",
        "given int32 buckets": "out, bk = fk.lsh_attention(rqk, rv, rrot, return_buckets=True, **RKW); np.testing.assert_array_equal(fk.lsh_attention(rqk, rv, rrot, buckets=bk.astype(np.int32), **RKW), out)",
        "other valid buckets are used as given": "bk = np.zeros((2, 2, 2, 16), np.int64); bk[:, :, 1] = 4; close(fk.lsh_attention(rqk, rv, rrot, buckets=bk, **RKW), ref_lsh(rqk, rv, rrot, None, bk, **RKW)[0])",
        "n_buckets stated": "np.testing.assert_array_equal(fk.lsh_attention(rqk, rv, rrot, n_buckets=4, **RKW), fk.lsh_attention(rqk, rv, rrot, **RKW))",
        "float16": "h = [t.astype(np.float16) for t in (rqk, rv)]; out = fk.lsh_attention(*h, rrot, **RKW); assert out.dtype == np.float16; close(out, ref_lsh(*h, rrot, **RKW)[0], 2e-3)",
        "heads-first memory": "t = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3); close(fk.lsh_attention(t(rqk), t(rv), rrot, **RKW), ref_lsh(rqk, rv, rrot, **RKW)[0])",
        "one token per chunk": "close(fk.lsh_attention(rqk, rv, rrot, chunk_length=1), ref_lsh(rqk, rv, rrot, chunk_length=1)[0])",
        "batch 1, one head, N 2, C 1": "a = randn(1, 2, 1, 8); r = randn(1, 8, 1, 1); close(fk.lsh_attention(a, a, r, chunk_length=1), ref_lsh(a, a, r, chunk_length=1)[0])",
        "every token of a sequence padded": "m = np.zeros((2, 16), bool); m[1] = True; close(fk.lsh_attention(rqk, rv, rrot, key_padding_mask=m, **RKW), ref_lsh(rqk, rv, rrot, m, **RKW)[0])",
        "inputs untouched": "keep = [t.copy() for t in (rqk, rv, rrot)]; lsh_grads(rqk, rv, rrot, rmask, **RKW); assert all(np.array_equal(a, b_) for a, b_ in zip(keep, (rqk, rv, rrot)))",
    }.items():
        add((f"reformer {name}", code, OK))
    for seed in range(10):
        add(
            (
                f"reformer random #{seed}",
                f"""
                r = np.random.default_rng({seed})
                b_, h, d = (int(x) for x in r.integers(1, 4, 3))
                cl = int(r.integers(1, 6)); n = cl * int(r.integers(1, 5)) if r.integers(4) else int(r.integers(1, 12))
                nh, half = int(r.integers(1, 4)), int(r.integers(1, 4))
                mk = lambda *s: r.standard_normal(s).astype(np.float32)
                qr, vr, rot = mk(b_, n, h, d), mk(b_, n, h, d), mk(h, d, nh, half)
                m = r.integers(0, 3, (b_, n)) == 0 if r.integers(2) else None
                kw = dict(chunk_length=cl, chunks_before=int(r.integers(0, 3)), chunks_after=int(r.integers(0, 2)), causal=bool(r.integers(2)))
                if n > cl and n % cl:
                    n = cl * (n // cl + 1); qr, vr = mk(b_, n, h, d), mk(b_, n, h, d); m = None if m is None else r.integers(0, 3, (b_, n)) == 0
                out, lse, bk = fk.lsh_attention(qr, vr, rot, key_padding_mask=m, return_aux=True, **kw)
                want = ref_lsh(qr, vr, rot, m, None, **kw)
                close(out, want[0]); close(lse, want[1], 1e-5)
                g, w = lsh_grads(qr, vr, rot, m, dout=mk(b_, n, h, d), **kw)
                close(g[0], w[0], 5e-5); close(g[1], w[1], 5e-5)
                """,
                OK,
            )
        )
    bad = {
        # dtypes
        "float64 qk": "fk.lsh_attention(rqk.astype(np.float64), rv.astype(np.float64), rrot, **RKW)",
        "int32 qk": "fk.lsh_attention(rqk.astype(np.int32), rv.astype(np.int32), rrot, **RKW)",
        "v float16, qk float32": "fk.lsh_attention(rqk, rv.astype(np.float16), rrot, **RKW)",
        "rotations float64": "fk.lsh_attention(rqk, rv, rrot.astype(np.float64), **RKW)",
        "rotations bool": "fk.lsh_attention(rqk, rv, rrot > 0, **RKW)",
        # shapes
        "qk and v differ": "fk.lsh_attention(rqk, rv[:, :8], rrot, **RKW)",
        "qk rank 3": "fk.lsh_attention(rqk[0], rv[0], rrot, **RKW)",
        "rotations wrong heads": "fk.lsh_attention(rqk, rv, rrot[:1], **RKW)",
        "rotations wrong head_dim": "fk.lsh_attention(rqk, rv, rrot[:, :4], **RKW)",
        "rotations rank 3": "fk.lsh_attention(rqk, rv, rrot[..., 0], **RKW)",
        "rotations no rounds": "fk.lsh_attention(rqk, rv, rrot[:, :, :0], **RKW)",
        "rotations no bucket columns": "fk.lsh_attention(rqk, rv, rrot[..., :0], **RKW)",
        "empty batch": "fk.lsh_attention(rqk[:0], rv[:0], rrot, **RKW)",
        "empty sequence": "fk.lsh_attention(rqk[:, :0], rv[:, :0], rrot, **RKW)",
        "non-unit head-dim stride": "fk.lsh_attention(rqk[..., ::2], rv[..., ::2], rrot[:, :4], **RKW)",
        # bucket counts and chunks
        "n_buckets odd": "fk.lsh_attention(rqk, rv, rrot, n_buckets=3, **RKW)",
        "n_buckets disagrees with the rotations": "fk.lsh_attention(rqk, rv, rrot, n_buckets=8, **RKW)",
        "n_buckets 0": "fk.lsh_attention(rqk, rv, rrot, n_buckets=0, **RKW)",
        "chunk_length 0": "fk.lsh_attention(rqk, rv, rrot, chunk_length=0)",
        "N not a multiple of C": "fk.lsh_attention(rqk, rv, rrot, chunk_length=5)",
        "chunk_length missing": "fk.lsh_attention(rqk, rv, rrot)",
        "chunk_length float": "fk.lsh_attention(rqk, rv, rrot, chunk_length=4.0)",
        "chunk_length True": "fk.lsh_attention(rqk, rv, rrot, chunk_length=True)",
        "chunks_before -1": "fk.lsh_attention(rqk, rv, rrot, chunks_before=-1, **RKW)",
        "chunks_after None": "fk.lsh_attention(rqk, rv, rrot, chunks_after=None, **RKW)",
        "causal 1": "fk.lsh_attention(rqk, rv, rrot, causal=1, **RKW)",
        "causal 'yes'": "fk.lsh_attention(rqk, rv, rrot, causal='yes', **RKW)",
        "return_buckets 1": "fk.lsh_attention(rqk, rv, rrot, return_buckets=1, **RKW)",
        # masks
        "mask wrong shape": "fk.lsh_attention(rqk, rv, rrot, key_padding_mask=rmask[:, :8], **RKW)",
        "mask transposed": "fk.lsh_attention(rqk, rv, rrot, key_padding_mask=rmask.T, **RKW)",
        "mask floats": "fk.lsh_attention(rqk, rv, rrot, key_padding_mask=rmask.astype(np.float32), **RKW)",
        # buckets
        "buckets wrong shape": "fk.lsh_attention(rqk, rv, rrot, buckets=np.zeros((2, 2, 2, 8), np.int64), **RKW)",
        "buckets of the wrong round": "bk = np.zeros((2, 2, 2, 16), np.int64); fk.lsh_attention(rqk, rv, rrot, buckets=bk, **RKW)",
        "buckets negative": "fk.lsh_attention(rqk, rv, rrot, buckets=-np.ones((2, 2, 2, 16), np.int64), **RKW)",
        "buckets past int32": f"fk.lsh_attention(rqk, rv, rrot, buckets=np.full((2, 2, 2, 16), {2**40}, np.int64), **RKW)",
        "buckets float": "fk.lsh_attention(rqk, rv, rrot, buckets=np.zeros((2, 2, 2, 16)), **RKW)",
        "buckets with N <= C": "fk.lsh_attention(rqk, rv, rrot, buckets=np.zeros((2, 2, 2, 16), np.int64), chunk_length=16)",
        # not arrays
        "qk None": "fk.lsh_attention(None, rv, rrot, **RKW)",
        "rotations list": "fk.lsh_attention(rqk, rv, rrot.tolist(), **RKW)",
        # backward
        "backward dout wrong shape": "out, lse, bk = fk.lsh_attention(rqk, rv, rrot, return_aux=True, **RKW); fk.lsh_attention_backward(rdo[:, :8], rqk, rv, rrot, out, lse, buckets=bk, **RKW)",
        "backward lse wrong rounds": "out, lse, bk = fk.lsh_attention(rqk, rv, rrot, return_aux=True, **RKW); fk.lsh_attention_backward(rdo, rqk, rv, rrot, out, lse[:, :, :1], buckets=bk, **RKW)",
        "backward lse float16": "out, lse, bk = fk.lsh_attention(rqk, rv, rrot, return_aux=True, **RKW); fk.lsh_attention_backward(rdo, rqk, rv, rrot, out, lse.astype(np.float16), buckets=bk, **RKW)",
        "backward out float64": "out, lse, bk = fk.lsh_attention(rqk, rv, rrot, return_aux=True, **RKW); fk.lsh_attention_backward(rdo, rqk, rv, rrot, out.astype(np.float64), lse, buckets=bk, **RKW)",
        "chunk_length 2**70": f"fk.lsh_attention(rqk, rv, rrot, chunk_length={2**70})",
        "chunks_after 2**63 (window overflows)": f"fk.lsh_attention(rqk, rv, rrot, chunks_after={2**63}, **RKW)",
    }
    for v in NEGATIVE_INTS:
        bad[f"chunk_length {v}"] = f"fk.lsh_attention(rqk, rv, rrot, chunk_length={v})"
    for v in BAD_FLOATS[:3]:
        bad[f"chunks_before {v}"] = f"fk.lsh_attention(rqk, rv, rrot, chunks_before={v}, **RKW)"
    for name, expr in bad.items():
        add((f"reformer {name}", expr, REJECT))
    for name, expr in {
        # huge sizes: broadcast views; nothing this large may be allocated
        "2**40 broadcast tokens": f"n = {2**40}; a = np.broadcast_to(rqk[:1, :1], (1, n, 2, 8)); fk.lsh_attention(a, a, rrot, chunk_length=4)",
    }.items():
        add((f"reformer {name}", expr, REJECT_OR_OOM))
    return c
