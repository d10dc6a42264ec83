# ruff: noqa: E501  (the case table: one-line code snippets, kept whole for reading)
"""Fuzz cases (name, code, expectation): torch CPU tensors, memory (span copies, huge sizes) and seeded random valid cases; run by test_fuzz.py."""

from _fuzz import OK, REJECT, REJECT_OR_OOM


def torch_cases():
    c = []
    add = c.append
    add(("torch fwd", "close(fk.flash_attn_func(tq, tk, tv, causal=True).numpy(), attn(q, k, v, causal=True))", OK))
    add(
        (
            "torch autograd",
            """
            a, b_, c_ = (t.clone().requires_grad_() for t in (tq, tk, tv))
            fk.flash_attn_func(a, b_, c_).backward(torch.from_numpy(dout))
            for g, r in zip((a.grad, b_.grad, c_.grad), attn_grads(q, k, v, dout)):
                close(g.numpy(), r, 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "torch sum backward (zero-stride gradient)",
            "a = tq.clone().requires_grad_(); fk.flash_attn_func(a, tk, tv).sum().backward(); assert a.grad is not None",
            OK,
        )
    )
    add(
        (
            "torch non-contiguous",
            "t = torch.randn(1, 2, 8, 16).transpose(1, 2); close(fk.flash_attn_func(t, t, t).numpy(), attn(t.numpy(), t.numpy(), t.numpy()))",
            OK,
        )
    )
    add(
        (
            "torch expanded k",
            "ke = tk[:, :1].expand_as(tk); close(fk.flash_attn_func(tq, ke, ke).numpy(), attn(q, ke.numpy(), ke.numpy()))",
            OK,
        )
    )
    add(
        (
            "torch huge window",
            f"close(fk.flash_attn_func(tq, tk, tv, window_size=({2**70}, 0)).numpy(), attn(q, k, v, causal=True))",
            OK,
        )
    )
    add(
        (
            "torch varlen",
            "out = fk.flash_attn_varlen_func(tq[0], tk[0], tv[0], torch.tensor([0, 8], dtype=torch.int32), [0, 8], 8, 8); close(out.numpy(), attn(q, k, v)[0])",
            OK,
        )
    )
    add(
        (
            "torch conv autograd",
            "a = tx.clone().requires_grad_(); fk.conv2d(a, tw, tb, padding=1).sum().backward(); assert a.grad.shape == a.shape",
            OK,
        )
    )
    add(("torch conv", "close(fk.conv2d(tx, tw, tb, stride=2).numpy(), ref_conv(x, w, b, stride=(2, 2)))", OK))
    add(
        (
            "torch conv channels_last",
            "xc = tx.contiguous(memory_format=torch.channels_last); close(fk.conv2d(xc, tw).numpy(), ref_conv(x, w))",
            OK,
        )
    )
    add(
        (
            "torch max_pool",
            "y2, i2 = fk.max_pool2d(tx, 2, return_indices=True); close(y2.numpy(), ref_pool(x, 'max', (2, 2))); assert i2.dtype == torch.int64",
            OK,
        )
    )
    add(
        (
            "torch max_pool autograd",
            "a = tx.clone().requires_grad_(); fk.max_pool2d(a, 2).sum().backward(); assert a.grad.sum().item() == 18",
            OK,
        )
    )
    add(
        (
            "torch avg_pool autograd",
            "a = tx.clone().requires_grad_(); fk.avg_pool2d(a, 2).sum().backward(); close(a.grad.numpy(), np.full(x.shape, 0.25))",
            OK,
        )
    )
    add(("torch longformer", "close(fk.longformer_attention(tq, tk, tv, 8).numpy(), attn(q, k, v))", OK))
    add(
        (
            "torch longformer autograd",
            "a = tq.clone().requires_grad_(); fk.longformer_attention(a, tk, tv, 1, global_tokens=[[0]]).sum().backward(); assert a.grad is not None",
            OK,
        )
    )
    add(
        (
            "torch max_pool2d_backward int64",
            "y2, i2 = fk.max_pool2d(tx, 2, return_indices=True); fk.max_pool2d_backward(torch.ones_like(y2), tx, i2, 2)",
            OK,
        )
    )
    # Mixed frameworks (issue item 4): a TypeError naming the types, no array contents.
    for name, expr in {
        "numpy q, torch k/v requiring grad": "fk.scaled_dot_product_attention(q, tk.requires_grad_(), tv)",
        "torch q, numpy k/v": "fk.scaled_dot_product_attention(tq, k, v)",
        "flash numpy v": "fk.flash_attn_func(tq, tk, v)",
        "varlen mixed": "fk.flash_attn_varlen_func(tq[0], k[0], v[0], cu, cu, 5, 5)",
        "backward numpy lse": "fk.attention_backward(tq, tk, tv, torch.from_numpy(o), lse, torch.from_numpy(dout))",
        "longformer mixed": "fk.longformer_attention(q, tk, tv, 2)",
        "longformer global_qkv mixed": "fk.longformer_attention(tq, tk, tv, 2, global_tokens=[[0]], global_qkv=(q, k, v))",
        "longformer backward mixed": "fk.longformer_attention_backward(tq, tk, tv, o, lse, dout, 2)",
        "conv weight": "fk.conv2d(tx, w)",
        "conv bias": "fk.conv2d(x, w, tb)",
        "conv_backward": "fk.conv2d_backward(torch.from_numpy(dy), x, w)",
        "max_pool2d_backward indices": "fk.max_pool2d_backward(dyp, x, torch.from_numpy(idx), 2)",
        "avg_pool2d_backward": "fk.avg_pool2d_backward(torch.from_numpy(dyp), x, 2)",
        "ring numpy k": "fk.ring_attention(tq, k, tv)",
        "ring causal str": "fk.ring_attention(tq, tk, tv, causal='no')",
        "ring scale str": "fk.ring_attention(tq, tk, tv, softmax_scale='a')",
    }.items():
        add((f"mixed {name}", expr, "TypeError"))
    # The numpy array cases, as torch tensors (torch has no negative strides).
    for name, expr in {
        "rank 3": "tq[0]",
        "rank 5": "tq[None]",
        "float64": "tq.double()",
        "int32": "tq.int()",
        "bool": "tq > 0",
        "complex64": "tq.to(torch.complex64)",
        "empty seq": "tq[:, :0]",
        "empty batch": "tq[:0]",
        "empty head_dim": "tq[..., :0]",
        "head_dim 7": "tq[..., :7]",
        "head_dim 512": "torch.randn(1, 8, 2, 512)",
        "last stride 2": "torch.randn(1, 8, 2, 32)[..., ::2]",
        "zero stride head_dim": "tq[..., :1].expand_as(tq)",
        "heads not a multiple": "torch.randn(1, 8, 3, 16)",
        "batch mismatch": "torch.randn(2, 8, 2, 16)",
        "meta device": "torch.empty(1, 8, 2, 16, device='meta')",
        "sparse": "tq.to_sparse()",
    }.items():
        for arg in ("q", "k"):
            call = f"fk.flash_attn_func({expr}, tk, tv)" if arg == "q" else f"fk.flash_attn_func(tq, {expr}, tv)"
            exc = (
                REJECT if name != "meta device" else ("TypeError", "ValueError", "RuntimeError", "NotImplementedError")
            )
            add((f"torch fwd {arg} {name}", call, exc))
    for name, expr in {
        "rank 3 input": "fk.conv2d(tx[0], tw)",
        "conv float64": "fk.conv2d(tx.double(), tw.double())",
        "groups 3": "fk.conv2d(tx, tw, groups=3)",
        "stride 0": "fk.conv2d(tx, tw, stride=0)",
        "empty batch": "fk.conv2d(tx[:0], tw)",
        "bias wrong length": "fk.conv2d(tx, tw, torch.randn(4))",
        "pool kernel 7": "fk.max_pool2d(tx, 7)",
        "pool padding > kernel/2": "fk.avg_pool2d(tx, 2, 1, 2)",
        "pool empty plane": "fk.max_pool2d(tx[:, :, :0], 2)",
        "pool int": "fk.max_pool2d(tx.int(), 2)",
        "longformer rank 3": "fk.longformer_attention(tq[0], tk[0], tv[0], 1)",
        "longformer global index 8": "fk.longformer_attention(tq, tk, tv, 1, global_tokens=[[8]])",
        "longformer mask float": "fk.longformer_attention(tq, tk, tv, 1, global_tokens=torch.ones(1, 8))",
        "varlen cu int64": "fk.flash_attn_varlen_func(tq[0], tk[0], tv[0], torch.tensor([0, 8]), torch.tensor([0, 8]), 8, 8)",
        "backward lse float16": "fk.attention_backward(tq, tk, tv, torch.from_numpy(o), torch.from_numpy(lse).half(), torch.from_numpy(dout))",
    }.items():
        add((f"torch {name}", expr, REJECT))
    # torch-only failures.
    for name, expr in {
        "float64": "fk.flash_attn_func(tq.double(), tk.double(), tv.double())",
        "int": "fk.flash_attn_func(tq.int(), tk.int(), tv.int())",
        "causal str": "fk.flash_attn_func(tq, tk, tv, causal='no')",
        "scale 1e-50": "fk.flash_attn_func(tq, tk, tv, softmax_scale=1e-50)",
        "scale tensor": "fk.flash_attn_func(tq, tk, tv, softmax_scale=torch.tensor([1.0, 2.0]))",
        "window 2**70 negative": f"fk.flash_attn_func(tq, tk, tv, window_size=({-(2**70)}, 0))",
        "conv padding 2**62": f"fk.conv2d(tx, tw, padding={2**62})",
        "conv padding 2**70": f"fk.conv2d(tx, tw, padding={2**70})",
        "conv groups -1": "fk.conv2d(tx, tw, groups=-1)",
        "pool kernel 2**63+1": f"fk.max_pool2d(tx, {2**63 + 1}, dilation=2)",
        "pool divisor 2**70": f"fk.avg_pool2d(tx, 2, divisor_override={2**70})",
        "max_pool2d_backward int64 2**32+3": f"fk.max_pool2d_backward(torch.ones(1, 2, 3, 3), tx, torch.full((1, 2, 3, 3), {2**32 + 3}), 2)",
        "max_pool2d_backward short": "fk.max_pool2d_backward(torch.ones(1, 2, 3, 3), tx, torch.zeros(100, dtype=torch.int32)[:1], 2)",
        "max_pool2d_backward None": "fk.max_pool2d_backward(torch.ones(1, 2, 3, 3), tx, None, 2)",
        "longformer window -1": "fk.longformer_attention(tq, tk, tv, -1)",
        "longformer causal str": "fk.longformer_attention(tq, tk, tv, 1, causal='no')",
        "ring without a process group": "fk.ring_attention(tq, tk, tv)",
    }.items():
        exc = ("RuntimeError",) if name == "ring without a process group" else REJECT
        add((f"torch {name}", expr, exc))
    # Double backward (issue item 5): a clear RuntimeError, never a silent detached gradient.
    add(
        (
            "torch double backward sdpa",
            """
            a = tq.clone().requires_grad_()
            (g,) = torch.autograd.grad(fk.scaled_dot_product_attention(a, tk, tv).sum(), a, create_graph=True)
            assert g.requires_grad
            g.sum().backward()
            """,
            ("RuntimeError",),
        )
    )
    add(
        (
            "torch double backward conv",
            """
            a = tx.clone().requires_grad_()
            (g,) = torch.autograd.grad(fk.conv2d(a, tw).square().sum(), a, create_graph=True)
            g.sum().backward()
            """,
            ("RuntimeError",),
        )
    )
    return c


def memory_cases():
    c = []
    add = c.append
    # Issue item 3: a 4 KB view of a 3 GiB array costs O(4 KB), not its span. The array
    # itself is untouched calloc memory: address space, no resident pages.
    add(
        (
            "strided view of a 3 GiB array",
            """
            import resource
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            base = np.zeros((1, 3 * 2**22, 1, 64), np.float32)
            qv = base[:, :: 3 * 2**18]
            out = fk.flash_attn_func(qv, qv.copy(), qv.copy())
            assert out.shape == (1, 16, 1, 64) and not out.any()
            grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10
            assert grew < 256, f"resident memory grew by {grew:.0f} MiB"
            """,
            OK,
        )
    )
    add(
        (
            "broadcast k/v of 2**30 keys",
            """
            kb = np.broadcast_to(np.zeros((1, 1, 1, 64), np.float32), (1, 2**30, 1, 64))
            fk.flash_attn_func(np.zeros((1, 1, 1, 64), np.float32), kb, kb)
            """,
            REJECT_OR_OOM,
        )
    )
    add(
        (
            "conv of a broadcast 2**40-element input",
            """
            xb = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (1, 1, 2**20, 2**20))
            fk.conv2d(xb, np.ones((1, 1, 1, 1), np.float32))
            """,
            REJECT_OR_OOM,
        )
    )
    add(
        (
            "pool output of 2**40 elements",
            "fk.avg_pool2d(np.broadcast_to(np.float32(0), (1, 1, 2**20, 2**20)), 1)",
            REJECT_OR_OOM,
        )
    )
    add(("conv padding 2**20 (terabytes of output)", f"fk.conv2d(x, w, padding={2**20})", REJECT_OR_OOM))
    add(("conv padding 2**30", f"fk.conv2d(x, w, padding={2**30})", REJECT_OR_OOM))
    # Valid: 7 x 7 windows, each covering the whole input (a reference that scans the
    # padded window instead of its intersection with the input never finishes).
    add(
        (
            "max_pool2d padding huge, kernel huge",
            f"y2 = fk.max_pool2d(x, {2**40}, 1, {2**39}); close(y2, np.broadcast_to(x.max((2, 3), keepdims=True), (1, 2, 7, 7)), 0)",
            OK,
        )
    )
    add(
        (
            "avg_pool2d padding huge, kernel huge",
            f"y2 = fk.avg_pool2d(x, {2**40}, 1, {2**39}, count_include_pad=False); close(y2, np.broadcast_to(x.mean((2, 3), keepdims=True), (1, 2, 7, 7)), 1e-5)",
            OK,
        )
    )
    return c


def random_cases(seed=13, n_attention=40, n_conv=40):
    """Seeded random shapes, strides, dtypes and options: valid ones against the
    reference, the others (an empty output) rejected."""
    import random

    r = random.Random(seed)
    c = []
    for i in range(n_attention):
        b, nq, nk = r.randint(1, 2), r.randint(1, 12), r.randint(1, 12)
        hk, group, d = r.randint(1, 2), r.randint(1, 3), r.choice([8, 16, 24, 64])
        causal = r.random() < 0.4
        win = tuple(r.choice([-1, -1, 0, 1, 3, nk + 2, 2**40]) for _ in range(2))
        ref_win = tuple(None if w == -1 or w >= 2**31 else w for w in win)
        dtype, tol = r.choice([("np.float32", 2e-5), ("np.float16", 3e-3)])
        layout = r.choice(["contiguous", "heads-first", "strided"])
        if layout == "contiguous":
            make = "randn({b}, {n}, {h}, {d}).astype({dtype})"
        elif layout == "heads-first":
            make = "randn({b}, {h}, {n}, {d}).astype({dtype}).swapaxes(1, 2)"
        else:
            make = "randn({b}, 2 * {n}, {h} + 1, 2 * {d}).astype({dtype})[:, ::2, :{h}, :{d}]"
        qe = make.format(b=b, n=nq, h=hk * group, d=d, dtype=dtype)
        ke = make.format(b=b, n=nk, h=hk, d=d, dtype=dtype)
        code = (
            f"q_ = {qe}; k_ = {ke}; v_ = {ke}\n"
            f"close(fk.flash_attn_func(q_, k_, v_, causal={causal}, window_size={win}), "
            f"attn(q_, k_, v_, causal={causal}, window={ref_win}), {tol})"
        )
        c.append(
            (
                f"random attention {i}: {(b, nq, nk, hk, group, d)} {layout} {dtype} causal={causal} window={win}",
                code,
                OK,
            )
        )
    for i in range(n_conv):
        g = r.choice([1, 1, 2])
        n, cin, k = r.randint(1, 2), g * r.randint(1, 2), g * r.randint(1, 2)
        h, w = r.randint(1, 9), r.randint(1, 9)
        kr, ks = r.randint(1, 4), r.randint(1, 4)
        stride = (r.randint(1, 3), r.randint(1, 3))
        padding = (r.randint(0, 2), r.randint(0, 2))
        dilation = (r.randint(1, 2), r.randint(1, 2))
        cl = r.random() < 0.3
        x_ = f"randn({n}, {cin}, {h}, {w})"
        if cl:
            x_ = f"np.ascontiguousarray(randn({n}, {h}, {w}, {cin})).transpose(0, 3, 1, 2)"
        ok = all(size + 2 * p - dl * (kk - 1) - 1 >= 0 for size, p, dl, kk in zip((h, w), padding, dilation, (kr, ks)))
        call = f"fk.conv2d(x_, w_, b_, stride={stride}, padding={padding}, dilation={dilation}, groups={g})"
        code = f"x_ = {x_}; w_ = randn({k}, {cin // g}, {kr}, {ks}); b_ = randn({k})\n" + (
            f"close({call}, ref_conv(x_, w_, b_, {stride}, {padding}, {dilation}, {g}))" if ok else call
        )
        c.append(
            (
                f"random conv {i}: x {(n, cin, h, w)} w {(k, cin // g, kr, ks)} {stride} {padding} {dilation} groups={g} channels-last={cl}",
                code,
                OK if ok else REJECT,
            )
        )
    return c
