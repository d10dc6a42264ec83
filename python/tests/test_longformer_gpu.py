"""The Longformer CUDA kernels through flashkernels.longformer_attention (torch CUDA
tensors, float16 / bfloat16): forward (O, LSE) and autograd against a float32 torch
dense-mask reference (test_longformer_api.torch_longformer) computed from the same
rounded inputs. Skipped without a GPU (and torch)."""

import numpy as np
import pytest

import flashkernels as fk

try:
    import torch
except ImportError:  # pragma: no cover - CI without torch
    torch = None

from test_longformer_api import _make_masks, torch_longformer  # noqa: E402

HAVE_CUDA = fk.cuda_available() and torch is not None and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")

# Max error relative to max(1, max |reference|) (float32 torch), per storage dtype: a few
# unit roundoffs u (bf16 u = 2^-8, f16 u = 2^-11: f16's bound is 8x tighter); gradients sum
# more rounded terms. LSE is float32 from exactly stored inputs: one bound for both.
TOL = {"float16": 2.5e-3, "bfloat16": 2e-2}
GRAD_TOL = {"float16": 5e-3, "bfloat16": 2e-2}
LSE_TOL = 1e-3  # as the Rust GPU suites
DTYPES = ["float16", "bfloat16"]

CASES = [
    # (b, n, h, d, window, dilation, causal, n_global, pad_kind, separate globals)
    (1, 77, 2, 64, 8, 1, False, 0, "none", False),
    (2, 131, 3, 64, 16, [1, 2, 4], False, 3, "tail", True),
    (2, 200, 2, 32, 7, [3, 1], True, 4, "random", True),
    (1, 64, 1, 128, 0, 1, False, 2, "none", True),
    (2, 50, 2, 64, 100, 2, False, 2, "tail", False),  # w beyond N
    (2, 96, 4, 16, 5, [1, 2, 3, 4], True, 0, "random", False),
    (1, 33, 2, 256, 3, 1, False, 33, "none", True),  # nearly every token global
]


def _close(got, want, tol, what=""):
    got, want = got.detach().float(), want.detach().float()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max err {err:.3e} > {tol} * {scale:.3g}"


def _lse_close(got, want, tol):
    fin = torch.isfinite(want)
    assert torch.equal(torch.isneginf(got), ~fin), "lse is -inf exactly on padded rows"
    _close(got[fin], want[fin], tol, "lse")


def _run_case(case, dtype, mask_kind="tensor", seed=0):
    b, n, h, d, w, dil, causal, ng, pk, sep = case
    rng = np.random.default_rng(seed)
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    raw = [torch.randn(b, n, h, d, device="cuda", generator=gen).to(dt) for _ in range(6 if sep else 3)]
    glob, pad = _make_masks(rng, b, n, ng, pk)
    if mask_kind == "tensor":  # device masks (a device-to-host copy inside)
        gt, pt = torch.from_numpy(glob).cuda(), torch.from_numpy(pad).cuda()
    elif mask_kind == "host":
        gt, pt = torch.from_numpy(glob), torch.from_numpy(pad)
    else:
        gt, pt = [np.flatnonzero(glob[bb]).tolist() for bb in range(b)], pad
    mine = [x.clone().requires_grad_() for x in raw]
    ref = [x.float().clone().requires_grad_() for x in raw]
    out, lse = fk.longformer_attention(
        *mine[:3],
        w,
        dilation=dil,
        causal=causal,
        global_tokens=gt,
        padding_mask=pt,
        global_qkv=tuple(mine[3:]) if sep else None,
        return_lse=True,
    )
    want, want_lse = torch_longformer(
        *ref[:3], w, dilation=dil, causal=causal, glob=glob, pad=pad, gqkv=tuple(ref[3:]) if sep else None
    )
    assert out.dtype == dt and out.shape == raw[0].shape and out.is_cuda and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (b, h, n)
    _close(out, want, TOL[dtype], "out")
    _lse_close(lse, want_lse, LSE_TOL)
    assert (out[torch.from_numpy(pad).cuda()] == 0).all()
    dout = torch.randn(out.shape, device="cuda", generator=gen).to(dt)
    out.backward(dout)
    want.backward(dout.float())
    names = ["dq", "dk", "dv", "dq_global", "dk_global", "dv_global"]
    for name, a, r in zip(names, mine, ref):
        assert a.grad is not None and a.grad.dtype == dt, name
        _close(a.grad, r.grad, GRAD_TOL[dtype], name)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward_matches_reference(case, dtype):
    _run_case(case, dtype)


@pytest.mark.parametrize("mask_kind", ["tensor", "host", "indices"])
def test_mask_kinds_agree(mask_kind):
    case = (2, 131, 3, 64, 16, [1, 2, 4], False, 3, "tail", True)
    out = _run_case(case, "bfloat16", mask_kind, seed=3)
    again = _run_case(case, "bfloat16", "tensor", seed=3)
    assert torch.equal(out, again), "index lists, host masks and device masks give the same bits"


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_sequence(dtype):
    """N = 1000, w = 64, 5 globals (first, last real token, 3 inside), tail padding."""
    _run_case((2, 1000, 4, 64, 64, 1, False, 5, "tail", True), dtype, seed=7)
    _run_case((1, 1000, 2, 64, 64, [1, 3], True, 5, "random", False), dtype, seed=8)


def test_non_default_stream_and_determinism():
    case = (2, 131, 3, 64, 16, [1, 2, 4], False, 3, "tail", True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    t = [torch.randn(2, 131, 3, 64, device="cuda", generator=gen, dtype=torch.float16) for _ in range(3)]
    glob, pad = _make_masks(np.random.default_rng(1), 2, 131, 3, "tail")
    kw = dict(dilation=case[5], global_tokens=torch.from_numpy(glob), padding_mask=torch.from_numpy(pad))
    base = fk.longformer_attention(*t, 16, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        other = fk.longformer_attention(*t, 16, **kw)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(base, other)
    leaves = [x.clone().requires_grad_() for x in t]
    grads = []
    for _ in range(2):
        for x in leaves:
            x.grad = None
        fk.longformer_attention(*leaves, 16, **kw).sum().backward()
        grads.append([x.grad.clone() for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b), "deterministic backward"


def test_torch_compile_cuda():
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(2)
    t = [
        torch.randn(2, 96, 2, 64, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(6)
    ]
    glob, pad = _make_masks(np.random.default_rng(2), 2, 96, 3, "tail")
    gt, pt = torch.from_numpy(glob).cuda(), torch.from_numpy(pad).cuda()

    def f(q, k, v, qg, kg, vg):
        return fk.longformer_attention(
            q, k, v, 8, dilation=[1, 2], global_tokens=gt, padding_mask=pt, global_qkv=(qg, kg, vg)
        )

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*t)
    out.float().sum().backward()
    got = [x.grad.clone() for x in t]
    for x in t:
        x.grad = None
    want = f(*t)
    want.float().sum().backward()
    torch.testing.assert_close(out, want)
    for a, x in zip(got, t):
        torch.testing.assert_close(a, x.grad)


def test_cuda_errors():
    q = torch.randn(1, 16, 1, 64, device="cuda")
    with pytest.raises(TypeError, match="float16|bfloat16"):
        fk.longformer_attention(q, q, q, 2)
    q = torch.randn(1, 16, 1, 12, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        fk.longformer_attention(q, q, q, 2)
    q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="one device"):
        fk.longformer_attention(q, q.cpu(), q, 2)
