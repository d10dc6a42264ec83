"""torch CPU tensors through flashkernels' Reformer LSH attention: autograd against a
float64 torch composite (the forward's buckets held fixed: stable sort of all rounds,
circular chunk windows, replaced masks, per-round logsumexp, rounds combined, unsorted),
the torch.library ops (opcheck, torch.compile fullgraph), and the errors. Skipped
without torch."""

import math

import pytest

torch = pytest.importorskip("torch")

import flashkernels as fk  # noqa: E402

# (b, n, h, d), (n_hashes, n_buckets, C), (before, after), causal, padded
CASES = {
    "rounds": ((2, 16, 2, 8), (2, 4, 4), (1, 0), False, False),
    "causal_padded": ((2, 24, 2, 8), (3, 6, 4), (1, 1), True, True),
    "full_attention": ((2, 7, 2, 4), (2, 4, 8), (1, 0), True, True),
}


def make(g, case, dtype=torch.float32):
    (b, n, h, d), (nh, nb, c), (before, after), causal, padded = CASES[case]
    qk = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    v = torch.randn(b, n, h, d, generator=g, dtype=torch.float64).to(dtype)
    rot = torch.randn(h, d, nh, nb // 2, generator=g)
    mask = None
    if padded:
        mask = torch.zeros(b, n, dtype=torch.bool)
        mask[0, -3:] = True
        mask[0, n // 2] = True
    kw = dict(chunk_length=c, chunks_before=before, chunks_after=after, causal=causal)
    return qk, v, rot, mask, kw


def composite(qk, v, buckets, mask=None, *, chunk_length, chunks_before=1, chunks_after=0, causal=False):
    """Reformer LSH attention in torch ops (float64 when the inputs are), with the given
    buckets (None: N <= C, full attention): differentiable in qk and v."""
    b, n, h, d = qk.shape
    hashed = n > chunk_length
    pad = torch.zeros(b, n, dtype=torch.bool) if mask is None else mask
    outs = []
    for bi in range(b):
        heads = []
        for hi in range(h):
            x, vv = qk[bi, :, hi], v[bi, :, hi]
            kk = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) / math.sqrt(d)
            if hashed:
                order = torch.argsort(buckets[bi, hi].reshape(-1), stable=True)
                nc = order.numel() // chunk_length
                ch = order.view(nc, chunk_length)
                wins = [
                    (ch[c], torch.cat([ch[(c + o) % nc] for o in range(-chunks_before, chunks_after + 1)]))
                    for c in range(nc)
                ]
                rounds = buckets.shape[2]
            else:
                wins, rounds = [(torch.arange(n), torch.arange(n))], 1
            lse = torch.zeros(rounds, n, dtype=qk.dtype)
            o_r = torch.zeros(rounds, n, d, dtype=qk.dtype)
            for qp, kp in wins:
                qt, kt = qp % n, kp % n
                s = x[qt] @ kk[kt].T
                masked = pad[bi][kt][None, :].expand_as(s)
                if causal:
                    masked = masked | (kt[None, :] > qt[:, None])
                s = torch.where(masked, torch.full_like(s, -1e9), s)
                s = torch.where(qt[:, None] == kt[None, :], torch.full_like(s, -1e5), s)
                ls = torch.logsumexp(s, -1)
                lse = lse.index_put((qp // n, qt), ls)
                o_r = o_r.index_put((qp // n, qt), torch.softmax(s, -1) @ vv[kt])
            w = torch.softmax(lse, 0)
            heads.append((w[..., None] * o_r).sum(0))
        outs.append(torch.stack(heads, 1))
    return torch.stack(outs, 0)


def _close(got, want, tol=2e-5):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item() if got.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("case", list(CASES))
def test_autograd_matches_composite(case):
    g = torch.Generator().manual_seed(len(case))
    qk, v, rot, mask, kw = make(g, case)
    q1, v1, r1 = _leaves(qk, v, rot)
    out, bk = fk.lsh_attention(q1, v1, r1, key_padding_mask=mask, return_buckets=True, **kw)
    hashed = qk.shape[1] > kw["chunk_length"]
    assert (bk is not None) == hashed
    if hashed:
        assert bk.dtype == torch.int64 and bk.shape == (qk.shape[0], qk.shape[2], rot.shape[2], qk.shape[1])
    q2, v2 = (t.detach().double().requires_grad_() for t in (qk, v))
    want = composite(q2, v2, bk, mask, **kw)
    _close(out, want)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    want.backward(dout.double())
    _close(q1.grad, q2.grad, 5e-5)
    _close(v1.grad, v2.grad, 5e-5)
    assert q1.grad.dtype == torch.float32 and r1.grad is None  # rotations: no gradient


def test_return_aux_buckets_and_functional_backward():
    g = torch.Generator().manual_seed(1)
    qk, v, rot, mask, kw = make(g, "causal_padded")
    out, lse, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_aux=True, **kw)
    assert lse.shape == (2, 2, 3, 24) and lse.dtype == torch.float32 and bk.dtype == torch.int64
    dout = torch.randn(out.shape, generator=g)
    grads = fk.lsh_attention_backward(dout, qk, v, rot, out, lse, key_padding_mask=mask, buckets=bk, **kw)
    q1, v1 = _leaves(qk, v)
    fk.lsh_attention(q1, v1, rot, key_padding_mask=mask, **kw).backward(dout)
    torch.testing.assert_close(grads[0], q1.grad, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], v1.grad, rtol=0, atol=0)
    # Given buckets (HF's int64 layout) reproduce O; the numpy path gives the same values.
    torch.testing.assert_close(
        fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=bk, **kw), out, rtol=0, atol=0
    )
    n_out, n_bk = fk.lsh_attention(
        qk.numpy(), v.numpy(), rot.numpy(), key_padding_mask=mask.numpy(), return_buckets=True, **kw
    )
    torch.testing.assert_close(out, torch.from_numpy(n_out), rtol=0, atol=0)
    torch.testing.assert_close(bk, torch.from_numpy(n_bk), rtol=0, atol=0)


def test_lse_and_buckets_not_differentiable_and_no_grad():
    g = torch.Generator().manual_seed(2)
    qk, v, rot, _, kw = make(g, "rounds")
    q1, v1 = _leaves(qk, v)
    out, lse, bk = fk.lsh_attention(q1, v1, rot, return_aux=True, **kw)
    assert out.requires_grad and not lse.requires_grad and not bk.requires_grad
    with torch.no_grad():
        assert not fk.lsh_attention(q1, v1, rot, **kw).requires_grad


def test_double_backward_raises():
    g = torch.Generator().manual_seed(3)
    qk, v, rot, _, kw = make(g, "rounds")
    qk.requires_grad_()
    (gq,) = torch.autograd.grad(fk.lsh_attention(qk, v, rot, **kw).sum(), qk, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


def _op_args(kw):
    return (kw["chunk_length"], kw["chunks_before"], kw["chunks_after"], kw["causal"], None)


def test_custom_ops_opcheck():
    """torch.library.opcheck: schema, fake implementations and autograd registration."""
    fk.register_torch_ops()
    g = torch.Generator().manual_seed(4)
    for case in CASES:
        qk, v, rot, mask, kw = make(g, case)
        q1, v1 = _leaves(qk, v)
        opts = _op_args(kw)
        torch.library.opcheck(torch.ops.flashkernels.reformer_fwd.default, (q1, v1, rot, mask, None, *opts))
        out, lse, bk = torch.ops.flashkernels.reformer_fwd(qk, v, rot, mask, None, *opts)
        given = bk if bk.dim() == 4 else None
        if given is not None:
            torch.library.opcheck(torch.ops.flashkernels.reformer_fwd.default, (q1, v1, rot, mask, given, *opts))
        else:
            assert bk.shape == (0,)
        dout = torch.randn(out.shape, generator=g)
        torch.library.opcheck(
            torch.ops.flashkernels.reformer_bwd.default, (dout, qk, v, rot, out, lse, mask, given, *opts)
        )


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(5)
    qk, v, rot, mask, kw = make(g, "causal_padded")
    q1, v1 = _leaves(qk, v)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(qk, v, rot, mask):
        out, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)
        return out * 2, bk

    out, bk = fn(q1, v1, rot, mask)
    q2, v2 = (t.detach().double().requires_grad_() for t in (qk, v))
    want = composite(q2, v2, bk, mask, **kw) * 2
    _close(out, want)
    out.sum().backward()
    want.sum().backward()
    _close(q1.grad, q2.grad, 5e-5)
    _close(v1.grad, v2.grad, 5e-5)
    # The eager call's buckets are the compiled one's.
    torch.testing.assert_close(bk, fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)[1])


def test_errors():
    g = torch.Generator().manual_seed(6)
    qk, v, rot, mask, kw = make(g, "causal_padded")
    _, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)
    with pytest.raises(TypeError, match="buckets must be an integer tensor"):
        fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=bk.float(), **kw)
    with pytest.raises(ValueError, match="is outside"):
        fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=bk * 0 - 1, **kw)
    with pytest.raises(TypeError, match="bool tensor"):
        fk.lsh_attention(qk, v, rot, key_padding_mask=mask.long(), **kw)
    with pytest.raises(ValueError, match="n_buckets = 5"):
        fk.lsh_attention(qk, v, rot, n_buckets=5, **kw)
    with pytest.raises(ValueError, match="rotations have shape"):
        fk.lsh_attention(qk, v, rot[:1], **kw)
    with pytest.raises(ValueError, match="chunk_length = 0"):
        fk.lsh_attention(qk, v, rot, chunk_length=0)
    with pytest.raises(ValueError, match="not a multiple of chunk_length"):
        fk.lsh_attention(qk, v, rot, chunk_length=5)
    with pytest.raises(TypeError, match="one framework"):
        fk.lsh_attention(qk, v.numpy(), rot, **kw)
    # The same errors through the custom op (as torch.compile calls it).
    fk.register_torch_ops()
    with pytest.raises(ValueError, match="n_buckets = 5"):
        torch.ops.flashkernels.reformer_fwd(qk, v, rot, mask, None, 4, 1, 1, True, 5)
    with pytest.raises(ValueError, match="chunk_length = 0"):
        torch.ops.flashkernels.reformer_fwd(qk, v, rot, mask, None, 0, 1, 1, True, None)
