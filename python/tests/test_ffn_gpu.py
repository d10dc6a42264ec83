"""The CUDA feed-forward kernels through the Python API (torch CUDA tensors) against a
float64 torch CPU reference, forward and autograd. Skipped without a GPU (and torch).
Not yet in scripts/gpu_check.py's Python GPU subset."""

import pytest

import flashkernels as fk

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - CI without torch
    torch = None

pytestmark = [
    pytest.mark.skipif(not fk.cuda_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch is None or not torch.cuda.is_available(), reason="needs a CUDA device and torch"),
]

# Max error relative to max(1, max |want|): inputs as stored, f32 accumulation, h and y
# (and each gradient) rounded to the dtype.
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2} if torch is not None else {}


def _act(name, t):
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    return getattr(F, name)(t)


def _reference(x, w1, w2, w3, b1, b2, b3, activation, residual):
    h = _act(activation, F.linear(x, w1, b1))
    if w3 is not None:
        h = h * F.linear(x, w3, b3)
    y = F.linear(h, w2, b2)
    return y + x if residual else y


def _close(got, want, tol):
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, True)])
def test_forward_backward_match_float64(dtype, activation, gated, bias, residual):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    tokens, d_model, d_hidden = 77, 64, 136  # odd token count, widths multiples of 8

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    cpu = [
        r(tokens, d_model),
        r(d_hidden, d_model, scale=d_model**-0.5),
        r(d_model, d_hidden, scale=d_hidden**-0.5),
        r(d_hidden, d_model, scale=d_model**-0.5) if gated else None,
        r(d_hidden, scale=0.5) if bias else None,
        r(d_model, scale=0.5) if bias else None,
        r(d_hidden, scale=0.5) if bias and gated else None,
    ]
    dev = [None if t is None else t.cuda().requires_grad_() for t in cpu]
    ref = [None if t is None else t.double().requires_grad_() for t in cpu]
    x, w1, w2, w3, b1, b2, b3 = dev
    y = fk.feed_forward(x, w1, w2, b1, b2, w3=w3, b3=b3, activation=activation, residual=residual)
    want = _reference(*ref, activation, residual)
    assert y.dtype == dtype and y.is_cuda
    _close(y, want, TOL[dtype])
    dy = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(dy.cuda())
    want.backward(dy.double())
    for a, b in zip(dev, ref):
        if a is not None:
            # Gradients sum over tokens (or d_hidden): scale the bound by sqrt(terms).
            _close(a.grad, b.grad, TOL[dtype] * 4)


def test_module_on_cuda():
    torch.manual_seed(0)
    ff = fk.FeedForward(64, 176, activation="silu", gated=True, bias=False, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, device="cuda")
    y = ff(x)
    w = {k: v.double().cpu() for k, v in ff.state_dict().items()}
    want = _reference(x.double().cpu(), w["w1.weight"], w["w2.weight"], w["w3.weight"], None, None, None, "silu", False)
    _close(y, want, TOL[torch.bfloat16])
