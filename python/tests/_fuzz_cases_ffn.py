# ruff: noqa: E501  (the case table: one-line code snippets, kept whole for reading)
"""Fuzz cases (name, code, expectation) of the fused feed-forward block (issue 14):
feed_forward / feed_forward_backward on numpy arrays (valid calls checked against float64
numpy, bad dtypes, shapes, strides, gates and biases, bools as ints, huge and empty
sizes), and torch CPU tensors (autograd, the FeedForward module, mixed frameworks); run by
test_fuzz.py, each group with FFN_SETUP after the harness' prelude."""

from _fuzz import HUGE_INTS, NEGATIVE_INTS, OK, REJECT, REJECT_OR_OOM

# What every FFN group's child defines: inputs (tokens 5, d_model 8, d_hidden 12) and the
# float64 definition, h rounded once to the dtype as the op documents.
FFN_SETUP = r'''
fx, fdy = randn(5, 8), randn(5, 8)
fw1, fw2, fw3 = randn(12, 8) / 3, randn(8, 12) / 3, randn(12, 8) / 3
fb1, fb2, fb3 = randn(12), randn(8), randn(12)
_erf = np.vectorize(math.erf, otypes=[np.float64])
_C = math.sqrt(2 / math.pi)

def _act(a, u):
    if a == "relu":
        return np.maximum(u, 0), (u > 0).astype(np.float64)
    if a == "gelu":
        pdf = np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + _erf(u / math.sqrt(2)))
        return u * cdf, cdf + u * pdf
    if a == "gelu_tanh":
        t = np.tanh(_C * (u + 0.044715 * u**3))
        return 0.5 * u * (1 + t), 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * _C * (1 + 3 * 0.044715 * u * u)
    s = 1 / (1 + np.exp(-u))
    return u * s, s * (1 + u * (1 - s))

def _f64(*ts):
    return [None if t is None else np.asarray(t, np.float64) for t in ts]

def _hidden(x, w1, b1, w3, b3, activation, dtype):
    u = x @ w1.T + (0 if b1 is None else b1)
    g = 1.0 if w3 is None else x @ w3.T + (0 if b3 is None else b3)
    a, da = _act(activation, u)
    return u, g, a, da, (a * g).astype(dtype).astype(np.float64)

def ref_ffn(x, w1, w2, b1=None, b2=None, w3=None, b3=None, activation="gelu", residual=False):
    """float64 y of x (..., d_model)."""
    dtype = np.asarray(x).dtype
    lead = np.shape(x)[:-1]
    x, w1, w2, b1, b2, w3, b3 = _f64(x, w1, w2, b1, b2, w3, b3)
    x = x.reshape(-1, x.shape[-1])
    h = _hidden(x, w1, b1, w3, b3, activation, dtype)[-1]
    y = h @ w2.T + (0 if b2 is None else b2) + (x if residual else 0)
    return y.reshape(lead + (w2.shape[0],))

def ref_ffn_grads(dy, x, w1, w2, b1=None, b2=None, w3=None, b3=None, activation="gelu", residual=False):
    """float64 (dx, dw1, dw2, db1, db2, dw3, db3), None for inputs not given."""
    dtype = np.asarray(x).dtype
    shape = np.shape(x)
    dy, x, w1, w2, b1, b2, w3, b3 = _f64(dy, x, w1, w2, b1, b2, w3, b3)
    x, dy = x.reshape(-1, shape[-1]), dy.reshape(-1, shape[-1])
    u, g, a, da, h = _hidden(x, w1, b1, w3, b3, activation, dtype)
    dh = dy @ w2
    du, dg = dh * g * da, dh * a
    dx = du @ w1 + (0 if w3 is None else dg @ w3) + (dy if residual else 0)
    opt = lambda given, v: None if given is None else v
    return (dx.reshape(shape), du.T @ x, dy.T @ h, opt(b1, du.sum(0)), opt(b2, dy.sum(0)), opt(w3, dg.T @ x), opt(b3, dg.sum(0)))

def close_grads(got, want, tol=2e-5):
    assert len(got) == len(want) == 7
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), (i, g is None, w is None)
        if g is not None:
            close(g, w, tol)
'''

