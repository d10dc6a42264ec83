# ruff: noqa: E501  (the case table: one-line code snippets, kept whole for reading)
"""Fuzz cases (name, code, expectation) of Linformer attention (issue 15):
linformer_attention / linformer_attention_backward on numpy arrays (valid calls checked
against float64 numpy with the op's roundings, every sharing level, masks, N < N_max;
bad dtypes, shapes, projections, masks, scales and options, empty and huge sizes); run
by test_fuzz.py with LINFORMER_SETUP after the harness' prelude."""

from _fuzz import BAD_FLOATS, OK, REJECT, REJECT_OR_OOM, WRONG_TYPES

# Inputs (B 2, N 7, H 4, H_kv 2, D 8, k 5, N_max 9) and the float64 definition: kp, vp
# rounded once to the dtype, then softmax attention over the k projected keys.
LINFORMER_SETUP = r'''
lq, lk, lv, ldo = randn(2, 7, 4, 8), randn(2, 7, 2, 8), randn(2, 7, 2, 8), randn(2, 7, 4, 8)
le, lf = randn(2, 5, 9) / 3, randn(2, 5, 9) / 3
le1, lf1 = le[:1], lf[:1]
lmask = np.zeros((2, 7), bool); lmask[0, [1, 4]] = True; lmask[1, :] = True

def _proj(p, x, mask, dtype):
    n, hkv = x.shape[1], x.shape[2]
    p = np.broadcast_to(p[:, :, :n], (hkv,) + p.shape[1:2] + (n,)) if p.shape[0] == 1 else p[:, :, :n]
    x = x.copy()
    if mask is not None:
        x[np.asarray(mask)] = 0
    return np.einsum("hrj,bjhd->brhd", p, x).astype(dtype).astype(np.float64), x, p

def ref_lin(q, k, v, e, f=None, mask=None, scale=None):
    """float64 (out, lse, kp, vp)."""
    dtype = np.asarray(q).dtype
    q, k, v, e = (np.asarray(t, np.float64) for t in (q, k, v, e))
    f = e if f is None else np.asarray(f, np.float64)
    kp = _proj(e, k, mask, dtype)[0]
    vp = _proj(f, v, mask, dtype)[0]
    g = q.shape[2] // k.shape[2]
    kq, vq = np.repeat(kp, g, axis=2), np.repeat(vp, g, axis=2)
    s = np.einsum("bnhd,brhd->bhnr", q, kq) * (q.shape[-1] ** -0.5 if scale is None else scale)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out = np.einsum("bhnr,brhd->bnhd", p / p.sum(-1, keepdims=True), vq)
    return out, (m[..., 0] + np.log(p.sum(-1))), kp, vp

def ref_lin_grads(dout, q, k, v, e, f=None, mask=None, scale=None):
    """float64 (dq, dk, dv, de, df) of ref_lin (df None when f is)."""
    dtype = np.asarray(q).dtype
    shared = f is None
    q, k, v, e, dout = (np.asarray(t, np.float64) for t in (q, k, v, e, dout))
    f = e if shared else np.asarray(f, np.float64)
    kp, kt, ep = _proj(e, k, mask, dtype)
    vp, vt, fp = _proj(f, v, mask, dtype)
    hkv, g = k.shape[2], q.shape[2] // k.shape[2]
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    kq, vq = np.repeat(kp, g, axis=2), np.repeat(vp, g, axis=2)
    s = np.einsum("bnhd,brhd->bhnr", q, kq) * sc
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhnr,brhd->bnhd", p, vq)
    dp = np.einsum("bnhd,brhd->bhnr", dout, vq)
    ds = p * (dp - (dout * out).sum(-1).transpose(0, 2, 1)[..., None])
    dq = np.einsum("bhnr,brhd->bnhd", ds, kq) * sc
    fold = lambda t: t.reshape(t.shape[0], t.shape[1], hkv, g, t.shape[3]).sum(3)
    dkp = fold(np.einsum("bhnr,bnhd->brhd", ds, q) * sc).astype(dtype).astype(np.float64)
    dvp = fold(np.einsum("bhnr,bnhd->brhd", p, dout)).astype(dtype).astype(np.float64)
    dk = np.einsum("hrj,brhd->bjhd", ep, dkp)
    dv = np.einsum("hrj,brhd->bjhd", fp, dvp)
    if mask is not None:
        dk[np.asarray(mask)] = 0; dv[np.asarray(mask)] = 0
    def dproj(heads, dxp, xt):
        d = np.zeros((heads,) + e.shape[1:])
        part = np.einsum("brhd,bjhd->hrj", dxp, xt)
        d[:, :, : xt.shape[1]] = part.sum(0, keepdims=True) if heads == 1 else part
        return d
    de = dproj(e.shape[0], dkp, kt)
    if shared:
        return dq, dk, dv, de + dproj(e.shape[0], dvp, vt), None
    return dq, dk, dv, de, dproj(f.shape[0], dvp, vt)

def close_lin(got, want, tol=2e-5):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            close(g, w, tol)

def lin_backward(q, k, v, e, f=None, mask=None, scale=None, dout=None):
    out, lse, kp, vp = fk.linformer_attention(q, k, v, e, f, key_padding_mask=mask, softmax_scale=scale, return_aux=True)
    dout = ldo[:, : q.shape[1], : q.shape[2]] if dout is None else dout
    return fk.linformer_attention_backward(dout.astype(q.dtype), q, k, v, e, out, lse, kp, vp, f, key_padding_mask=mask, softmax_scale=scale), dout
'''

