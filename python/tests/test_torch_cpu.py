"""torch on the CPU (the CPU reference behind autograd and the custom ops): gradients
against torch's SDPA in float32, torch.library.opcheck, torch.compile, and registration
whatever the import order. Skipped where torch is not installed (CI's venv)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import flashkernels as fk

torch = pytest.importorskip("torch")

F = torch.nn.functional


def bottom_right_mask(nq, nk, *, causal=False, window=(-1, -1)):
    """(nq, nk) bool: flash-attn's bottom-right aligned causal / window rule."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    diag = i + nk - nq
    mask = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    return mask


def sdpa_reference(q, k, v, *, causal=False, window=(-1, -1), scale=None):
    """torch's SDPA on (B, N, H, D) tensors (GQA through enable_gqa, masks explicit,
    bottom-right), returning (B, Nq, H, D)."""
    nq, nk = q.shape[1], k.shape[1]
    mask = None
    if causal or window != (-1, -1):
        mask = bottom_right_mask(nq, nk, causal=causal, window=window)
        assert mask.any(dim=1).all(), "choose cases where every query sees a key (torch would give NaN)"
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=scale, enable_gqa=True)
    return t(out)


def leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float32).to(dtype).requires_grad_() for s in shapes]


def grads_of(fn, inputs, dout):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [x.grad.clone() for x in inputs]


def assert_close(got, want, tol):
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got.float() - want.float()).abs().max() / scale).item()
    assert err < tol, err


CASES = {
    "plain": dict(b=2, h=3, hkv=3, nq=9, nk=9, d=16),
    "causal": dict(b=2, h=3, hkv=3, nq=9, nk=9, d=16, causal=True),
    "gqa": dict(b=1, h=8, hkv=2, nq=11, nk=11, d=16, causal=True),
    "mqa": dict(b=2, h=3, hkv=1, nq=7, nk=12, d=8),
    "window": dict(b=1, h=2, hkv=2, nq=17, nk=17, d=16, window=(3, 2)),
    "window_causal_gqa": dict(b=1, h=4, hkv=2, nq=17, nk=17, d=16, causal=True, window=(4, -1)),
    "cross_causal": dict(b=2, h=2, hkv=2, nq=5, nk=13, d=8, causal=True),
    "scale": dict(b=1, h=2, hkv=1, nq=6, nk=6, d=32, scale=0.3),
}


def _sdpa_layout_expresses(c):
    """torch's SDPA signature has no window, and its is_causal is top-left aligned (ours is
    bottom-right): only cases without a window and with square causal masks exist there."""
    return "window" not in c and not (c.get("causal") and c["nq"] != c["nk"])


LAYOUT_CASES = [(case, "flash") for case in CASES] + [
    (case, "sdpa") for case, c in CASES.items() if _sdpa_layout_expresses(c)
]


