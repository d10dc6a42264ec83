"""torch CPU tensors through flashkernels' Linformer attention: autograd against a float64
torch composite (einsum projections + softmax attention), the torch.library ops (opcheck,
torch.compile fullgraph), the LinformerAttention module against a re-implementation of
lucidrains/linformer 0.2.3's forward with the same weights (and, when ``linformer`` is
installed, against a real LinformerSelfAttention whose state_dict it loads), and the
errors. Skipped without torch."""

import importlib.util
import math

import pytest

torch = pytest.importorskip("torch")

import flashkernels as fk  # noqa: E402

HAVE_LUCIDRAINS = importlib.util.find_spec("linformer") is not None
SHARINGS = {
    "per_head": ("kv", "kv"),
    "headwise": (1, 1),
    "kv_per_head": ("kv", None),
    "kv_headwise": (1, None),
    "mixed": (1, "kv"),
}


def composite(q, k, v, e, f, mask=None, scale=None):
    """Linformer attention in torch ops (float64 when the inputs are): K, V with padded
    rows zeroed, projected by E[:, :, :N], F[:, :, :N] (F = E when f is None), then dense
    softmax attention over the k projected keys (GQA by repeating K/V heads)."""
    b, n, h, d = q.shape
    hkv = k.shape[2]
    if mask is not None:
        keep = (~mask).to(k.dtype)[:, :, None, None]
        k, v = k * keep, v * keep
    ef = e[:, :, :n].expand(hkv, -1, -1)
    ff = ef if f is None else f[:, :, :n].expand(hkv, -1, -1)
    kp = torch.einsum("hjn,bnhd->bjhd", ef, k).repeat_interleave(h // hkv, dim=2)
    vp = torch.einsum("hjn,bnhd->bjhd", ff, v).repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bnhd,bjhd->bhnj", q, kp) * (d**-0.5 if scale is None else scale)
    return torch.einsum("bhnj,bjhd->bnhd", s.softmax(-1), vp)


def make(g, b, n, h, hkv, d, kproj, n_max, sharing, *, pad=False, dtype=torch.float32):
    eh, fh = (hkv if x == "kv" else x for x in SHARINGS[sharing])

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    q, k, v = r(b, n, h, d), r(b, n, hkv, d), r(b, n, hkv, d)
    e = r(eh, kproj, n_max, scale=n**-0.5)
    f = None if fh is None else r(fh, kproj, n_max, scale=n**-0.5)
    mask = None
    if pad:
        mask = torch.rand(b, n, generator=g) < 0.3
        mask[0] = False
        mask[-1] = True  # one fully padded sequence
    return q, k, v, e, f, mask


def _close(got, want, tol=2e-5):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item() if got.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def _leaves(ts):
    return [None if t is None else t.clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("sharing", list(SHARINGS))
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_autograd_matches_composite(sharing, pad):
    g = torch.Generator().manual_seed(len(sharing) * 2 + pad)
    q, k, v, e, f, mask = make(g, 3, 7, 4, 2, 8, 5, 9, sharing, pad=pad)
    ours = _leaves((q, k, v, e, f))
    ref = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, e, f)]
    out = fk.linformer_attention(*ours, key_padding_mask=mask)
    want = composite(*ref, mask)
    _close(out, want)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    want.backward(dout.double())
    for name, a, b in zip("qkvef", ours, ref):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == torch.float32, name
        _close(a.grad, b.grad, 5e-5)


def test_return_aux_and_functional_backward():
    g = torch.Generator().manual_seed(1)
    q, k, v, e, f, mask = make(g, 2, 6, 2, 1, 8, 4, 8, "headwise", pad=True)
    out, lse, kp, vp = fk.linformer_attention(q, k, v, e, f, key_padding_mask=mask, return_aux=True)
    assert lse.shape == (2, 2, 6) and lse.dtype == torch.float32 and kp.shape == (2, 4, 1, 8)
    dout = torch.randn(out.shape, generator=g)
    grads = fk.linformer_attention_backward(dout, q, k, v, e, out, lse, kp, vp, f, key_padding_mask=mask)
    ours = _leaves((q, k, v, e, f))
    fk.linformer_attention(*ours, key_padding_mask=mask).backward(dout)
    for a, b in zip(grads, ours):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=0)
    # The numpy path gives the same values.
    n = fk.linformer_attention(q.numpy(), k.numpy(), v.numpy(), e.numpy(), f.numpy(), key_padding_mask=mask.numpy())
    torch.testing.assert_close(out, torch.from_numpy(n), rtol=0, atol=0)


def test_lse_kp_vp_not_differentiable_and_no_grad():
    g = torch.Generator().manual_seed(2)
    q, k, v, e, f, _ = make(g, 1, 5, 2, 2, 8, 3, 5, "per_head")
    leaves = _leaves((q, k, v, e, f))
    out, lse, kp, vp = fk.linformer_attention(*leaves, return_aux=True)
    assert out.requires_grad and not lse.requires_grad and not kp.requires_grad and not vp.requires_grad
    with torch.no_grad():
        assert not fk.linformer_attention(*leaves).requires_grad