# The torch groups also get torch copies of them (never modified: the cases that set
# requires_grad take fresh ones from ffn_tensors()).
FFN_TORCH_SETUP = (
    FFN_SETUP
    + r"""
def ffn_tensors():
    return tuple(torch.from_numpy(a.copy()) for a in (fx, fw1, fw2, fw3, fb1, fb2, fb3))
tx, tw1, tw2, tw3, tb1, tb2, tb3 = ffn_tensors()
"""
)

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def _args(gated, bias):
    """(positional/keyword text of a call, of the reference) for the shared inputs."""
    b = "fb1, fb2" if bias else "None, None"
    kw = ", w3=fw3" + (", b3=fb3" if bias else "") if gated else ""
    return f"fx, fw1, fw2, {b}{kw}"


def ffn_cases():
    c = []
    add = c.append
    # Every activation, gated or not, with or without biases and the residual.
    for act in ACTIVATIONS:
        for gated in (False, True):
            for bias in (False, True):
                for res in (False, True):
                    a = _args(gated, bias) + f", activation={act!r}, residual={res}"
                    name = f"ffn {act}{' gated' if gated else ''}{' bias' if bias else ''}{' residual' if res else ''}"
                    add((name, f"close(fk.feed_forward({a}), ref_ffn({a}), 1e-5)", OK))
                    if bias != res:  # half of them backward too
                        add(
                            (
                                f"{name} backward",
                                f"close_grads(fk.feed_forward_backward(fdy, {a}), ref_ffn_grads(fdy, {a}), 1e-5)",
                                OK,
                            )
                        )
    for name, code in {
        "only b1": "close(fk.feed_forward(fx, fw1, fw2, fb1), ref_ffn(fx, fw1, fw2, fb1))",
        "only b2": "close(fk.feed_forward(fx, fw1, fw2, b2=fb2), ref_ffn(fx, fw1, fw2, b2=fb2))",
        "gated only b3": "close(fk.feed_forward(fx, fw1, fw2, w3=fw3, b3=fb3), ref_ffn(fx, fw1, fw2, w3=fw3, b3=fb3))",
        "3-D x": "xs = randn(2, 3, 8); y = fk.feed_forward(xs, fw1, fw2, fb1); assert y.shape == (2, 3, 8); close(y, ref_ffn(xs, fw1, fw2, fb1))",
        "4-D x backward": "xs, d = randn(2, 1, 3, 8), randn(2, 1, 3, 8); g = fk.feed_forward_backward(d, xs, fw1, fw2, w3=fw3); assert g[0].shape == xs.shape; close_grads(g, ref_ffn_grads(d, xs, fw1, fw2, w3=fw3))",
        "1-D x (one token)": "y = fk.feed_forward(fx[0], fw1, fw2); assert y.shape == (8,); close(y, ref_ffn(fx[:1], fw1, fw2)[0])",
        "one token, d_model 1, d_hidden 1": "a, b_, c_ = randn(1, 1), randn(1, 1), randn(1, 1); close(fk.feed_forward(a, b_, c_, residual=True), ref_ffn(a, b_, c_, residual=True))",
        "row-strided x": "xs = randn(10, 8)[::2]; close(fk.feed_forward(xs, fw1, fw2), ref_ffn(xs, fw1, fw2))",
        "padded rows of x": "xs = randn(5, 20)[:, 4:12]; close(fk.feed_forward(xs, fw1, fw2, residual=True), ref_ffn(xs, fw1, fw2, residual=True))",
        "row-strided weights": "w1s, w2s = randn(12, 16)[:, :8], randn(8, 24)[:, ::1][:, 6:18]; close(fk.feed_forward(fx, w1s, w2s), ref_ffn(fx, w1s, w2s))",
        "broadcast rows of x": "xb = np.broadcast_to(fx[:1], fx.shape); close(fk.feed_forward(xb, fw1, fw2, fb1, fb2), ref_ffn(xb, fw1, fw2, fb1, fb2))",
        "broadcast rows of dy": "db = np.broadcast_to(fdy[:1], fdy.shape); close_grads(fk.feed_forward_backward(db, fx, fw1, fw2, fb1), ref_ffn_grads(db, fx, fw1, fw2, fb1))",
        "float16": "h = [t.astype(np.float16) for t in (fx, fw1, fw2, fb1, fb2)]; y = fk.feed_forward(*h); assert y.dtype == np.float16; close(y, ref_ffn(*h), 2e-3)",
        "float16 gated backward": "h = [t.astype(np.float16) for t in (fdy, fx, fw1, fw2)]; g = fk.feed_forward_backward(*h, w3=fw3.astype(np.float16), activation='silu'); assert all(t is None or t.dtype == np.float16 for t in g); close_grads(g, ref_ffn_grads(*h, w3=fw3.astype(np.float16), activation='silu'), 4e-3)",
        "activation np.str_": "close(fk.feed_forward(fx, fw1, fw2, activation=np.str_('relu')), ref_ffn(fx, fw1, fw2, activation='relu'))",
        "residual np.bool_": "close(fk.feed_forward(fx, fw1, fw2, residual=np.bool_(True)), ref_ffn(fx, fw1, fw2, residual=True))",
        "large values (no overflow in float32)": "xl = fx * 1e3; close(fk.feed_forward(xl, fw1, fw2, activation='silu'), ref_ffn(xl, fw1, fw2, activation='silu'), 1e-5)",
        "nan propagates": "xn = fx.copy(); xn[2, 3] = np.nan; y = fk.feed_forward(xn, fw1, fw2, activation='relu'); assert np.isnan(y[2]).all() and not np.isnan(np.delete(y, 2, 0)).any()",
        "inputs untouched": "keep = [t.copy() for t in (fx, fw1, fw2, fb1)]; fk.feed_forward_backward(fdy, fx, fw1, fw2, fb1); assert all(np.array_equal(a, b_) for a, b_ in zip(keep, (fx, fw1, fw2, fb1)))",
    }.items():
        add((f"ffn {name}", code, OK))
    # Seeded random valid calls.
    for seed in range(24):
        add(
            (
                f"ffn random #{seed}",
                f"""
                r = np.random.default_rng({seed})
                t, dm, dh = (int(v) for v in r.integers(1, 9, 3))
                act = {ACTIVATIONS!r}[int(r.integers(4))]
                gated, bias, res = (bool(v) for v in r.integers(0, 2, 3))
                mk = lambda *s: r.standard_normal(s).astype(np.float32)
                xr, dyr = mk(t, dm), mk(t, dm)
                ws = dict(w1=mk(dh, dm), w2=mk(dm, dh), b1=mk(dh) if bias else None, b2=mk(dm) if bias else None, w3=mk(dh, dm) if gated else None, b3=mk(dh) if gated and bias else None, activation=act, residual=res)
                close(fk.feed_forward(xr, **ws), ref_ffn(xr, **ws), 1e-5)
                close_grads(fk.feed_forward_backward(dyr, xr, **ws), ref_ffn_grads(dyr, xr, **ws), 1e-5)
                """,
                OK,
            )
        )
    for name, expr in {
        # dtypes (bools are not numbers here)
        "float64": "fk.feed_forward(fx.astype(np.float64), fw1.astype(np.float64), fw2.astype(np.float64))",
        "int32": "fk.feed_forward(fx.astype(np.int32), fw1.astype(np.int32), fw2.astype(np.int32))",
        "bool arrays": "fk.feed_forward(fx > 0, fw1 > 0, fw2 > 0)",
        "complex64": "fk.feed_forward(fx.astype(np.complex64), fw1.astype(np.complex64), fw2.astype(np.complex64))",
        "w1 float16": "fk.feed_forward(fx, fw1.astype(np.float16), fw2)",
        "w2 float64": "fk.feed_forward(fx, fw1, fw2.astype(np.float64))",
        "w3 float16": "fk.feed_forward(fx, fw1, fw2, w3=fw3.astype(np.float16))",
        "b1 float16": "fk.feed_forward(fx, fw1, fw2, fb1.astype(np.float16))",
        "b2 int32": "fk.feed_forward(fx, fw1, fw2, None, fb2.astype(np.int32))",
        "b3 bool": "fk.feed_forward(fx, fw1, fw2, w3=fw3, b3=fb3 > 0)",
        # shapes
        "w1 wrong d_model": "fk.feed_forward(fx, randn(12, 7), fw2)",
        "w2 wrong d_model": "fk.feed_forward(fx, fw1, randn(7, 12))",
        "w2 wrong d_hidden": "fk.feed_forward(fx, fw1, randn(8, 11))",
        "w2 not transposed": "fk.feed_forward(fx, fw1, fw1)",
        "w1 rank 3": "fk.feed_forward(fx, fw1[None], fw2)",
        "w1 rank 1": "fk.feed_forward(fx, fw1[0], fw2)",
        "w2 rank 3": "fk.feed_forward(fx, fw1, fw2[..., None])",
        "gate wrong d_hidden": "fk.feed_forward(fx, fw1, fw2, w3=randn(11, 8))",
        "gate wrong d_model": "fk.feed_forward(fx, fw1, fw2, w3=randn(12, 9))",
        "gate rank 3": "fk.feed_forward(fx, fw1, fw2, w3=fw3[None])",
        "gate rank 1": "fk.feed_forward(fx, fw1, fw2, w3=fb3)",
        "gate transposed": "fk.feed_forward(fx, fw1, fw2, w3=fw2)",
        "b1 wrong length": "fk.feed_forward(fx, fw1, fw2, randn(11))",
        "b2 wrong length": "fk.feed_forward(fx, fw1, fw2, None, randn(12))",
        "b1 given d_model long": "fk.feed_forward(fx, fw1, fw2, fb2)",
        "b3 wrong length": "fk.feed_forward(fx, fw1, fw2, w3=fw3, b3=randn(8))",
        "b3 without w3": "fk.feed_forward(fx, fw1, fw2, b3=fb3)",
        "b1 rank 2": "fk.feed_forward(fx, fw1, fw2, fb1[None])",
        "b2 rank 0": "fk.feed_forward(fx, fw1, fw2, None, np.array(1.0, np.float32))",
        "x d_model mismatch": "fk.feed_forward(randn(5, 9), fw1, fw2)",
        "x scalar": "fk.feed_forward(np.float32(1), fw1, fw2)",
        "x rank 0 array": "fk.feed_forward(np.array(1.0, np.float32), fw1, fw2)",
        # empty sizes
        "empty tokens": "fk.feed_forward(fx[:0], fw1, fw2)",
        "empty tokens 3-D": "fk.feed_forward(np.zeros((2, 0, 8), np.float32), fw1, fw2)",
        "empty d_model": "fk.feed_forward(fx[:, :0], fw1[:, :0], fw2[:0])",
        "empty d_hidden": "fk.feed_forward(fx, fw1[:0], fw2[:, :0])",
        "empty bias": "fk.feed_forward(fx, fw1, fw2, fb1[:0])",
        "backward empty tokens": "fk.feed_forward_backward(fdy[:0], fx[:0], fw1, fw2)",
        # strides the op does not take (the last dimension must be unit-stride; numpy
        # views of another layout are refused, not copied)
        "negative row stride": "fk.feed_forward(fx[::-1], fw1, fw2)",
        "column-major x": "fk.feed_forward(np.asfortranarray(fx), fw1, fw2)",
        "column-major w1": "fk.feed_forward(fx, np.asfortranarray(fw1), fw2)",
        "strided bias": "fk.feed_forward(fx, fw1, fw2, randn(24)[::2])",
        "broadcast bias": "fk.feed_forward(fx, fw1, fw2, np.broadcast_to(np.float32(1), (12,)))",
        "broadcast dy (all strides 0)": "fk.feed_forward_backward(np.broadcast_to(np.float32(1), fx.shape), fx, fw1, fw2)",
        # options
        "activation tanh": "fk.feed_forward(fx, fw1, fw2, activation='tanh')",
        "activation GELU": "fk.feed_forward(fx, fw1, fw2, activation='GELU')",
        "activation empty": "fk.feed_forward(fx, fw1, fw2, activation='')",
        "activation None": "fk.feed_forward(fx, fw1, fw2, activation=None)",
        "activation True": "fk.feed_forward(fx, fw1, fw2, activation=True)",
        "activation bytes": "fk.feed_forward(fx, fw1, fw2, activation=b'gelu')",
        "activation list": "fk.feed_forward(fx, fw1, fw2, activation=['gelu'])",
        "activation array": "fk.feed_forward(fx, fw1, fw2, activation=np.array(['relu', 'gelu']))",
        "activation nul": "fk.feed_forward(fx, fw1, fw2, activation='gelu\\x00')",
        "residual 1": "fk.feed_forward(fx, fw1, fw2, residual=1)",
        "residual 0": "fk.feed_forward(fx, fw1, fw2, residual=0)",
        "residual None": "fk.feed_forward(fx, fw1, fw2, residual=None)",
        "residual 'yes'": "fk.feed_forward(fx, fw1, fw2, residual='yes')",
        "residual 1.0": "fk.feed_forward(fx, fw1, fw2, residual=1.0)",
        "residual array": "fk.feed_forward(fx, fw1, fw2, residual=np.array([True]))",
        "backward residual 1": "fk.feed_forward_backward(fdy, fx, fw1, fw2, residual=1)",
        "backward activation bad": "fk.feed_forward_backward(fdy, fx, fw1, fw2, activation='swiglu')",
        # not arrays
        "x None": "fk.feed_forward(None, fw1, fw2)",
        "x list": "fk.feed_forward(fx.tolist(), fw1, fw2)",
        "x tuple": "fk.feed_forward(tuple(fx.tolist()), fw1, fw2)",
        "w1 None": "fk.feed_forward(fx, None, fw2)",
        "w2 str": "fk.feed_forward(fx, fw1, 'w2')",
        "w3 int": "fk.feed_forward(fx, fw1, fw2, w3=3)",
        "b1 float": "fk.feed_forward(fx, fw1, fw2, 1.5)",
        "b2 list": "fk.feed_forward(fx, fw1, fw2, None, fb2.tolist())",
        "x memoryview": "fk.feed_forward(memoryview(fx), fw1, fw2)",
        # the backward's grad_output
        "backward dy wrong shape": "fk.feed_forward_backward(fdy[:4], fx, fw1, fw2)",
        "backward dy transposed shape": "fk.feed_forward_backward(randn(8, 5), fx, fw1, fw2)",
        "backward dy flattened": "fk.feed_forward_backward(fdy.ravel(), fx, fw1, fw2)",
        "backward dy extra dim": "fk.feed_forward_backward(fdy[None], fx, fw1, fw2)",
        "backward dy float16": "fk.feed_forward_backward(fdy.astype(np.float16), fx, fw1, fw2)",
        "backward dy float64": "fk.feed_forward_backward(fdy.astype(np.float64), fx, fw1, fw2)",
        "backward dy None": "fk.feed_forward_backward(None, fx, fw1, fw2)",
        "backward dy list": "fk.feed_forward_backward(fdy.tolist(), fx, fw1, fw2)",
        "backward dy column-major": "fk.feed_forward_backward(np.asfortranarray(fdy), fx, fw1, fw2)",
        "backward w3 wrong shape": "fk.feed_forward_backward(fdy, fx, fw1, fw2, w3=randn(12, 7))",
        "backward b3 without w3": "fk.feed_forward_backward(fdy, fx, fw1, fw2, b3=fb3)",
        "backward b2 wrong length": "fk.feed_forward_backward(fdy, fx, fw1, fw2, None, randn(9))",
        # huge sizes: broadcast rows only (a unit-stride row of 2**40 elements cannot exist)
        # 9 * 2**57 elements: past what any host buffer may hold (TooLarge, nothing allocated)
        "9 * 2**57 broadcast elements": f"h = np.float16; fk.feed_forward(np.broadcast_to(np.zeros((1, 9), h), ({2**57}, 9)), np.zeros((4, 9), h), np.zeros((9, 4), h))",
    }.items():
        add((f"ffn {name}", expr, REJECT))
    for name, expr in {
        "2**40 broadcast tokens": f"fk.feed_forward(np.broadcast_to(fx[:1], ({2**40}, 8)), fw1, fw2)",
        "2**28 broadcast tokens": f"fk.feed_forward(np.broadcast_to(fx[:1], ({2**28}, 8)), fw1, fw2)",
        "2**31 broadcast tokens, 3-D": f"fk.feed_forward(np.broadcast_to(fx[:1], ({2**16}, {2**15}, 8)), fw1, fw2)",
        "backward 2**40 broadcast tokens": f"xb = np.broadcast_to(fx[:1], ({2**40}, 8)); fk.feed_forward_backward(xb, xb, fw1, fw2)",
        "backward 2**28 broadcast tokens": f"xb = np.broadcast_to(fx[:1], ({2**28}, 8)); fk.feed_forward_backward(xb, xb, fw1, fw2, w3=fw3)",
    }.items():
        add((f"ffn {name}", expr, REJECT_OR_OOM))
    return c