@pytest.mark.parametrize("case,layout", LAYOUT_CASES)
def test_autograd_vs_torch_sdpa(case, layout):
    c = dict(CASES[case])
    b, h, hkv, nq, nk, d = (c.pop(n) for n in ("b", "h", "hkv", "nq", "nk", "d"))
    causal, window, scale = c.get("causal", False), c.get("window", (-1, -1)), c.get("scale")
    q, k, v = leaves((b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d))
    dout = torch.randn(b, nq, h, d)
    want, want_grads = grads_of(
        lambda q, k, v: sdpa_reference(q, k, v, causal=causal, window=window, scale=scale), (q, k, v), dout
    )
    if layout == "flash":
        fn = lambda q, k, v: fk.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window)  # noqa: E731
    else:
        t = lambda x: x.transpose(1, 2)  # noqa: E731

        def fn(q, k, v):
            return t(fk.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=causal, scale=scale, enable_gqa=True))

    got, got_grads = grads_of(fn, (q, k, v), dout)
    assert_close(got, want, 1e-5)
    for g, w, x in zip(got_grads, want_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close(g, w, 1e-4)


def test_varlen_autograd_vs_per_sequence_sdpa():
    """Packed sequences (lengths 0 and 1 included): gradients on the packed tensors equal
    those of per-sequence SDPA on slices of them."""
    lens_q, lens_k = [3, 0, 1, 6, 4], [4, 2, 1, 6, 7]
    cu_q = torch.tensor([0, *np.cumsum(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *np.cumsum(lens_k)], dtype=torch.int32)
    h, hkv, d = 4, 2, 16
    q, k, v = leaves((int(cu_q[-1]), h, d), (int(cu_k[-1]), hkv, d), (int(cu_k[-1]), hkv, d))
    dout = torch.randn(int(cu_q[-1]), h, d)

    def reference(q, k, v):
        outs = []
        for b in range(len(lens_q)):
            rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            if lens_q[b]:
                outs.append(sdpa_reference(q[None, rq], k[None, rk], v[None, rk], causal=True)[0])
        return torch.cat(outs)

    want, want_grads = grads_of(reference, (q, k, v), dout)
    got, got_grads = grads_of(
        lambda q, k, v: fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 7, causal=True), (q, k, v), dout
    )
    assert_close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu(dtype):
    q, k, v = leaves((1, 9, 4, 16), (1, 9, 2, 16), (1, 9, 2, 16), dtype=dtype)
    dout = torch.randn(1, 9, 4, 16).to(dtype)
    got, got_grads = grads_of(lambda q, k, v: fk.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    assert got.dtype == dtype and all(g.dtype == dtype for g in got_grads)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want, want_grads = grads_of(lambda q, k, v: sdpa_reference(q, k, v, causal=True), (q32, k32, v32), dout.float())
    assert_close(got, want, 1e-2)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, 2e-2)


def test_autograd_details():
    q, k, v = leaves((1, 7, 2, 8), (1, 7, 2, 8), (1, 7, 2, 8))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    # lse is not differentiable; out is.
    assert out.requires_grad and not lse.requires_grad
    # out.sum().backward() hands the backward an expanded dout (all strides 0).
    out.sum().backward()
    want = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    fk.flash_attn_func(q, k, v, causal=True).backward(torch.ones(1, 7, 2, 8))
    for x, w in zip((q, k, v), want):
        torch.testing.assert_close(x.grad, w, rtol=0, atol=0)
    # Gradients only where asked.
    q2, k2, v2 = (x.detach() for x in (q, k, v))
    k2.requires_grad_()
    fk.flash_attn_func(q2, k2, v2, causal=True).square().sum().backward()
    assert q2.grad is None and v2.grad is None and k2.grad is not None
    # No graph without grad.
    with torch.no_grad():
        assert fk.flash_attn_func(q, k, v).grad_fn is None
    assert fk.flash_attn_func(q2, q2, q2).grad_fn is None
    # The backward is not differentiable itself (double backward).
    out = fk.flash_attn_func(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        gq.sum().backward()


def test_functional_backward_with_torch_tensors():
    q, k, v = leaves((2, 7, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8))
    dout = torch.randn(2, 7, 4, 8)
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    out.backward(dout)
    dq, dk, dv = fk.attention_backward(q, k, v, out, lse, dout, causal=True)
    assert dq.grad_fn is None
    for g, x in zip((dq, dk, dv), (q, k, v)):
        torch.testing.assert_close(g, x.grad, rtol=0, atol=0)


def test_sdpa_layout_outputs_are_views():
    """torch's layout: out and the gradients are (B, H, N, D) views of (B, N, H, D)
    memory, as torch's flash backend returns them."""
    q, k, v = leaves((1, 3, 6, 8), (1, 3, 6, 8), (1, 3, 6, 8))
    out = fk.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.transpose(1, 2).is_contiguous()
    out.sum().backward()
    assert q.grad.shape == q.shape


# ---- torch.library custom ops


def op_args(layout, seed=0):
    """Arguments of torch.ops.flashkernels.attention_fwd, inputs requiring grad."""
    if layout == "varlen":
        cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
        cu_k = torch.tensor([0, 4, 6, 13], dtype=torch.int32)
        q, k, v = leaves((10, 4, 16), (13, 2, 16), (13, 2, 16), seed=seed)
        return (q, k, v, cu_q, cu_k, 7, 7, False, True, None, 2, -1)
    if layout == "sdpa":
        q, k, v = leaves((2, 4, 7, 16), (2, 2, 9, 16), (2, 2, 9, 16), seed=seed)
        return (q, k, v, None, None, -1, -1, True, False, 0.3, -1, -1)
    q, k, v = leaves((2, 7, 4, 16), (2, 9, 1, 16), (2, 9, 1, 16), seed=seed)
    return (q, k, v, None, None, -1, -1, False, True, None, 3, 1)


@pytest.mark.parametrize("layout", ["flash", "sdpa", "varlen"])
def test_opcheck_forward(layout):
    torch.library.opcheck(torch.ops.flashkernels.attention_fwd.default, op_args(layout))


@pytest.mark.parametrize("layout", ["flash", "sdpa", "varlen"])
def test_opcheck_backward(layout):
    args = op_args(layout)
    q, k, v = (x.detach() for x in args[:3])
    out, lse = torch.ops.flashkernels.attention_fwd(q, k, v, *args[3:])
    dout = torch.randn_like(out)
    cu_q, cu_k, _, _, heads_first, causal, scale, left, right = args[3:]
    torch.library.opcheck(
        torch.ops.flashkernels.attention_bwd.default,
        (dout, q, k, v, out, lse, cu_q, cu_k, heads_first, causal, scale, left, right),
    )


def test_op_matches_eager_route():
    """The custom op (compile route) and the autograd.Function (eager route) give the same
    outputs and gradients."""
    args = op_args("flash")
    q, k, v = args[:3]
    out, lse = torch.ops.flashkernels.attention_fwd(*args)
    dout = torch.randn_like(out)
    out.backward(dout)
    op_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    out2, lse2 = fk.flash_attn_func(q, k, v, causal=True, window_size=(3, 1), return_lse=True)
    out2.backward(dout)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for a, x in zip(op_grads, (q, k, v)):
        assert torch.equal(a, x.grad)


# ---- torch.compile


def compile_case(fn_name):
    """(fn, inputs): a function calling flashkernels, and leaf inputs for it."""
    if fn_name == "flash":
        inputs = leaves((2, 9, 4, 16), (2, 11, 2, 16), (2, 11, 2, 16))

        def fn(q, k, v):
            out, lse = fk.flash_attn_func(q, k, v, causal=True, window_size=(4, -1), return_lse=True)
            return (out * 2).sin().sum() + lse.sum()

    elif fn_name == "sdpa":
        inputs = leaves((2, 4, 9, 16), (2, 2, 9, 16), (2, 2, 9, 16))

        def fn(q, k, v):
            return fk.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).square().sum()

    else:
        inputs = leaves((10, 4, 16), (13, 2, 16), (13, 2, 16))
        cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
        cu_k = torch.tensor([0, 4, 6, 13], dtype=torch.int32)

        def fn(q, k, v):
            return fk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7, causal=True).cos().sum()

    return fn, inputs