def test_double_backward_raises():
    g = torch.Generator().manual_seed(3)
    q, k, v, e, f, _ = make(g, 1, 5, 2, 2, 8, 3, 5, "per_head")
    q.requires_grad_()
    (gq,) = torch.autograd.grad(fk.linformer_attention(q, k, v, e, f).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


def test_custom_ops_opcheck():
    """torch.library.opcheck: schema, fake implementations and autograd registration."""
    fk.register_torch_ops()
    g = torch.Generator().manual_seed(4)
    for sharing, pad in [("per_head", True), ("kv_headwise", False), ("mixed", True)]:
        q, k, v, e, f, mask = make(g, 2, 5, 2, 1, 8, 3, 6, sharing, pad=pad)
        leaves = _leaves((q, k, v, e, f))
        torch.library.opcheck(torch.ops.flashkernels.linformer_fwd.default, (*leaves, mask, None))
        out, lse, kp, vp = torch.ops.flashkernels.linformer_fwd(q, k, v, e, f, mask, 0.5)
        dout = torch.randn(out.shape, generator=g)
        torch.library.opcheck(
            torch.ops.flashkernels.linformer_bwd.default, (dout, q, k, v, e, f, out, lse, kp, vp, mask, 0.5)
        )


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(5)
    q, k, v, e, f, mask = make(g, 2, 7, 4, 2, 8, 5, 9, "mixed", pad=True)
    leaves = _leaves((q, k, v, e, f))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, e, f)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(q, k, v, e, f, mask):
        return fk.linformer_attention(q, k, v, e, f, key_padding_mask=mask) * 2

    out = fn(*leaves, mask)
    want = composite(*ref, mask) * 2
    _close(out, want)
    out.sum().backward()
    want.sum().backward()
    for a, b in zip(leaves, ref):
        _close(a.grad, b.grad, 5e-5)


# ---------------------------------------------------------------------------------------
# The module.


def lucidrains_forward(m, x, context=None):
    """lucidrains/linformer 0.2.3's LinformerSelfAttention.forward, restated in torch ops
    on m's weights (in float64)."""
    p = {n: t.detach().double() for n, t in m.state_dict().items()}
    x = x.double()
    b, n, _ = x.shape
    h, d_h, k = m.heads, m.dim_head, m.k
    kv_input = x if context is None else context.double()
    kv_len = kv_input.shape[1]
    queries = x @ p["to_q.weight"].T
    keys = kv_input @ p["to_k.weight"].T
    values = keys if m.share_kv else kv_input @ p["to_v.weight"].T
    kv_projs = (p["proj_k"], p["proj_k"] if m.share_kv else p["proj_v"])
    kv_projs = [t[:kv_len] for t in kv_projs]
    keys, values = (torch.einsum("bnd,nk->bkd", t, pr) for t, pr in zip((keys, values), kv_projs))
    queries = queries.reshape(b, n, h, -1).transpose(1, 2)
    keys, values = (t.reshape(b, k, -1, d_h).transpose(1, 2).expand(-1, h, -1, -1) for t in (keys, values))
    dots = torch.einsum("bhnd,bhkd->bhnk", queries, keys) * (d_h**-0.5)
    out = torch.einsum("bhnk,bhkd->bhnd", dots.softmax(dim=-1), values)
    out = out.transpose(1, 2).reshape(b, n, -1)
    return out @ p["to_out.weight"].T + p["to_out.bias"]


MODULE_CASES = [
    dict(dim=32, seq_len=16, k=8, heads=4),
    dict(dim=32, seq_len=16, k=8, heads=4, share_kv=True),
    dict(dim=32, seq_len=16, k=8, heads=4, one_kv_head=True),
    dict(dim=32, seq_len=16, k=24, heads=2, one_kv_head=True, share_kv=True),
    dict(dim=24, seq_len=16, k=4, heads=3, dim_head=10),
]


@pytest.mark.parametrize("cfg", MODULE_CASES, ids=lambda c: ",".join(f"{a}={b}" for a, b in c.items()))
@pytest.mark.parametrize("n", [16, 11])
def test_module_matches_lucidrains_formula(cfg, n):
    torch.manual_seed(n)
    m = fk.LinformerAttention(**cfg)
    x = torch.randn(2, n, cfg["dim"], requires_grad=True)
    y = m(x)
    want = lucidrains_forward(m, x)
    _close(y, want, 3e-5)
    y.sum().backward()
    assert m.proj_k.grad is not None and m.to_q.weight.grad is not None and x.grad is not None
    if n < cfg["seq_len"]:  # columns past N get no gradient
        assert not m.proj_k.grad[n:].any()