def ffn_torch_cases():
    c = []
    add = c.append
    for act in ACTIVATIONS:
        for gated in (False, True):
            ref = _args(gated, True) + f", activation={act!r}"
            targs = ref.replace("fx", "xt").replace("fw", "tw").replace("fb", "tb")
            add(
                (
                    f"ffn torch autograd {act}{' gated' if gated else ''}",
                    f"""
                    xt, tw1, tw2, tw3, tb1, tb2, tb3 = (t.requires_grad_() for t in ffn_tensors())
                    y = fk.feed_forward({targs})
                    close(y.detach().numpy(), ref_ffn({ref}), 1e-5)
                    y.backward(torch.from_numpy(fdy))
                    want = ref_ffn_grads(fdy, {ref})
                    got = (xt.grad, tw1.grad, tw2.grad, tb1.grad, tb2.grad, tw3.grad if {gated} else None, tb3.grad if {gated} else None)
                    close_grads([None if g is None else g.numpy() for g in got], want, 1e-5)
                    """,
                    OK,
                )
            )
    for name, code in {
        "3-D x": "y = fk.feed_forward(tx.reshape(1, 5, 8), tw1, tw2); assert y.shape == (1, 5, 8); close(y.numpy(), ref_ffn(fx[None], fw1, fw2))",
        "no grad": "y = fk.feed_forward(tx, tw1, tw2, tb1); assert not y.requires_grad; close(y.numpy(), ref_ffn(fx, fw1, fw2, fb1))",
        "only x requires grad": "a = tx.clone().requires_grad_(); fk.feed_forward(a, tw1, tw2).sum().backward(); close(a.grad.numpy(), ref_ffn_grads(np.ones_like(fx), fx, fw1, fw2)[0])",
        "non-contiguous weights (copied)": "w1t = tw1.t().contiguous().t(); close(fk.feed_forward(tx, w1t, tw2).numpy(), ref_ffn(fx, fw1, fw2))",
        "bfloat16": "y = fk.feed_forward(tx.bfloat16(), tw1.bfloat16(), tw2.bfloat16()); assert y.dtype == torch.bfloat16; close(y.float().numpy(), ref_ffn(tx.bfloat16().float().numpy(), tw1.bfloat16().float().numpy(), tw2.bfloat16().float().numpy()), 1e-2)",
        "FeedForward Llama MLP": """
            torch.manual_seed(0)
            m = fk.FeedForward(8, 12, activation='silu', gated=True, bias=False)
            xt = torch.randn(2, 3, 8)
            want = m.w2(torch.nn.functional.silu(m.w1(xt)) * m.w3(xt))
            close(m(xt).detach().numpy(), want.detach().numpy(), 1e-5)
            """,
        "FeedForward GELU residual": """
            torch.manual_seed(1)
            m = fk.FeedForward(8, 32, residual=True)
            xt = torch.randn(4, 8)
            want = m.w2(torch.nn.functional.gelu(m.w1(xt))) + xt
            close(m(xt).detach().numpy(), want.detach().numpy(), 1e-5)
            """,
        "FeedForward state_dict round trip": "m = fk.FeedForward(8, 12, gated=True); m2 = fk.FeedForward(8, 12, gated=True); m2.load_state_dict(m.state_dict()); xt = torch.randn(3, 8); assert torch.equal(m(xt), m2(xt))",
    }.items():
        add((f"ffn torch {name}", code, OK))
    for name, expr in {
        "numpy x, torch weights": "fk.feed_forward(fx, tw1, tw2)",
        "torch x, numpy weights": "fk.feed_forward(tx, fw1, fw2)",
        "torch x, numpy bias": "fk.feed_forward(tx, tw1, tw2, fb1)",
        "torch x requiring grad, numpy w3": "fk.feed_forward(tx.clone().requires_grad_(), tw1, tw2, w3=fw3)",
        "backward numpy dy, torch x": "fk.feed_forward_backward(fdy, tx, tw1, tw2)",
        "float64": "fk.feed_forward(tx.double(), tw1.double(), tw2.double())",
        "int64": "fk.feed_forward(tx.long(), tw1.long(), tw2.long())",
        "bool": "fk.feed_forward(tx > 0, tw1 > 0, tw2 > 0)",
        "mixed float16 / float32": "fk.feed_forward(tx.half(), tw1, tw2)",
        "meta device": "fk.feed_forward(torch.empty(5, 8, device='meta'), tw1, tw2)",
        "w1 wrong shape": "fk.feed_forward(tx, tw1[:, :7], tw2)",
        "gate wrong shape": "fk.feed_forward(tx, tw1, tw2, w3=tw3[:11])",
        "b3 without w3": "fk.feed_forward(tx, tw1, tw2, b3=tb3)",
        "empty tokens": "fk.feed_forward(tx[:0], tw1, tw2)",
        "x scalar": "fk.feed_forward(tx[0, 0], tw1, tw2)",
        "residual 1": "fk.feed_forward(tx, tw1, tw2, residual=1)",
        "FeedForward d_model True": "fk.FeedForward(True, 4)",
        "FeedForward d_model 0": "fk.FeedForward(0, 4)",
        "FeedForward d_hidden -1": "fk.FeedForward(8, -1)",
        "FeedForward d_model 8.0": "fk.FeedForward(8.0, 4)",
        "FeedForward d_model '8'": "fk.FeedForward('8', 4)",
        "FeedForward activation tanh": "fk.FeedForward(8, 4, activation='tanh')",
        "FeedForward gated 1": "fk.FeedForward(8, 4, gated=1)",
        "FeedForward bias None": "fk.FeedForward(8, 4, bias=None)",
        "FeedForward residual 'no'": "fk.FeedForward(8, 4, residual='no')",
        "FeedForward wrong d_model input": "fk.FeedForward(8, 4)(torch.randn(3, 9))",
        "FeedForward scalar input": "fk.FeedForward(8, 4)(torch.tensor(1.0))",
        "FeedForward numpy input": "fk.FeedForward(8, 4)(fx)",
        "FeedForward load wrong shapes": "fk.FeedForward(8, 4).load_state_dict(fk.FeedForward(8, 5).state_dict())",
    }.items():
        # load_state_dict's size mismatch is torch's RuntimeError, as the module documents.
        add((f"ffn torch {name}", expr, "RuntimeError" if "load" in name else REJECT))
    for val in HUGE_INTS[2:] + NEGATIVE_INTS:
        add((f"ffn torch FeedForward d_hidden={val}", f"fk.FeedForward(8, {val})", REJECT))
    return c
