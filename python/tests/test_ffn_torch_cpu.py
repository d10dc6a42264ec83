"""torch CPU tensors through flashkernels' fused feed-forward block: forward and gradients
against nn.Linear + activation and a Llama-style SwiGLU MLP, the torch.library ops
(opcheck, torch.compile), the FeedForward module's state_dict against nn.Linear layers,
and the errors. Skipped without torch."""

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import flashkernels as fk  # noqa: E402

ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(
        got.detach().double(), want.detach().double(), rtol=tol, atol=tol * max(1.0, want.abs().max().item())
    )


def _reference(x, w1, w2, w3, b1, b2, b3, activation, residual):
    h = ACTS[activation](F.linear(x, w1, b1))
    if w3 is not None:
        h = h * F.linear(x, w3, b3)
    y = F.linear(h, w2, b2)
    return y + x if residual else y


def _tensors(g, lead, d_model, d_hidden, gated, bias, dtype=torch.float32):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = r(*lead, d_model)
    w1 = r(d_hidden, d_model, scale=d_model**-0.5)
    w2 = r(d_model, d_hidden, scale=d_hidden**-0.5)
    w3 = r(d_hidden, d_model, scale=d_model**-0.5) if gated else None
    b1 = r(d_hidden, scale=0.5) if bias else None
    b2 = r(d_model, scale=0.5) if bias else None
    b3 = r(d_hidden, scale=0.5) if bias and gated else None
    return [x, w1, w2, w3, b1, b2, b3]


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("lead", [(7,), (3, 5), (1,)])
def test_autograd_matches_torch(activation, gated, bias, residual, lead):
    g = torch.Generator().manual_seed(len(lead) * 100 + int(gated) * 10 + int(bias) + 2 * int(residual))
    ts = _tensors(g, lead, 12, 20, gated, bias)
    leaves = [None if t is None else t.clone().requires_grad_() for t in ts]
    ref = [None if t is None else t.clone().requires_grad_() for t in ts]
    x, w1, w2, w3, b1, b2, b3 = leaves
    y = fk.feed_forward(x, w1, w2, b1, b2, w3=w3, b3=b3, activation=activation, residual=residual)
    want = _reference(*ref, activation, residual)
    assert y.shape == want.shape and y.dtype == want.dtype
    _close(y, want)
    dy = torch.randn(want.shape, generator=g)
    y.backward(dy)
    want.backward(dy)
    for name, a, b in zip(("x", "w1", "w2", "w3", "b1", "b2", "b3"), leaves, ref):
        if a is None:
            continue
        assert a.grad is not None, name
        _close(a.grad, b.grad, 2e-5)


