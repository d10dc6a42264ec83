"""The CUDA Reformer kernels through the Python API (torch CUDA tensors): forward and
autograd against the float64 torch composite (with the device's own buckets) and the
CPU reference on the same stored inputs, several rounds, causal, padding, N <= C (full
attention), D up to 128; given buckets reproduce O bitwise; the functional backward
hashing again; Hugging Face's golden fixtures; opcheck and torch.compile on CUDA; the
kernels' own errors. Skipped without a GPU (and torch)."""

import numpy as np
import pytest

import flashkernels as fk

try:
    import torch
except ImportError:  # pragma: no cover - CI without torch
    torch = None

pytestmark = [
    pytest.mark.skipif(not fk.cuda_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch is None or not torch.cuda.is_available(), reason="needs a CUDA device"),
]

if torch is not None:
    from test_reformer_cpu import FIXTURE_NAMES, FIXTURES, parse
    from test_reformer_torch_cpu import composite

# Max error relative to max(1, max |want|) against the float64 composite: inputs as
# stored, f32 hashing / scores / softmax, O and each gradient rounded to the dtype.
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2} if torch is not None else {}
DTYPES = [torch.float16, torch.bfloat16] if torch is not None else []
DTYPE_IDS = ["f16", "bf16"]

# (b, n, h, d), (n_hashes, n_buckets, C), (before, after), causal, padded
CASES = {
    "tiny_rounds": ((2, 16, 2, 8), (2, 4, 4), (1, 0), False, False),
    "causal_padded": ((2, 24, 2, 8), (3, 6, 4), (1, 1), True, True),
    "full_attention": ((2, 7, 2, 4), (2, 4, 8), (1, 0), True, True),
    "d64_4hashes": ((1, 512, 3, 64), (4, 16, 64), (1, 0), False, False),
    "d128_causal_padded": ((2, 192, 2, 128), (3, 8, 32), (1, 1), True, True),
    "d40_one_round": ((1, 96, 1, 40), (1, 6, 16), (2, 0), False, True),
}


def make(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
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


def _err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def _bucket_mismatch(a, b):
    """The fraction of bucket entries that differ: f32 hashing on the device and f64 on
    the host may pick different buckets at a near tie of two rotated coordinates."""
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype == torch.int64
    return (a != b).double().mean().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_composite_and_cpu(case, dtype):
    qk, v, rot, mask, kw = make(case, dtype, seed=len(case))
    gq, gv = (t.cuda().requires_grad_() for t in (qk, v))
    out, bk = fk.lsh_attention(
        gq, gv, rot.cuda(), key_padding_mask=None if mask is None else mask.cuda(), return_buckets=True, **kw
    )
    assert out.is_cuda and out.dtype == dtype and out.is_contiguous()
    hashed = qk.shape[1] > kw["chunk_length"]
    assert (bk is not None) == hashed
    # The CPU reference on the same stored inputs: its buckets (up to near ties), and
    # with the device's buckets given, its output.
    cpu_out, cpu_bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)
    if hashed:
        assert bk.is_cuda
        assert _bucket_mismatch(bk, cpu_bk) <= 1e-3
        cpu_out = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=bk.cpu(), **kw)
    tol = TOL[dtype]
    assert _err(out, cpu_out) <= tol, ("out vs CPU reference", _err(out, cpu_out))
    # The float64 composite with the device's buckets: O and both gradients.
    rq, rv = (t.double().requires_grad_() for t in (qk, v))
    want = composite(rq, rv, None if bk is None else bk.cpu(), mask, **kw)
    assert _err(out, want) <= tol, ("out vs float64", _err(out, want))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out.backward(dout.to(dtype).cuda())
    want.backward(dout.to(dtype).double())
    assert _err(gq.grad, rq.grad) <= tol, ("dqk", _err(gq.grad, rq.grad))
    assert _err(gv.grad, rv.grad) <= tol, ("dv", _err(gv.grad, rv.grad))


