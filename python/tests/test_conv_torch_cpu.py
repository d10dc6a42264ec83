"""torch CPU tensors through flashkernels' conv2d / max_pool2d / avg_pool2d: values and
autograd against torch.nn.functional, gradcheck in float64-free form (float32 with
torch's own gradients as the oracle), channels-last inputs. Skipped without torch."""

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import flashkernels as fk  # noqa: E402

ACTS = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _close(got, want, tol=1e-4):
    torch.testing.assert_close(
        got.detach().float(), want.detach().float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item())
    )


@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
@pytest.mark.parametrize(
    "c,k,r,stride,padding,dilation,groups,bias",
    [
        (4, 6, 3, 1, 1, 1, 1, True),
        (6, 6, 3, (2, 1), (0, 2), (1, 2), 3, True),
        (6, 6, 3, 1, 1, 1, 6, False),
        (3, 4, 5, 2, 2, 1, 1, True),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_autograd_matches_torch(act, c, k, r, stride, padding, dilation, groups, bias, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 9, 8, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c // groups, r, r, generator=g) / (c // groups * r * r) ** 0.5
    b = torch.randn(k, generator=g) if bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    xb, wb = leaves[0], leaves[1]
    y = fk.conv2d(xb, wb, leaves[2] if bias else None, stride, padding, dilation, groups, activation=act)
    want = ACTS[act](
        F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, stride, padding, dilation, groups)
    )
    _close(y, want)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(want.shape, generator=g)
    y.backward(dy)
    want.backward(dy)
    for got, ref in zip(leaves, ref_leaves):
        _close(got.grad, ref.grad, 2e-4)


def test_conv2d_no_grad_and_sum_backward():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    with torch.no_grad():
        assert not fk.conv2d(x, w).requires_grad
    # sum() hands the backward an expanded (zero-stride) gradient.
    fk.conv2d(x, w, activation="silu").sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.silu(F.conv2d(x2, w2)).sum().backward()
    _close(x.grad, x2.grad)
    _close(w.grad, w2.grad)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,ceil_mode",
    [(3, 2, 1, 1, False), (2, None, 0, 1, True), ((3, 2), (2, 3), (1, 1), 2, True)],
)
def test_max_pool2d_matches_torch(kernel, stride, padding, dilation, ceil_mode):
    x = torch.randn(2, 3, 10, 9, generator=torch.Generator().manual_seed(1)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, idx = fk.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    wy, widx = F.max_pool2d(x2, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    torch.testing.assert_close(y, wy, rtol=0, atol=0)
    assert idx.dtype == torch.int64
    torch.testing.assert_close(idx, widx)
    dy = torch.randn(y.shape)
    y.backward(dy)
    wy.backward(dy)
    _close(x.grad, x2.grad, 1e-6)


@pytest.mark.parametrize(
    "kernel,stride,padding,ceil_mode,include,divisor",
    [(3, 2, 1, False, True, None), (3, 2, 1, True, False, None), ((2, 3), (2, 1), (1, 1), False, True, 5)],
)
def test_avg_pool2d_matches_torch(kernel, stride, padding, ceil_mode, include, divisor):
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = fk.avg_pool2d(x, kernel, stride, padding, ceil_mode, include, divisor)
    wy = F.avg_pool2d(x2, kernel, stride, padding, ceil_mode, include, divisor)
    _close(y, wy, 1e-6)
    dy = torch.randn(y.shape)
    y.backward(dy)
    wy.backward(dy)
    _close(x.grad, x2.grad, 1e-6)


def test_bfloat16_conv():
    x = torch.randn(1, 4, 6, 6).to(torch.bfloat16)
    w = torch.randn(4, 4, 3, 3).to(torch.bfloat16)
    y = fk.conv2d(x, w, padding=1, activation="relu")
    assert y.dtype == torch.bfloat16
    _close(y, F.relu(F.conv2d(x.float(), w.float(), padding=1)), 2e-2)


def test_custom_ops_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration."""
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    for act in ("", "gelu"):
        torch.library.opcheck(
            torch.ops.flashkernels.conv2d_fwd.default,
            (x, w, b, [1, 2], [1, 0], [1, 1], 2, act, ""),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
    dy = torch.randn(2, 6, 7, 2)
    torch.library.opcheck(
        torch.ops.flashkernels.conv2d_bwd.default,
        (dy, x.detach(), w.detach(), [1, 2], [1, 0], [1, 1], 2, "", [True, True, True]),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph_conv():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, b):
        return fk.conv2d(x, w, b, padding=1, activation="silu").square().sum()

    loss = f(x, w, b)
    loss.backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    want = F.silu(F.conv2d(x2, w2, b2, padding=1)).square().sum()
    want.backward()
    _close(loss, want)
    for got, ref in ((x, x2), (w, w2), (b, b2)):
        _close(got.grad, ref.grad, 2e-4)


def test_pool_ops_opcheck():
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    for args in (
        ("max", [3, 3], [2, 2], [1, 1], [1, 1], False, True, 0),
        ("max", [2, 3], [2, 1], [0, 1], [2, 1], True, True, 0),
        ("avg", [3, 3], [2, 2], [1, 1], [1, 1], True, False, 0),
        ("avg", [2, 2], [2, 2], [1, 0], [1, 1], False, True, 3),
    ):
        torch.library.opcheck(
            torch.ops.flashkernels.pool2d_fwd.default,
            (x, *args),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


def test_torch_compile_fullgraph_pooling():
    x = torch.randn(2, 3, 9, 9, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        y, _ = fk.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
        return y.square().sum() + fk.avg_pool2d(x, 2, ceil_mode=True).sum()

    loss = f(x)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    want = F.max_pool2d(x2, 3, stride=2, padding=1).square().sum() + F.avg_pool2d(x2, 2, ceil_mode=True).sum()
    want.backward()
    _close(loss, want)
    _close(x.grad, x2.grad, 2e-4)


@pytest.mark.parametrize("order", ["import flashkernels, torch", "import torch, flashkernels"])
def test_conv_ops_registered_whatever_the_import_order(order):
    import subprocess
    import sys

    code = (
        f"{order}; assert hasattr(torch.ops.flashkernels, 'conv2d_fwd')"
        " and hasattr(torch.ops.flashkernels, 'conv2d_bwd') and hasattr(torch.ops.flashkernels, 'pool2d_fwd')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