def test_module_parameters_and_init():
    m = fk.LinformerAttention(32, 16, k=8, heads=4)
    shapes = {n: tuple(t.shape) for n, t in m.state_dict().items()}
    assert shapes == {
        "to_q.weight": (32, 32),
        "to_k.weight": (32, 32),
        "proj_k": (16, 8),
        "to_v.weight": (32, 32),
        "proj_v": (16, 8),
        "to_out.weight": (32, 32),
        "to_out.bias": (32,),
    }
    bound = 1 / math.sqrt(8)
    assert m.proj_k.abs().max() <= bound and m.proj_k.std() > bound / 3
    s = fk.LinformerAttention(32, 16, k=8, heads=4, dim_head=4, one_kv_head=True, share_kv=True)
    assert {n: tuple(t.shape) for n, t in s.state_dict().items()} == {
        "to_q.weight": (16, 32),
        "to_k.weight": (4, 32),
        "proj_k": (16, 8),
        "to_out.weight": (32, 16),
        "to_out.bias": (32,),
    }
    assert "share_kv=True" in repr(s)


def test_module_key_padding_mask_and_context():
    torch.manual_seed(7)
    m = fk.LinformerAttention(16, 12, k=4, heads=2)
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 5:] = True
    y = m(x, key_padding_mask=mask)
    # A padded key is the same as a zero row of K and V: the composite with the mask.
    p = m.state_dict()
    q = (x @ p["to_q.weight"].T).view(2, 9, 2, 8)
    k = (x @ p["to_k.weight"].T).view(2, 9, 2, 8)
    v = (x @ p["to_v.weight"].T).view(2, 9, 2, 8)
    o = composite(q, k, v, p["proj_k"].T[None], p["proj_v"].T[None], mask)
    _close(y, o.reshape(2, 9, 16) @ p["to_out.weight"].T + p["to_out.bias"])
    _close(m(x, context=ctx), lucidrains_forward(m, x, ctx), 3e-5)


def test_module_under_compile():
    torch.manual_seed(8)
    m = fk.LinformerAttention(32, 16, k=8, heads=4, one_kv_head=True)
    x = torch.randn(2, 13, 32)
    _close(torch.compile(m, backend="aot_eager", fullgraph=True)(x), m(x))


def test_module_errors():
    m = fk.LinformerAttention(16, 8, k=4, heads=2)
    with pytest.raises(ValueError, match="longer than seq_len"):
        m(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match=r"\(batch, seqlen, 16\)"):
        m(torch.randn(1, 8, 12))
    with pytest.raises(ValueError, match="context must have x's batch and length"):
        m(torch.randn(1, 8, 16), context=torch.randn(1, 6, 16))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        m(torch.randn(1, 8, 16), key_padding_mask=torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        m(torch.randn(1, 8, 16), key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        fk.LinformerAttention(10, 8, k=4, heads=4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fk.LinformerAttention(16, 8, k=0, heads=2)
    with pytest.raises(TypeError, match="share_kv must be a bool"):
        fk.LinformerAttention(16, 8, k=4, heads=2, share_kv=1)
    d = fk.LinformerAttention(16, 8, k=4, heads=2, dropout=0.1)
    with pytest.raises(NotImplementedError, match="dropout"):
        d(torch.randn(1, 8, 16))
    d.eval()
    assert d(torch.randn(1, 8, 16)).shape == (1, 8, 16)
    with pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(fk.LinformerAttention(16, 8, k=5, heads=2).state_dict())


def test_functional_errors():
    g = torch.Generator().manual_seed(9)
    q, k, v, e, f, _ = make(g, 2, 6, 2, 2, 8, 4, 8, "per_head")
    with pytest.raises(ValueError, match="E and F must agree"):
        fk.linformer_attention(q, k, v, e, f[:, :3])
    with pytest.raises(ValueError, match="k = 0"):
        fk.linformer_attention(q, k, v, e[:, :0], f[:, :0])
    with pytest.raises(ValueError, match="exceeds the projections' n_max"):
        fk.linformer_attention(q, k, v, e[:, :, :5], f[:, :, :5])
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        fk.linformer_attention(q, k, v, e, f, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(TypeError, match="e: dtype float64 is not supported"):
        fk.linformer_attention(q, k, v, e.double(), f)


# ---------------------------------------------------------------------------------------
# lucidrains/linformer itself.

needs_lucidrains = pytest.mark.skipif(not HAVE_LUCIDRAINS, reason="linformer (lucidrains) not installed")


@needs_lucidrains
@pytest.mark.parametrize("cfg", MODULE_CASES, ids=lambda c: ",".join(f"{a}={b}" for a, b in c.items()))
def test_loads_lucidrains_state_dict(cfg):
    from linformer import LinformerSelfAttention

    torch.manual_seed(10)
    theirs = LinformerSelfAttention(**cfg).eval()
    torch.manual_seed(10)
    ours = fk.LinformerAttention(**cfg).eval()
    # Same parameters, created in the same order: a seeded construction draws the same.
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    fresh = fk.LinformerAttention(**cfg)
    fresh.load_state_dict(theirs.state_dict())
    for n in (cfg["seq_len"], 9):
        x = torch.randn(2, n, cfg["dim"])
        with torch.no_grad():
            _close(fresh(x), theirs(x), 3e-5)
