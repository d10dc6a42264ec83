# ruff: noqa: E501  (the case table: one-line code snippets, kept whole for reading)
"""Fuzz cases (name, code, expectation) of dense attention, its backward and varlen, and Longformer; run by test_fuzz.py."""

from _fuzz import BAD_FLOATS, HUGE_INTS, OK, REJECT


def attention_cases():
    c = []
    add = c.append
    # Valid inputs against the float64 reference.
    for causal in (False, True):
        add(
            (
                f"fwd causal={causal}",
                f"close(fk.flash_attn_func(q, k, v, causal={causal}), attn(q, k, v, causal={causal}))",
                OK,
            )
        )
    for win in [(0, 0), (2, 1), (-1, 0), (0, -1), (3, 3)]:
        ref_win = tuple(None if s == -1 else s for s in win)
        add(
            (
                f"fwd window {win}",
                f"close(fk.flash_attn_func(q, k, v, window_size={win}), attn(q, k, v, window={ref_win}))",
                OK,
            )
        )
    for big in HUGE_INTS:
        add(
            (
                f"fwd window ({big}, 0) unbounded",
                f"close(fk.flash_attn_func(q, k, v, window_size=({big}, 0)), attn(q, k, v, window=(None, 0)))",
                OK,
            )
        )
        add(
            (
                f"fwd window (1, {big})",
                f"close(fk.flash_attn_func(q, k, v, window_size=(1, {big})), attn(q, k, v, window=(1, None)))",
                OK,
            )
        )
    for s in ("0.5", "1e-3", "1e3", "np.float32(0.25)", "2.0**-140"):
        add(
            (
                f"fwd scale {s}",
                f"close(fk.flash_attn_func(q, k, v, softmax_scale={s}), attn(q, k, v, scale=float({s})), 1e-4)",
                OK,
            )
        )
    add(("fwd gqa", "close(fk.flash_attn_func(q, k1, v1), attn(q, k1, v1))", OK))
    add(("fwd nq<nk", "close(fk.flash_attn_func(q[:, :3], k, v, causal=True), attn(q[:, :3], k, v, causal=True))", OK))
    add(
        (
            "fwd nq>nk",
            "close(fk.flash_attn_func(q, k[:, :3], v[:, :3], causal=True), attn(q, k[:, :3], v[:, :3], causal=True))",
            OK,
        )
    )
    add(("fwd nq=1", "close(fk.flash_attn_func(q[:, :1], k, v), attn(q[:, :1], k, v))", OK))
    add(
        (
            "fwd d=8",
            "close(fk.flash_attn_func(q[..., :8], k[..., :8], v[..., :8]), attn(q[..., :8], k[..., :8], v[..., :8]))",
            OK,
        )
    )
    add(
        (
            "fwd float16",
            "close(fk.flash_attn_func(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)), attn(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)), 2e-3)",
            OK,
        )
    )
    add(
        (
            "fwd bfloat16",
            "import ml_dtypes; bq = q.astype(ml_dtypes.bfloat16); close(fk.flash_attn_func(bq, bq, bq), attn(bq, bq, bq), 2e-2)",
            OK,
        )
    )
    add(
        (
            "fwd heads-first memory",
            "qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3); close(fk.flash_attn_func(qt, k, v), attn(q, k, v))",
            OK,
        )
    )
    add(
        (
            "fwd strided view",
            "big = randn(2, 16, 4, 32); qs = big[::2, ::2, ::2, :16]; close(fk.flash_attn_func(qs, qs, qs), attn(qs, qs, qs))",
            OK,
        )
    )
    add(
        (
            "fwd broadcast k/v",
            "kb = np.broadcast_to(k[:, :1], k.shape); close(fk.flash_attn_func(q, kb, kb), attn(q, kb, kb))",
            OK,
        )
    )
    add(
        (
            "fwd read-only",
            "qr = q.copy(); qr.flags.writeable = False; close(fk.flash_attn_func(qr, k, v), attn(q, k, v))",
            OK,
        )
    )
    add(("fwd lse", "out, l = fk.flash_attn_func(q, k, v, return_lse=True); close(l, numpy_attention(q, k, v)[1])", OK))
    add(
        (
            "fwd window hides all keys",
            "close(fk.flash_attn_func(q[:, :2], k, v, window_size=(0, 0), causal=True), attn(q[:, :2], k, v, window=(0, 0), causal=True))",
            OK,
        )
    )
    add(
        (
            "sdpa",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)), attn(q, k, v).swapaxes(1, 2))",
            OK,
        )
    )
    add(
        (
            "sdpa is_causal np.bool_",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=np.bool_(True)), attn(q, k, v, causal=True).swapaxes(1, 2))",
            OK,
        )
    )
    add(
        (
            "sdpa gqa",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k1.swapaxes(1, 2), v1.swapaxes(1, 2), enable_gqa=True), attn(q, k1, v1).swapaxes(1, 2))",
            OK,
        )
    )
    add(
        (
            "sdpa scale",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), scale=0.3), attn(q, k, v, scale=0.3).swapaxes(1, 2))",
            OK,
        )
    )
    # Bad arrays.
    bad_arrays = {
        "rank 3": "q[0]",
        "rank 5": "q[None]",
        "rank 0": "np.float32(1)",
        "float64": "q.astype(np.float64)",
        "int32": "q.astype(np.int32)",
        "bool": "q > 0",
        "complex64": "q.astype(np.complex64)",
        "list": "q.tolist()",
        "None": "None",
        "str": "'q'",
        "float": "1.0",
        "empty seq": "q[:, :0]",
        "empty batch": "q[:0]",
        "empty heads": "q[:, :, :0]",
        "empty head_dim": "q[..., :0]",
        "head_dim 7": "q[..., :7]",
        "head_dim 512": "randn(1, 8, 2, 512)",
        "last stride 2": "randn(1, 8, 2, 32)[..., ::2]",
        "negative stride seq": "q[:, ::-1]",
        "negative stride head_dim": "q[..., ::-1]",
        "zero stride head_dim": "np.broadcast_to(q[..., :1], q.shape)",
        "heads not a multiple": "randn(1, 8, 3, 16)",
        "batch mismatch": "randn(2, 8, 2, 16)",
        "head_dim mismatch": "randn(1, 8, 2, 32)",
        "matrix": "np.matrix(np.ones((2, 2), np.float32))",
    }
    for what, expr in bad_arrays.items():
        for arg in ("q", "k"):
            call = f"fk.flash_attn_func({expr}, k, v)" if arg == "q" else f"fk.flash_attn_func(q, {expr}, v)"
            if what in ("heads not a multiple",) and arg == "q":
                call = "fk.flash_attn_func(randn(1, 8, 3, 16), k, v)"
            add((f"fwd {arg} {what}", call, REJECT))
    add(("fwd k and v shapes differ", "fk.flash_attn_func(q, k, v[:, :4])", REJECT))
    add(("fwd q, k dtypes differ", "fk.flash_attn_func(q, k.astype(np.float16), v)", REJECT))
    # Bad options.
    for val in [
        "(-2, 0)",
        "(0, -2)",
        "(1,)",
        "(1, 2, 3)",
        "None",
        "1",
        "'ab'",
        "(1.5, 0)",
        "(True, 0)",
        "(0, None)",
        f"({-(2**63)}, 0)",
        "(np.float32(1), 0)",
    ]:
        add((f"fwd window_size={val}", f"fk.flash_attn_func(q, k, v, window_size={val})", REJECT))
    for val in BAD_FLOATS + ["'a'", "True", "[1.0]", "1j", "10**400", "-0.0"]:
        add((f"fwd softmax_scale={val}", f"fk.flash_attn_func(q, k, v, softmax_scale={val})", REJECT))
        add((f"sdpa scale={val}", f"fk.scaled_dot_product_attention(q, k, v, scale={val})", REJECT))
    for val in ["'no'", "1", "0", "None", "1.0", "[True]", "np.array([True, False])"]:
        add((f"fwd causal={val}", f"fk.flash_attn_func(q, k, v, causal={val})", REJECT))
        add((f"sdpa is_causal={val}", f"fk.scaled_dot_product_attention(q, k, v, is_causal={val})", REJECT))
        add((f"fwd return_lse={val}", f"fk.flash_attn_func(q, k, v, return_lse={val})", REJECT))
    for val in ["0.1", "1", "'a'", "None", "float('nan')", "np.array([0.0, 0.0])"]:
        add((f"fwd dropout_p={val}", f"fk.flash_attn_func(q, k, v, dropout_p={val})", REJECT))
    add(("sdpa attn_mask", "fk.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((8, 8), bool))", REJECT))
    add(
        (
            "sdpa gqa without enable_gqa",
            "fk.scaled_dot_product_attention(q.swapaxes(1, 2), k1.swapaxes(1, 2), v1.swapaxes(1, 2))",
            REJECT,
        )
    )
    add(("sdpa enable_gqa='yes'", "fk.scaled_dot_product_attention(q, k, v, enable_gqa='yes')", REJECT))
    add(("fwd unknown keyword", "fk.flash_attn_func(q, k, v, windows=(1, 1))", REJECT))
    return c