@pytest.mark.parametrize("case", ["causal_padded", "d64_4hashes"])
def test_given_buckets_and_functional_backward(case):
    qk, v, rot, mask, kw = make(case, torch.float16, seed=3)
    qk, v, rot = qk.cuda(), v.cuda(), rot.cuda()
    out, lse, bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_aux=True, **kw)
    assert lse.is_cuda and lse.dtype == torch.float32
    # Given buckets (the forward's, or HF-style int64 on the host) reproduce O bitwise.
    again = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=bk, **kw)
    assert torch.equal(again, out)
    assert torch.equal(fk.lsh_attention(qk, v, rot, key_padding_mask=mask, buckets=bk.cpu(), **kw), out)
    # The functional backward: the forward's buckets, or hashed again (the same ones).
    dout = torch.randn_like(out)
    fixed = fk.lsh_attention_backward(dout, qk, v, rot, out, lse, key_padding_mask=mask, buckets=bk, **kw)
    rehashed = fk.lsh_attention_backward(dout, qk, v, rot, out, lse, key_padding_mask=mask, **kw)
    for a, b in zip(fixed, rehashed):
        assert a.is_cuda and torch.equal(a, b)
    # Deterministic: the same call twice, bitwise.
    twice = fk.lsh_attention_backward(dout, qk, v, rot, out, lse, key_padding_mask=mask, buckets=bk, **kw)
    for a, b in zip(fixed, twice):
        assert torch.equal(a, b)
    # Strided rotations (a transposed copy viewed back) are the same call.
    rot_t = rot.transpose(0, 3).contiguous().transpose(0, 3)
    assert not rot_t.is_contiguous()
    assert torch.equal(fk.lsh_attention(qk, v, rot_t, key_padding_mask=mask, buckets=bk, **kw), out)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_hugging_face_fixture(name, dtype):
    """HF's buckets given, the kernels reproduce HF's float64 output within the dtype's
    bound; hashing the stored inputs matches the CPU reference's hashing of them."""
    cfg, t = parse(FIXTURES / name)
    kw = dict(
        chunk_length=cfg["chunk_length"],
        chunks_before=cfg["chunks_before"],
        chunks_after=cfg["chunks_after"],
        causal=cfg["causal"] == 1,
    )
    qk, v = (torch.from_numpy(t[x]).to(dtype) for x in ("qk", "v"))
    rot = torch.from_numpy(t["rotations"].astype(np.float32))
    mask = None if "attention_mask" not in t else torch.from_numpy(t["attention_mask"] == 0)
    hf = t.get("buckets")
    hf = None if hf is None else torch.from_numpy(hf.astype(np.int64))
    got = fk.lsh_attention(qk.cuda(), v.cuda(), rot.cuda(), key_padding_mask=mask, buckets=hf, **kw)
    want = torch.from_numpy(t["out"])
    # HF ran float64 inputs; ours are rounded to the dtype first.
    assert _err(got, want) <= 4 * TOL[dtype], (name, _err(got, want))
    if hf is not None:
        _, dev_bk = fk.lsh_attention(qk.cuda(), v.cuda(), rot.cuda(), key_padding_mask=mask, return_buckets=True, **kw)
        _, cpu_bk = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)
        assert _bucket_mismatch(dev_bk, cpu_bk) <= 1e-3, name


def test_custom_ops_opcheck_and_compile_on_cuda():
    fk.register_torch_ops()
    qk, v, rot, mask, kw = make("causal_padded", torch.float16, seed=4)
    qk, v, rot, mask = qk.cuda(), v.cuda(), rot.cuda(), mask.cuda()
    opts = (kw["chunk_length"], kw["chunks_before"], kw["chunks_after"], kw["causal"], None)
    q1, v1 = (t.clone().requires_grad_() for t in (qk, v))
    out, lse, bk = torch.ops.flashkernels.reformer_fwd(qk, v, rot, mask, None, *opts)
    assert bk.is_cuda and bk.shape == (2, 2, 3, 24)
    torch.library.opcheck(torch.ops.flashkernels.reformer_fwd.default, (q1, v1, rot, mask, bk, *opts))
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.flashkernels.reformer_bwd.default, (dout, qk, v, rot, out, lse, mask, bk, *opts))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(qk, v, rot, mask):
        o, b = fk.lsh_attention(qk, v, rot, key_padding_mask=mask, return_buckets=True, **kw)
        return o * 2, b

    o2, b2 = fn(q1, v1, rot, mask)
    assert torch.equal(b2, bk)
    assert torch.equal(o2, out * 2)
    o2.float().sum().backward()
    eq, ev = (t.clone().requires_grad_() for t in (qk, v))
    (fk.lsh_attention(eq, ev, rot, key_padding_mask=mask, **kw) * 2).float().sum().backward()
    assert torch.equal(q1.grad, eq.grad) and torch.equal(v1.grad, ev.grad)


def test_kernel_errors():
    qk, v, rot, mask, kw = make("tiny_rounds", torch.float16, seed=5)
    # float32 device tensors: the kernels take float16 / bfloat16.
    with pytest.raises((TypeError, ValueError), match="float16 or bfloat16"):
        fk.lsh_attention(qk.float().cuda(), v.float().cuda(), rot.cuda(), **kw)
    # Head dims past 128.
    big = torch.randn(1, 8, 1, 136, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="head_dim 136"):
        fk.lsh_attention(big, big, torch.randn(1, 136, 1, 2, device="cuda"), chunk_length=4)
    # Mixed devices are the placement's error.
    with pytest.raises(ValueError, match="one device"):
        fk.lsh_attention(qk.cuda(), v, rot.cuda(), **kw)