def test_llama_swiglu_mlp():
    """Llama's MLP: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases, through
    FeedForward(gated=True, activation="silu", bias=False) with the same weights."""

    class LlamaMLP(torch.nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.gate_proj = torch.nn.Linear(d, h, bias=False)
            self.up_proj = torch.nn.Linear(d, h, bias=False)
            self.down_proj = torch.nn.Linear(h, d, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    llama = LlamaMLP(16, 44)
    ff = fk.FeedForward(16, 44, activation="silu", gated=True, bias=False)
    ff.load_state_dict(
        {
            "w1.weight": llama.gate_proj.weight.detach(),
            "w3.weight": llama.up_proj.weight.detach(),
            "w2.weight": llama.down_proj.weight.detach(),
        }
    )
    x = torch.randn(2, 9, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = ff(xa), llama(xb)
    _close(y, want)
    dy = torch.randn_like(want)
    y.backward(dy)
    want.backward(dy)
    _close(xa.grad, xb.grad, 2e-5)
    _close(ff.w1.weight.grad, llama.gate_proj.weight.grad, 2e-5)
    _close(ff.w3.weight.grad, llama.up_proj.weight.grad, 2e-5)
    _close(ff.w2.weight.grad, llama.down_proj.weight.grad, 2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_match_float64(dtype):
    g = torch.Generator().manual_seed(5)
    ts = _tensors(g, (11,), 16, 24, True, True, dtype)
    y = fk.feed_forward(ts[0], ts[1], ts[2], ts[4], ts[5], w3=ts[3], b3=ts[6], activation="gelu_tanh")
    assert y.dtype == dtype
    want = _reference(*[None if t is None else t.double() for t in ts], "gelu_tanh", False)
    # Rounded twice (h, then y): a few spacings of the dtype.
    tol = 8 * (2.0**-10 if dtype == torch.float16 else 2.0**-7)
    _close(y, want, tol)


@pytest.mark.parametrize("gated", [False, True])
def test_state_dict_round_trip_with_linear_layers(gated):
    torch.manual_seed(1)
    ff = fk.FeedForward(8, 24, activation="gelu", gated=gated)
    keys = {"w1.weight", "w1.bias", "w2.weight", "w2.bias"} | ({"w3.weight", "w3.bias"} if gated else set())
    sd = ff.state_dict()
    assert set(sd) == keys
    assert isinstance(ff.w1, torch.nn.Linear) and isinstance(ff.w2, torch.nn.Linear)
    assert sd["w1.weight"].shape == (24, 8) and sd["w2.weight"].shape == (8, 24)
    # Into nn.Linear layers and back.
    lin = {n: torch.nn.Linear(*((8, 24) if n != "w2" else (24, 8))) for n in ("w1", "w2", "w3")}
    for n in ("w1", "w2") + (("w3",) if gated else ()):
        lin[n].load_state_dict({"weight": sd[f"{n}.weight"], "bias": sd[f"{n}.bias"]})
    x = torch.randn(5, 8)
    h = F.gelu(lin["w1"](x))
    if gated:
        h = h * lin["w3"](x)
    _close(ff(x), lin["w2"](h))
    other = fk.FeedForward(8, 24, activation="gelu", gated=gated)
    other.load_state_dict({f"{n}.{p}": getattr(lin[n], p).detach() for n, p in (k.split(".") for k in keys)})
    _close(other(x), ff(x), 0)
    # Mismatched shapes: torch's own size-mismatch error.
    small = fk.FeedForward(8, 16, gated=gated)
    with pytest.raises(RuntimeError, match="size mismatch for w1.weight"):
        small.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        fk.FeedForward(8, 24, gated=not gated).load_state_dict(sd)


def test_module_options_and_repr():
    ff = fk.FeedForward(8, 16, activation="relu", bias=False, residual=True, dtype=torch.float64)
    assert ff.w1.bias is None and ff.w1.weight.dtype == torch.float64
    assert "relu" in repr(ff) and "residual=True" in repr(ff)
    ff = fk.FeedForward(8, 16, activation="relu", bias=False, residual=True)
    x = torch.randn(3, 8)
    _close(ff(x), F.linear(F.relu(F.linear(x, ff.w1.weight)), ff.w2.weight) + x)
    with pytest.raises(ValueError, match="x must be \\(..., 8\\)"):
        ff(torch.randn(3, 9))
    with pytest.raises(ValueError, match="activation"):
        fk.FeedForward(8, 16, activation="tanh")
    with pytest.raises(TypeError, match="gated"):
        fk.FeedForward(8, 16, gated="yes")
    with pytest.raises(ValueError, match="d_hidden"):
        fk.FeedForward(8, 0)


def test_custom_ops_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration."""
    fk.register_torch_ops()
    g = torch.Generator().manual_seed(2)
    for gated, bias in [(False, False), (True, True)]:
        x, w1, w2, w3, b1, b2, b3 = _tensors(g, (6,), 8, 16, gated, bias)
        leaves = [None if t is None else t.requires_grad_() for t in (x, w1, w2, w3, b1, b2, b3)]
        torch.library.opcheck(torch.ops.flashkernels.ffn_fwd.default, (*leaves, "silu", True))
        dy = torch.randn(6, 8, generator=g)
        plain = [None if t is None else t.detach() for t in leaves]
        need = [t is not None for t in plain]
        torch.library.opcheck(torch.ops.flashkernels.ffn_bwd.default, (dy, *plain, "silu", True, need))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(3)
    x, w1, w2, w3, b1, b2, b3 = _tensors(g, (2, 5), 8, 16, True, True)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w3, b1, b2, b3)]
    ref = [t.clone().requires_grad_() for t in (x, w1, w2, w3, b1, b2, b3)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w1, w2, w3, b1, b2, b3):
        return fk.feed_forward(x, w1, w2, b1, b2, w3=w3, b3=b3, activation="gelu") * 2

    y = f(*leaves)
    want = _reference(*ref, "gelu", False) * 2
    _close(y, want)
    y.sum().backward()
    want.sum().backward()
    for a, b in zip(leaves, ref):
        _close(a.grad, b.grad, 2e-5)


def test_module_under_compile():
    torch.manual_seed(4)
    ff = fk.FeedForward(8, 16, activation="silu", gated=True)
    x = torch.randn(4, 8)
    _close(torch.compile(ff, backend="aot_eager", fullgraph=True)(x), ff(x))


def test_no_grad_and_expanded_grad_output():
    g = torch.Generator().manual_seed(6)
    x, w1, w2, *_ = _tensors(g, (4,), 8, 16, False, False)
    with torch.no_grad():
        y = fk.feed_forward(x, w1.requires_grad_(), w2)
    assert not y.requires_grad
    y = fk.feed_forward(x, w1, w2)
    y.sum().backward()  # an expanded (zero-stride) output gradient
    w = w1.detach().clone().requires_grad_()
    _reference(x, w, w2, None, None, None, None, "gelu", False).sum().backward()
    _close(w1.grad, w.grad, 2e-5)


def test_any_strides_like_linear():
    """nn.Linear takes any strides: transposed weights and a column-strided x too."""
    g = torch.Generator().manual_seed(9)
    x, w1, w2, w3, *_ = _tensors(g, (6,), 8, 16, True, False)
    xt = x.t().contiguous().t()  # column-major: last stride 6
    w1t = w1.t().contiguous().t()
    leaves = [t.clone().requires_grad_() for t in (xt, w1t, w2, w3)]
    y = fk.feed_forward(leaves[0], leaves[1], leaves[2], w3=leaves[3], activation="silu")
    ref = [t.detach().clone().requires_grad_() for t in (x, w1, w2, w3)]
    want = _reference(ref[0], ref[1], ref[2], ref[3], None, None, None, "silu", False)
    _close(y, want)
    y.sum().backward()
    want.sum().backward()
    for a, b in zip(leaves, ref):
        _close(a.grad, b.grad, 2e-5)


def test_double_backward_raises():
    g = torch.Generator().manual_seed(7)
    x, w1, w2, *_ = _tensors(g, (4,), 8, 16, False, False)
    x.requires_grad_()
    y = fk.feed_forward(x, w1, w2, activation="silu")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_errors():
    g = torch.Generator().manual_seed(8)
    x, w1, w2, w3, b1, b2, b3 = _tensors(g, (4,), 8, 16, True, True)
    with pytest.raises(ValueError, match="w1"):
        fk.feed_forward(x, w1[:, :4], w2)
    with pytest.raises(ValueError, match="w2"):
        fk.feed_forward(x, w1, w2.t())
    with pytest.raises(ValueError, match="w3"):
        fk.feed_forward(x, w1, w2, w3=w3[:4])
    with pytest.raises(TypeError, match="w2"):
        fk.feed_forward(x, w1, w2.double())
    with pytest.raises(TypeError, match="one framework"):
        fk.feed_forward(x, w1.numpy(), w2)
    with pytest.raises(ValueError, match="activation"):
        fk.feed_forward(x, w1, w2, activation="gelu_erf")
    with pytest.raises(TypeError, match="residual"):
        fk.feed_forward(x, w1, w2, residual=1)
