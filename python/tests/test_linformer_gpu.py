"""The CUDA Linformer kernels through the Python API (torch CUDA tensors): forward and
autograd against a float64 torch composite and the CPU reference on the same stored
inputs, every sharing level, GQA, padding (a fully padded sequence included), N < N_max
and k > N; opcheck and torch.compile on CUDA; the LinformerAttention module against
lucidrains' formula and the golden fixtures; errors. Skipped without a GPU (and torch)."""

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
    from test_linformer_torch_cpu import MODULE_CASES, SHARINGS, composite, lucidrains_forward, make

# Max error relative to max(1, max |want|) against the float64 composite: inputs as
# stored, f32 accumulation, kp / vp and O (and each gradient) rounded to the dtype.
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2} if torch is not None else {}
DTYPES = [torch.float16, torch.bfloat16] if torch is not None else []
DTYPE_IDS = ["f16", "bf16"]


def _err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def _cuda(ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sharing", list(SHARINGS) if torch is not None else [])
@pytest.mark.parametrize(
    "dims",
    [(3, 77, 4, 2, 64, 32, 96), (2, 20, 2, 1, 32, 48, 20), (1, 129, 8, 8, 128, 64, 256)],
    ids=["gqa_n<nmax", "mqa_k>n", "d128"],
)
def test_matches_composite_and_cpu(dtype, sharing, dims):
    g = torch.Generator().manual_seed(sum(dims) + len(sharing))
    q, k, v, e, f, mask = make(g, *dims, sharing, pad=True, dtype=dtype)
    gpu = [None if t is None else t.cuda().requires_grad_() for t in (q, k, v, e, f)]
    cpu = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, e, f)]
    ref = [None if t is None else t.double().requires_grad_() for t in (q, k, v, e, f)]
    out = fk.linformer_attention(*gpu, key_padding_mask=mask.cuda())
    out_cpu = fk.linformer_attention(*cpu, key_padding_mask=mask)
    want = composite(*ref, mask)
    tol = TOL[dtype]
    assert out.is_cuda and out.dtype == dtype
    assert _err(out, want) <= tol, ("out vs float64", _err(out, want))
    assert _err(out, out_cpu) <= tol, ("out vs CPU reference", _err(out, out_cpu))
    assert not out[-1].any(), "a fully padded sequence outputs 0"
    dout = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(dout.cuda())
    out_cpu.backward(dout)
    want.backward(dout.double())
    for name, a, c, r in zip("qkvef", gpu, cpu, ref):
        if a is None:
            continue
        assert a.grad.is_cuda and a.grad.dtype == dtype, name
        assert _err(a.grad, r.grad) <= tol, (f"d{name} vs float64", _err(a.grad, r.grad))
        assert _err(a.grad, c.grad) <= tol, (f"d{name} vs CPU reference", _err(a.grad, c.grad))


def test_deterministic_backward():
    g = torch.Generator().manual_seed(1)
    q, k, v, e, f, mask = make(g, 2, 300, 4, 2, 64, 64, 512, "headwise", pad=True, dtype=torch.float16)
    args = _cuda((q, k, v, e, f))
    out, lse, kp, vp = fk.linformer_attention(*args, key_padding_mask=mask.cuda(), return_aux=True)
    dout = torch.randn(out.shape, generator=g).to(torch.float16).cuda()
    a = fk.linformer_attention_backward(dout, *args[:4], out, lse, kp, vp, args[4], key_padding_mask=mask.cuda())
    b = fk.linformer_attention_backward(dout, *args[:4], out, lse, kp, vp, args[4], key_padding_mask=mask.cuda())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_opcheck_and_compile_on_cuda():
    fk.register_torch_ops()
    g = torch.Generator().manual_seed(2)
    q, k, v, e, f, mask = make(g, 2, 40, 4, 2, 64, 16, 64, "mixed", pad=True, dtype=torch.float16)
    q, k, v, e, f, mask = _cuda((q, k, v, e, f, mask))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, e, f)]
    torch.library.opcheck(torch.ops.flashkernels.linformer_fwd.default, (*leaves, mask, None))
    out, lse, kp, vp = torch.ops.flashkernels.linformer_fwd(q, k, v, e, f, mask, None)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.flashkernels.linformer_bwd.default, (dout, q, k, v, e, f, out, lse, kp, vp, mask, None)
    )

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(q, k, v, e, f, mask):
        return fk.linformer_attention(q, k, v, e, f, key_padding_mask=mask)

    got = fn(*leaves, mask)
    assert torch.equal(got, fk.linformer_attention(q, k, v, e, f, key_padding_mask=mask))
    got.sum().backward()
    assert all(t.grad is not None for t in leaves)


# The CUDA kernels take head dims that are multiples of 8.
GPU_MODULE_CASES = [
    c for c in (MODULE_CASES if torch is not None else []) if c.get("dim_head", c["dim"] // c["heads"]) % 8 == 0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cfg", GPU_MODULE_CASES, ids=lambda c: ",".join(f"{a}={b}" for a, b in c.items()))
def test_module_on_cuda(cfg, dtype):
    torch.manual_seed(3)
    m = fk.LinformerAttention(**cfg).to(device="cuda", dtype=dtype)
    x = torch.randn(2, cfg["seq_len"] - 3, cfg["dim"], device="cuda", dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.dtype == dtype and _err(y, lucidrains_forward(m, x)) <= 2 * TOL[dtype]
    y.float().sum().backward()
    assert x.grad is not None and m.proj_k.grad is not None


def test_lucidrains_fixtures_on_cuda():
    import numpy as np

    from test_linformer_cpu import FIXTURE_NAMES, FIXTURES, parse

    for name in FIXTURE_NAMES:
        cfg, t = parse(FIXTURES / name)
        shared = cfg["share_kv"] == 1
        q, k, e = (torch.from_numpy(np.ascontiguousarray(t[n])).cuda() for n in ("q", "k", "e"))
        v = k if shared else torch.from_numpy(t["v"]).cuda()
        f = None if shared else torch.from_numpy(t["f"]).cuda()
        want = torch.from_numpy(t["out"])
        for dtype in DTYPES:
            cast = [None if x is None else x.to(dtype) for x in (q, k, v, e, f)]
            out = fk.linformer_attention(*cast)
            assert _err(out, want) <= 2 * TOL[dtype], (name, dtype, _err(out, want))


def test_errors_on_cuda():
    g = torch.Generator().manual_seed(4)
    q, k, v, e, f, _ = _cuda(make(g, 2, 16, 2, 2, 32, 8, 16, "per_head", dtype=torch.float16))
    with pytest.raises(ValueError, match="exceeds the projections' n_max"):
        fk.linformer_attention(q, k, v, e[:, :, :8], f[:, :, :8])
    with pytest.raises(ValueError, match="k = 0"):
        fk.linformer_attention(q, k, v, e[:, :0])
    with pytest.raises(ValueError, match="E and F must agree"):
        fk.linformer_attention(q, k, v, e, f[:, :4])
    with pytest.raises(ValueError, match="one device"):
        fk.linformer_attention(q, k, v, e.cpu(), f)
    with pytest.raises(TypeError, match="float32"):
        fk.linformer_attention(*(t.float() for t in (q, k, v, e, f)))