# (description, positional args, keyword args) of the valid calls.
_SHARING = {
    "per head": "le, lf",
    "headwise": "le1, lf1",
    "F = E per head": "le",
    "F = E headwise": "le1",
    "E headwise, F per head": "le1, lf",
}


def linformer_cases():
    c = []
    add = c.append
    for name, ef in _SHARING.items():
        for masked in (False, True):
            kw = ", mask=lmask" if masked else ""
            call_kw = ", key_padding_mask=lmask" if masked else ""
            tag = f"linformer {name}{' masked' if masked else ''}"
            add(
                (
                    tag,
                    f"r = fk.linformer_attention(lq, lk, lv, {ef}{call_kw}, return_aux=True); close_lin(r, ref_lin(lq, lk, lv, {ef}{kw}))",
                    OK,
                )
            )
            add(
                (
                    f"{tag} backward",
                    f"g, d = lin_backward(lq, lk, lv, {ef}{kw}); close_lin(g, ref_lin_grads(d, lq, lk, lv, {ef}{kw}), 5e-5)",
                    OK,
                )
            )
    for name, code in {
        "N < N_max uses the first N columns": "close(fk.linformer_attention(lq[:, :4], lk[:, :4], lv[:, :4], le, lf), ref_lin(lq[:, :4], lk[:, :4], lv[:, :4], le, lf)[0])",
        "N = N_max": "q9, k9 = randn(1, 9, 2, 8), randn(1, 9, 2, 8); close(fk.linformer_attention(q9, k9, k9, le), ref_lin(q9, k9, k9, le)[0])",
        "k = 1": "close(fk.linformer_attention(lq, lk, lv, le[:, :1], lf[:, :1]), ref_lin(lq, lk, lv, le[:, :1], lf[:, :1])[0])",
        "k > N": "eb = randn(1, 12, 7); close(fk.linformer_attention(lq, lk, lv, eb), ref_lin(lq, lk, lv, eb)[0])",
        "MQA (one K/V head)": "close(fk.linformer_attention(lq, lk[:, :, :1], lv[:, :, :1], le1), ref_lin(lq, lk[:, :, :1], lv[:, :, :1], le1)[0])",
        "single head, batch 1, N 1": "a = randn(1, 1, 1, 8); close(fk.linformer_attention(a, a, a, le1[:, :, :1]), ref_lin(a, a, a, le1[:, :, :1])[0])",
        "explicit scale": "close(fk.linformer_attention(lq, lk, lv, le, lf, softmax_scale=0.3), ref_lin(lq, lk, lv, le, lf, scale=0.3)[0])",
        "scale np.float32": "close(fk.linformer_attention(lq, lk, lv, le, softmax_scale=np.float32(0.5)), ref_lin(lq, lk, lv, le, scale=0.5)[0])",
        "heads-first memory": "t = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3); close(fk.linformer_attention(t(lq), t(lk), t(lv), le), ref_lin(lq, lk, lv, le)[0])",
        "E as a transposed view (lucidrains' proj_k.T)": "et = np.ascontiguousarray(le1[0].T).T[None]; close(fk.linformer_attention(lq, lk, lv, et), ref_lin(lq, lk, lv, le1)[0])",
        "fully padded sequence: O 0, lse ln k": "out, lse, _, _ = fk.linformer_attention(lq, lk, lv, le, key_padding_mask=lmask, return_aux=True); assert not out[1].any(); close(lse[1], np.full(lse[1].shape, np.log(5)))",
        "mask np.bool_ array from ints": "m = (np.arange(14).reshape(2, 7) % 3 == 0); close(fk.linformer_attention(lq, lk, lv, le, key_padding_mask=m), ref_lin(lq, lk, lv, le, mask=m)[0])",
        "float16": "h = [t.astype(np.float16) for t in (lq, lk, lv, le, lf)]; out = fk.linformer_attention(*h); assert out.dtype == np.float16; close(out, ref_lin(*h)[0], 2e-3)",
        "float16 backward": "h = [t.astype(np.float16) for t in (lq, lk, lv, le)]; g, d = lin_backward(*h); assert all(t is None or t.dtype == np.float16 for t in g); close_lin(g, ref_lin_grads(d.astype(np.float16), *h), 5e-3)",
        "mask as nested lists of bools": "close(fk.linformer_attention(lq, lk, lv, le, key_padding_mask=lmask.tolist()), ref_lin(lq, lk, lv, le, mask=lmask)[0])",
        "return_aux np.bool_": "r = fk.linformer_attention(lq, lk, lv, le, return_aux=np.bool_(True)); assert len(r) == 4",
        "inputs untouched": "keep = [t.copy() for t in (lq, lk, lv, le)]; lin_backward(lq, lk, lv, le, mask=lmask); assert all(np.array_equal(a, b_) for a, b_ in zip(keep, (lq, lk, lv, le)))",
        "nan in q stays in its row": "qn = lq.copy(); qn[0, 3, 1, 2] = np.nan; out = fk.linformer_attention(qn, lk, lv, le); assert np.isnan(out[0, 3, 1]).all() and not np.isnan(out[1]).any()",
    }.items():
        add((f"linformer {name}", code, OK))
    for seed in range(12):
        add(
            (
                f"linformer random #{seed}",
                f"""
                r = np.random.default_rng({seed})
                b_, n, hkv, d, kk = (int(x) for x in r.integers(1, 6, 5))
                h = hkv * int(r.integers(1, 3)); nmax = n + int(r.integers(0, 3))
                mk = lambda *s: r.standard_normal(s).astype(np.float32)
                qr, kr, vr = mk(b_, n, h, d), mk(b_, n, hkv, d), mk(b_, n, hkv, d)
                er = mk(int(r.choice([1, hkv])), kk, nmax) / 2
                fr = None if r.integers(2) else mk(int(r.choice([1, hkv])), kk, nmax) / 2
                m = r.integers(0, 3, (b_, n)) == 0 if r.integers(2) else None
                close_lin(fk.linformer_attention(qr, kr, vr, er, fr, key_padding_mask=m, return_aux=True), ref_lin(qr, kr, vr, er, fr, mask=m))
                g, dd = lin_backward(qr, kr, vr, er, fr, mask=m, dout=mk(b_, n, h, d))
                close_lin(g, ref_lin_grads(dd, qr, kr, vr, er, fr, mask=m), 5e-5)
                """,
                OK,
            )
        )
    bad = {
        # dtypes
        "float64 inputs": "fk.linformer_attention(*(t.astype(np.float64) for t in (lq, lk, lv, le)))",
        "int32 inputs": "fk.linformer_attention(*(t.astype(np.int32) for t in (lq, lk, lv, le)))",
        "e float16, q float32": "fk.linformer_attention(lq, lk, lv, le.astype(np.float16))",
        "f float64": "fk.linformer_attention(lq, lk, lv, le, lf.astype(np.float64))",
        "bool q": "fk.linformer_attention(lq > 0, lk, lv, le)",
        # projection shapes
        "k = 0": "fk.linformer_attention(lq, lk, lv, le[:, :0])",
        "N > N_max": "fk.linformer_attention(lq, lk, lv, le[:, :, :6])",
        "E and F disagree on k": "fk.linformer_attention(lq, lk, lv, le, lf[:, :4])",
        "E and F disagree on N_max": "fk.linformer_attention(lq, lk, lv, le, lf[:, :, :8])",
        "E heads neither 1 nor H_kv": "fk.linformer_attention(lq, lk, lv, np.concatenate([le, le1]))",
        "F heads 3": "fk.linformer_attention(lq, lk, lv, le, np.concatenate([lf, lf1]))",
        "E rank 2": "fk.linformer_attention(lq, lk, lv, le[0])",
        "E rank 4": "fk.linformer_attention(lq, lk, lv, le[None])",
        "E empty heads": "fk.linformer_attention(lq, lk, lv, le[:0])",
        # q/k/v shapes
        "H not a multiple of H_kv": "fk.linformer_attention(lq[:, :, :3], lk, lv, le)",
        "k and v differ": "fk.linformer_attention(lq, lk, lv[:, :, :1], le)",
        "q batch differs": "fk.linformer_attention(lq[:1], lk, lv, le)",
        "q seqlen differs": "fk.linformer_attention(lq[:, :6], lk, lv, le)",
        "head_dim differs": "fk.linformer_attention(lq[..., :4], lk, lv, le)",
        "q rank 3": "fk.linformer_attention(lq[0], lk, lv, le)",
        "head_dim 512": "a = randn(1, 2, 1, 512); fk.linformer_attention(a, a, a, le1[:, :, :2])",
        "empty batch": "fk.linformer_attention(lq[:0], lk[:0], lv[:0], le)",
        "empty sequence": "fk.linformer_attention(lq[:, :0], lk[:, :0], lv[:, :0], le)",
        "non-unit head-dim stride": "fk.linformer_attention(lq[..., ::2], lk[..., ::2], lv[..., ::2], le)",
        # masks
        "mask wrong shape": "fk.linformer_attention(lq, lk, lv, le, key_padding_mask=lmask[:, :6])",
        "mask transposed": "fk.linformer_attention(lq, lk, lv, le, key_padding_mask=lmask.T)",
        "mask rank 3": "fk.linformer_attention(lq, lk, lv, le, key_padding_mask=lmask[None])",
        "mask ints": "fk.linformer_attention(lq, lk, lv, le, key_padding_mask=lmask.astype(np.int32))",
        "mask floats": "fk.linformer_attention(lq, lk, lv, le, key_padding_mask=lmask.astype(np.float32))",
        "mask True": "fk.linformer_attention(lq, lk, lv, le, key_padding_mask=True)",
        # options
        "return_aux 1": "fk.linformer_attention(lq, lk, lv, le, return_aux=1)",
        "return_aux 'yes'": "fk.linformer_attention(lq, lk, lv, le, return_aux='yes')",
        "scale True": "fk.linformer_attention(lq, lk, lv, le, softmax_scale=True)",
        "scale complex": "fk.linformer_attention(lq, lk, lv, le, softmax_scale=1j)",
        # not arrays
        "q None": "fk.linformer_attention(None, lk, lv, le)",
        "e list": "fk.linformer_attention(lq, lk, lv, le.tolist())",
        "f str": "fk.linformer_attention(lq, lk, lv, le, 'f')",
        # backward
        "backward dout wrong shape": "out, lse, kp, vp = fk.linformer_attention(lq, lk, lv, le, return_aux=True); fk.linformer_attention_backward(ldo[:, :6], lq, lk, lv, le, out, lse, kp, vp)",
        "backward lse float16": "out, lse, kp, vp = fk.linformer_attention(lq, lk, lv, le, return_aux=True); fk.linformer_attention_backward(ldo, lq, lk, lv, le, out, lse.astype(np.float16), kp, vp)",
        "backward kp wrong k": "out, lse, kp, vp = fk.linformer_attention(lq, lk, lv, le, return_aux=True); fk.linformer_attention_backward(ldo, lq, lk, lv, le, out, lse, kp[:, :4], vp)",
        "backward vp of another call": "out, lse, kp, vp = fk.linformer_attention(lq, lk, lv, le, return_aux=True); fk.linformer_attention_backward(ldo, lq, lk, lv, le, out, lse, kp, vp[:1])",
        "backward out float64": "out, lse, kp, vp = fk.linformer_attention(lq, lk, lv, le, return_aux=True); fk.linformer_attention_backward(ldo, lq, lk, lv, le, out.astype(np.float64), lse, kp, vp)",
        "backward mask wrong shape": "out, lse, kp, vp = fk.linformer_attention(lq, lk, lv, le, return_aux=True); fk.linformer_attention_backward(ldo, lq, lk, lv, le, out, lse, kp, vp, key_padding_mask=lmask[:1])",
        # huge sizes: broadcast views, nothing this large may be allocated
        "2**40 broadcast keys, N > N_max": f"kb = np.broadcast_to(lk[:, :1], (2, {2**40}, 2, 8)); fk.linformer_attention(np.broadcast_to(lq[:, :1], (2, {2**40}, 4, 8)), kb, kb, le)",
    }
    for v in BAD_FLOATS + [t for t in WRONG_TYPES if t not in ("None", "1.5")]:
        bad[f"scale {v}"] = f"fk.linformer_attention(lq, lk, lv, le, softmax_scale={v})"
    for name, expr in bad.items():
        add((f"linformer {name}", expr, REJECT))
    for name, expr in {
        "2**33 broadcast keys within N_max": f"n = {2**33}; kb = np.broadcast_to(lk[:1, :1], (1, n, 2, 8)); fk.linformer_attention(np.broadcast_to(lq[:1, :1], (1, n, 4, 8)), kb, kb, np.broadcast_to(le1[:, :, :1], (1, 5, n)))",
    }.items():
        add((f"linformer {name}", expr, REJECT_OR_OOM))
    return c
