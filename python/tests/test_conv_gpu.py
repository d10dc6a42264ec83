"""The CUDA conv2d / pooling kernels through the Python API (torch CUDA tensors) against
torch.nn.functional, forward and autograd. Skipped without a GPU (and torch)."""

import pytest

import flashkernels as fk

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - CI without torch
    torch = None

HAVE_CUDA = fk.cuda_available()
pytestmark = [
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch is None or not (torch is not None and torch.cuda.is_available()), reason="needs a CUDA device and torch"
    ),
]

# Max error relative to max(1, max |want|), against float64 references. float32 is computed
# in float32 on CUDA cores (no TF32 anywhere), so its bound is f32 accumulation over the
# C*R*S-term dot products; the half types add the rounding of inputs-as-stored and of the
# output (bf16 has 8x f16's unit roundoff).
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}


def _may_refuse(algo, dtype, channels_last, channels_per_group):
    """Where a forced implicit GEMM may refuse (as tests/gpu_conv.rs's may_refuse): half
    types need NHWC with channels per group a multiple of 8. Every other refusal fails."""
    return algo == "implicit_gemm" and dtype != "float32" and not (channels_last and channels_per_group % 8 == 0)


def _act(name, t):
    return t if name is None else getattr(F, name)(t)


def _close(got, want, tol):
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item() / scale
    assert err <= tol, f"max rel err {err} > {tol}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("algo", [None, "im2col", "implicit_gemm"])
@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
@pytest.mark.parametrize(
    "c,k,r,stride,padding,groups",
    [(64, 64, 3, 1, 1, 1), (32, 64, 1, 1, 0, 1), (16, 32, 7, 2, 3, 1), (64, 64, 3, 1, 1, 64), (64, 128, 3, 2, 1, 4)],
)
def test_conv2d_forward_backward(dtype, channels_last, algo, act, c, k, r, stride, padding, groups):
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, c, 20, 18, device="cuda", generator=g).to(dt)
    w = (torch.randn(k, c // groups, r, r, device="cuda", generator=g) / (c // groups * r * r) ** 0.5).to(dt)
    b = torch.randn(k, device="cuda", generator=g).to(dt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    try:
        y = fk.conv2d(*leaves, stride, padding, 1, groups, activation=act, algo=algo)
    except ValueError as e:
        if "cannot run" in str(e) and _may_refuse(algo, dtype, channels_last, c // groups):
            pytest.skip(f"{algo} refuses this case, as it may: {e}")
        raise
    # The oracle: torch's conv on the CPU in float64 (never cuDNN, whose float32 may use TF32).
    ref = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
    want = _act(act, F.conv2d(*ref, stride, padding, 1, groups))
    _close(y, want, TOL[dtype])
    dy = torch.randn(want.shape, device="cuda", generator=g).to(dt)
    y.backward(dy)
    want.backward(dy.cpu().double())
    for got, r_ in zip(leaves, ref):
        _close(got.grad, r_.grad, 4 * TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooling(dtype, channels_last):
    dt = getattr(torch, dtype)
    x = torch.randn(2, 24, 17, 15, device="cuda").to(dt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xm = x.clone().requires_grad_()
    y, idx = fk.max_pool2d(xm, 3, 2, 1, return_indices=True)
    wy, widx = F.max_pool2d(x.cpu().double(), 3, 2, 1, return_indices=True)
    _close(y, wy, 0.0)
    assert torch.equal(idx.cpu(), widx)
    y.backward(torch.ones_like(y))
    xa = x.clone().requires_grad_()
    ya = fk.avg_pool2d(xa, 3, 2, 1, ceil_mode=True, count_include_pad=False)
    _close(ya, F.avg_pool2d(x.cpu().double(), 3, 2, 1, ceil_mode=True, count_include_pad=False), TOL[dtype])
    ya.backward(torch.ones_like(ya))