def backward_cases():
    c = []
    add = c.append
    for causal in (False, True):
        add(
            (
                f"bwd causal={causal}",
                f"""
                o2, l2 = fk.flash_attn_func(q, k, v, causal={causal}, return_lse=True)
                got = fk.attention_backward(q, k, v, o2, l2, dout, causal={causal})
                for g, r in zip(got, attn_grads(q, k, v, dout, causal={causal})):
                    close(g, r, 1e-4)
                """,
                OK,
            )
        )
    add(
        (
            "bwd gqa window",
            """
            o2, l2 = fk.flash_attn_func(q, k1, v1, window_size=(2, 1), return_lse=True)
            got = fk.attention_backward(q, k1, v1, o2, l2, dout, window_size=(2, 1))
            for g, r in zip(got, attn_grads(q, k1, v1, dout, window=(2, 1))):
                close(g, r, 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "bwd huge window",
            f"""
            got = fk.attention_backward(q, k, v, o, lse, dout, window_size=({2**70}, {2**63}))
            for g, r in zip(got, attn_grads(q, k, v, dout)):
                close(g, r, 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "bwd broadcast dout rows",
            "d1 = np.broadcast_to(dout[:, :1], dout.shape); got = fk.attention_backward(q, k, v, o, lse, d1); [close(g, r, 1e-4) for g, r in zip(got, attn_grads(q, k, v, d1))]",
            OK,
        )
    )
    # numpy arrays need a unit-stride last dimension (documented; torch gradients are copied).
    add(
        (
            "bwd fully broadcast dout",
            "fk.attention_backward(q, k, v, o, lse, np.broadcast_to(np.float32(1), q.shape))",
            REJECT,
        )
    )
    for name, expr in {
        "lse float64": "lse.astype(np.float64)",
        "lse float16": "lse.astype(np.float16)",
        "lse wrong shape": "lse[:, :, :4]",
        "lse rank 2": "lse[0]",
        "lse None": "None",
        "lse list": "lse.tolist()",
    }.items():
        add((f"bwd {name}", f"fk.attention_backward(q, k, v, o, {expr}, dout)", REJECT))
    for name, expr in {
        "out wrong shape": "fk.attention_backward(q, k, v, o[:, :4], lse, dout)",
        "dout wrong shape": "fk.attention_backward(q, k, v, o, lse, dout[:, :4])",
        "dout float16": "fk.attention_backward(q, k, v, o, lse, dout.astype(np.float16))",
        "dout int": "fk.attention_backward(q, k, v, o, lse, dout.astype(np.int32))",
        "out None": "fk.attention_backward(q, k, v, None, lse, dout)",
        "q empty": "fk.attention_backward(q[:, :0], k, v, o, lse, dout)",
        "scale nan": "fk.attention_backward(q, k, v, o, lse, dout, softmax_scale=float('nan'))",
        "causal str": "fk.attention_backward(q, k, v, o, lse, dout, causal='yes')",
        "window bad": "fk.attention_backward(q, k, v, o, lse, dout, window_size=(-5, 0))",
        "cu_seqlens one of two": "fk.attention_backward(pq, pk, pv, o[0], lse[0], dout[0], cu_seqlens_q=cu)",
    }.items():
        add((f"bwd {name}", expr, REJECT))
    # Varlen.
    add(
        (
            "varlen fwd+bwd",
            """
            out, l = fk.flash_attn_varlen_func(pq, pk, pv, cu, cu, 5, 5, causal=True, return_lse=True)
            for s0, s1 in ((0, 3), (3, 8)):
                close(out[s0:s1], attn(pq[None, s0:s1], pk[None, s0:s1], pv[None, s0:s1], causal=True)[0])
            g = fk.attention_backward(pq, pk, pv, out, l, pq, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
            for s0, s1 in ((0, 3), (3, 8)):
                ref = attn_grads(pq[None, s0:s1], pk[None, s0:s1], pv[None, s0:s1], pq[None, s0:s1], causal=True)
                for got, r in zip(g, ref):
                    close(got[s0:s1], r[0], 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "varlen list offsets",
            "close(fk.flash_attn_varlen_func(pq, pk, pv, [0, 8], [0, 8], 8, 8), attn(pq[None], pk[None], pv[None])[0])",
            OK,
        )
    )
    add(
        (
            "varlen empty sequence",
            "out = fk.flash_attn_varlen_func(pq, pk, pv, [0, 0, 8], [0, 0, 8], 8, 8); close(out, attn(pq[None], pk[None], pv[None])[0])",
            OK,
        )
    )
    add(("varlen huge max_seqlen", f"fk.flash_attn_varlen_func(pq, pk, pv, cu, cu, {2**70}, {2**64})", OK))
    for name, (cq, ck, mq) in {
        "decreasing": ("[0, 5, 3]", "cu", "8"),
        "not from 0": ("[1, 8]", "[0, 8]", "8"),
        "past the end": ("[0, 9]", "[0, 8]", "9"),
        "short of the end": ("[0, 7]", "[0, 8]", "8"),
        "one offset": ("[0]", "[0]", "8"),
        "empty": ("[]", "[]", "8"),
        "lengths differ": ("[0, 8]", "cu", "8"),
        "int64 array": ("cu.astype(np.int64)", "cu", "8"),
        "float array": ("cu.astype(np.float32)", "cu", "8"),
        "2-D array": ("cu[None]", "cu", "8"),
        "2**31 offset": (f"[0, {2**31}]", "[0, 8]", "8"),
        "2**70 offset": (f"[0, {2**70}]", "[0, 8]", "8"),
        "negative offset": ("[0, -3]", "[0, 8]", "8"),
        "strings": ("['0', '8']", "[0, 8]", "8"),
        "None": ("None", "cu", "8"),
        "max_seqlen too small": ("cu", "cu", "2"),
        "max_seqlen negative": ("cu", "cu", "-1"),
        "max_seqlen float": ("cu", "cu", "5.0"),
        "max_seqlen None": ("cu", "cu", "None"),
        "max_seqlen bool": ("cu", "cu", "True"),
    }.items():
        add((f"varlen {name}", f"fk.flash_attn_varlen_func(pq, pk, pv, {cq}, {ck}, {mq}, 8)", REJECT))
    add(("varlen q rank 4", "fk.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)", REJECT))
    return c


def longformer_cases():
    c = []
    add = c.append
    # Valid: a window covering the sequence without globals is dense attention.
    add(("lf window >= N is dense", "close(fk.longformer_attention(q, k, v, 8), attn(q, k, v))", OK))
    add(
        (
            "lf causal window >= N",
            "close(fk.longformer_attention(q, k, v, 8, causal=True), attn(q, k, v, causal=True))",
            OK,
        )
    )
    for big in HUGE_INTS:
        add((f"lf window {big}", f"close(fk.longformer_attention(q, k, v, {big}), attn(q, k, v))", OK))
        add(
            (
                f"lf dilation {big}",
                f"close(fk.longformer_attention(q, k, v, 1, dilation={big}), fk.longformer_attention(q, k, v, 1, dilation=8))",
                OK,
            )
        )
    add(("lf window 0 is self-attention", "close(fk.longformer_attention(q, k, v, 0), v)", OK))
    add(
        (
            "lf all global is dense",
            "close(fk.longformer_attention(q, k, v, 0, global_tokens=np.ones((1, 8), bool)), attn(q, k, v))",
            OK,
        )
    )
    add(
        (
            "lf global lists",
            "a = fk.longformer_attention(q, k, v, 1, global_tokens=[[0, 5]]); m = np.zeros((1, 8), bool); m[0, [0, 5]] = True; close(a, fk.longformer_attention(q, k, v, 1, global_tokens=m), 0)",
            OK,
        )
    )
    add(("lf dilation per head", "fk.longformer_attention(q, k, v, 1, dilation=[1, 2])", OK))
    add(
        (
            "lf padding mask",
            "m = np.zeros((1, 8), bool); m[0, 6:] = True; out = fk.longformer_attention(q, k, v, 8, padding_mask=m); close(out[:, :6], attn(q[:, :6], k[:, :6], v[:, :6])); assert not out[:, 6:].any()",
            OK,
        )
    )
    add(("lf global_qkv", "fk.longformer_attention(q, k, v, 1, global_tokens=[[2]], global_qkv=(q, k, v))", OK))
    add(
        (
            "lf backward dense",
            """
            out, l = fk.longformer_attention(q, k, v, 8, return_lse=True)
            g = fk.longformer_attention_backward(q, k, v, out, l, dout, 8)
            for a, r in zip(g, attn_grads(q, k, v, dout)):
                close(a, r, 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "lf backward global_qkv",
            "out, l = fk.longformer_attention(q, k, v, 1, global_tokens=[[2]], global_qkv=(q, k, v), return_lse=True); g = fk.longformer_attention_backward(q, k, v, out, l, dout, 1, global_tokens=[[2]], global_qkv=(q, k, v)); assert len(g) == 6",
            OK,
        )
    )
    for name, expr in {
        "window -1": "fk.longformer_attention(q, k, v, -1)",
        "window 1.5": "fk.longformer_attention(q, k, v, 1.5)",
        "window None": "fk.longformer_attention(q, k, v, None)",
        "window True": "fk.longformer_attention(q, k, v, True)",
        "window -2**63": f"fk.longformer_attention(q, k, v, {-(2**63)})",
        "dilation 0": "fk.longformer_attention(q, k, v, 1, dilation=0)",
        "dilation -1": "fk.longformer_attention(q, k, v, 1, dilation=-1)",
        "dilation empty": "fk.longformer_attention(q, k, v, 1, dilation=[])",
        "dilation 3 heads": "fk.longformer_attention(q, k, v, 1, dilation=[1, 1, 1])",
        "dilation float": "fk.longformer_attention(q, k, v, 1, dilation=1.5)",
        "dilation str": "fk.longformer_attention(q, k, v, 1, dilation='1')",
        "causal str": "fk.longformer_attention(q, k, v, 1, causal='no')",
        "scale 0": "fk.longformer_attention(q, k, v, 1, scale=0.0)",
        "scale 1e-50": "fk.longformer_attention(q, k, v, 1, scale=1e-50)",
        "scale nan": "fk.longformer_attention(q, k, v, 1, scale=float('nan'))",
        "scale str": "fk.longformer_attention(q, k, v, 1, scale='a')",
        "global index 8": "fk.longformer_attention(q, k, v, 1, global_tokens=[[8]])",
        "global index -9": "fk.longformer_attention(q, k, v, 1, global_tokens=[[-9]])",
        "global index 2**70": f"fk.longformer_attention(q, k, v, 1, global_tokens=[[{2**70}]])",
        "global duplicate": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1, 1]])",
        "global bool list": "fk.longformer_attention(q, k, v, 1, global_tokens=[[True, False]])",
        "global two sequences for batch 1": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1], [2]])",
        "global mask wrong shape": "fk.longformer_attention(q, k, v, 1, global_tokens=np.ones((1, 7), bool))",
        "global mask float": "fk.longformer_attention(q, k, v, 1, global_tokens=np.ones((1, 8), np.float32))",
        "global str": "fk.longformer_attention(q, k, v, 1, global_tokens='all')",
        "global and padded": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], padding_mask=np.ones((1, 8), bool))",
        "padding mask rank 3": "fk.longformer_attention(q, k, v, 1, padding_mask=np.ones((1, 8, 1), bool))",
        "global_qkv two": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], global_qkv=(q, k))",
        "global_qkv wrong shape": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], global_qkv=(q[:, :4], k, v))",
        "global_qkv None inside": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], global_qkv=(q, None, v))",
        "gqa": "fk.longformer_attention(q, k1, v1, 1)",
        "q rank 3": "fk.longformer_attention(q[0], k[0], v[0], 1)",
        "q float64": "fk.longformer_attention(q.astype(np.float64), k, v, 1)",
        "empty": "fk.longformer_attention(q[:, :0], k[:, :0], v[:, :0], 1)",
        "negative stride": "fk.longformer_attention(q[:, ::-1], k, v, 1)",
        "bwd lse float64": "fk.longformer_attention_backward(q, k, v, o, lse.astype(np.float64), dout, 1)",
        "bwd dout wrong shape": "fk.longformer_attention_backward(q, k, v, o, lse, dout[:, :4], 1)",
        "bwd out None": "fk.longformer_attention_backward(q, k, v, None, lse, dout, 1)",
        "return_lse str": "fk.longformer_attention(q, k, v, 1, return_lse='yes')",
    }.items():
        add((f"lf {name}", expr, REJECT))
    return c