def check_compiled(fn_name, backend, exact):
    fn, inputs = compile_case(fn_name)
    want = fn(*inputs)
    want.backward()
    want_grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = compiled(*inputs)
    got.backward()
    if exact:
        assert torch.equal(got, want)
        for x, w in zip(inputs, want_grads):
            assert torch.equal(x.grad, w)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for x, w in zip(inputs, want_grads):
            torch.testing.assert_close(x.grad, w, rtol=1e-4, atol=1e-5)
    return compiled


@pytest.mark.parametrize("fn_name", ["flash", "sdpa", "varlen"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(fn_name, backend):
    """fullgraph=True: no graph break anywhere (forward, and the backward through the
    registered autograd formula); the same numbers as eager."""
    compiled = check_compiled(fn_name, backend, exact=True)
    if fn_name == "flash":
        # Other shapes: a recompile (dynamic shapes), still no graph break.
        q, k, v = leaves((1, 5, 4, 16), (1, 12, 2, 16), (1, 12, 2, 16), seed=1)
        compiled(q, k, v).backward()
        assert q.grad.shape == q.shape


def test_compile_functional_backward():
    """fk.attention_backward traces as the attention_bwd op."""
    q, k, v = (x.detach() for x in leaves((1, 7, 4, 8), (1, 9, 2, 8), (1, 9, 2, 8)))
    out, lse = fk.flash_attn_func(q, k, v, causal=True, return_lse=True)
    dout = torch.randn_like(out)

    def fn(q, k, v, out, lse, dout):
        return fk.attention_backward(q, k, v, out, lse, dout, causal=True, window_size=(2, -1))

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, out, lse, dout)
    for g, w in zip(got, fn(q, k, v, out, lse, dout)):
        assert torch.equal(g, w)


def test_compile_inductor():
    """The default backend: inductor compiles the code around the op (C++ on the CPU)."""
    check_compiled("flash", "inductor", exact=False)


def test_compile_counts_one_graph():
    """The traced forward holds exactly one flashkernels op and nothing is left to eager."""
    fn, inputs = compile_case("flash")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("flashkernels.attention_fwd" in t for t in targets) == 1, targets


# ---- registration and import order (fresh interpreters)


def run_python(code):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


OPCHECK = """
q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
args = (q, k, v, None, None, -1, -1, False, True, None, -1, -1)
torch.library.opcheck(torch.ops.flashkernels.attention_fwd.default, args)
f = torch.compile(lambda q: fk.flash_attn_func(q, q, q, causal=True).sum(), fullgraph=True, backend="aot_eager")
f(q).backward()
assert q.grad is not None
print("ok")
"""


def test_import_flashkernels_then_torch():
    """The ops exist as soon as torch is imported, before any flashkernels call; torch's
    module keeps its own loader."""
    out = run_python(
        "import sys, flashkernels as fk\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "assert hasattr(torch.ops.flashkernels, 'attention_fwd')\n"
        "assert type(torch.__loader__).__name__ == 'SourceFileLoader', torch.__loader__\n"
        "assert torch.__spec__.loader is torch.__loader__\n" + OPCHECK
    )
    assert out.strip() == "ok"


def test_import_torch_then_flashkernels():
    out = run_python(
        "import torch\nimport flashkernels as fk\nassert hasattr(torch.ops.flashkernels, 'attention_bwd')\n" + OPCHECK
    )
    assert out.strip() == "ok"


def test_import_torch_submodule_first():
    out = run_python("import flashkernels as fk\nimport torch.nn.functional\nimport torch\n" + OPCHECK)
    assert out.strip() == "ok"


def test_first_use_registers_under_compile():
    """Without the import hook, the first call registers the ops, even when that call is
    being traced by torch.compile."""
    out = run_python(
        "import sys, flashkernels as fk\n"
        "fk._remove_torch_hook()\n"
        "import torch\n"
        "assert 'flashkernels._torch' not in sys.modules\n"
        "q = torch.randn(1, 5, 2, 8, requires_grad=True)\n"
        "f = torch.compile(lambda q: fk.flash_attn_func(q, q, q, causal=True).sum(), fullgraph=True,"
        " backend='aot_eager')\n"
        "f(q).backward()\n"
        "assert q.grad is not None and hasattr(torch.ops.flashkernels, 'attention_fwd')\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


def test_register_torch_ops_is_idempotent():
    fk.register_torch_ops()
    fk.register_torch_ops()
    assert hasattr(torch.ops.flashkernels, "attention_fwd")


# ---- errors on the torch path


def test_torch_errors():
    q = torch.randn(1, 5, 4, 8, requires_grad=True)
    k = torch.randn(1, 5, 3, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        fk.flash_attn_func(q, k, k)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fk.scaled_dot_product_attention(q.transpose(1, 2), k[:, :, :2].transpose(1, 2), k[:, :, :2].transpose(1, 2))
    packed = torch.randn(10, 2, 8)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32.*got int64"):
        fk.flash_attn_varlen_func(
            packed, packed, packed, torch.tensor([0, 10]), torch.tensor([0, 10], dtype=torch.int32), 10, 10
        )
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is smaller than the longest sequence \(6\)"):
        fk.flash_attn_varlen_func(packed, packed, packed, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="window_size"):
        fk.flash_attn_func(q, q, q, window_size=(-2, 0))
    with pytest.raises(ValueError, match="must be non-decreasing"):
        bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
        fk.flash_attn_varlen_func(packed.requires_grad_(), packed, packed, bad, bad, 10, 10)
