# ruff: noqa: E501  (the case table: one-line code snippets, kept whole for reading)
"""Fuzz cases (name, code, expectation) of conv2d and pooling; run by test_fuzz.py."""

from _fuzz import HUGE_INTS, NEGATIVE_INTS, OK, REJECT


def conv_cases():
    c = []
    add = c.append
    for kw, ref in [
        ("", ""),
        ("stride=2", "stride=(2, 2)"),
        ("padding=1", "padding=(1, 1)"),
        ("padding=(2, 0)", "padding=(2, 0)"),
        ("dilation=2", "dilation=(2, 2)"),
        ("stride=(1, 3), padding=(0, 2), dilation=(2, 1)", "stride=(1, 3), padding=(0, 2), dilation=(2, 1)"),
        ("padding='same'", "padding=(1, 1)"),
        ("padding='valid'", ""),
        (f"stride={2**31}", f"stride=({2**31}, {2**31})"),
        (f"stride={2**63 - 1}", f"stride=({2**63 - 1}, {2**63 - 1})"),
        (f"stride=({2**32 + 3}, 1)", f"stride=({2**32 + 3}, 1)"),
        ("padding=4", "padding=(4, 4)"),
    ]:
        add((f"conv {kw or 'plain'}", f"close(fk.conv2d(x, w, b, {kw}), ref_conv(x, w, b, {ref}))", OK))
    add(("conv groups=2", "w2 = randn(4, 1, 3, 3); close(fk.conv2d(x, w2, groups=2), ref_conv(x, w2, groups=2))", OK))
    add(
        (
            "conv channels-last",
            "xc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2); close(fk.conv2d(xc, w), ref_conv(x, w))",
            OK,
        )
    )
    add(
        (
            "conv strided view",
            "xs = randn(2, 4, 12, 12)[::2, ::2, ::2, ::2]; close(fk.conv2d(xs, w), ref_conv(xs, w))",
            OK,
        )
    )
    add(
        (
            "conv broadcast input",
            "xb = np.broadcast_to(x[:, :, :1, :1], x.shape); close(fk.conv2d(xb, w), ref_conv(xb, w))",
            OK,
        )
    )
    add(
        (
            "conv padding='same' dilation 2**62",
            f"close(fk.conv2d(x, w, padding='same', dilation={2**62}), ref_conv(x, w[:, :, 1:2, 1:2]))",
            OK,
        )
    )
    add(("conv relu", "close(fk.conv2d(x, w, b, activation='relu'), np.maximum(ref_conv(x, w, b), 0))", OK))
    add(("conv 1x1 kernel", "w1 = randn(3, 2, 1, 1); close(fk.conv2d(x, w1), ref_conv(x, w1))", OK))
    add(("conv kernel = input", "w6 = randn(3, 2, 6, 6); close(fk.conv2d(x, w6), ref_conv(x, w6))", OK))
    add(
        (
            "conv float16",
            "close(fk.conv2d(x.astype(np.float16), w.astype(np.float16)), ref_conv(x.astype(np.float16), w.astype(np.float16)), 2e-3)",
            OK,
        )
    )
    add(
        (
            "conv backward",
            """
            dx, dw, db = fk.conv2d_backward(dy, x, w, bias=b)
            ref = ref_conv(x, w)  # dx, dw by the adjoint identities
            assert np.isclose((dx.astype(np.float64) * x).sum() + (dw.astype(np.float64) * w).sum(), 2 * (dy.astype(np.float64) * ref).sum(), rtol=1e-4)
            close(db, dy.astype(np.float64).sum((0, 2, 3)))
            """,
            OK,
        )
    )
    add(("conv backward activation", "fk.conv2d_backward(dy, x, w, bias=b, activation='gelu')", OK))
    for name, expr in {
        "padding 2**62": f"fk.conv2d(x, w, padding={2**62})",
        "dilation 2**63-1": f"fk.conv2d(x, w, dilation={2**63 - 1})",
        "kernel larger than input": "fk.conv2d(x, randn(3, 2, 7, 7))",
        "stride 0": "fk.conv2d(x, w, stride=0)",
        "dilation 0": "fk.conv2d(x, w, dilation=0)",
        "groups 0": "fk.conv2d(x, w, groups=0)",
        "groups 3": "fk.conv2d(x, w, groups=3)",
        "groups True": "fk.conv2d(x, w, groups=True)",
        "groups 1.0": "fk.conv2d(x, w, groups=1.0)",
        "channels mismatch": "fk.conv2d(x, randn(3, 3, 3, 3))",
        "bias wrong length": "fk.conv2d(x, w, randn(4))",
        "bias rank 2": "fk.conv2d(x, w, randn(3, 1))",
        "bias dtype": "fk.conv2d(x, w, b.astype(np.float16))",
        "weight dtype": "fk.conv2d(x, w.astype(np.float16))",
        "float64": "fk.conv2d(x.astype(np.float64), w.astype(np.float64))",
        "int": "fk.conv2d(x.astype(np.int32), w.astype(np.int32))",
        "rank 3 input": "fk.conv2d(x[0], w)",
        "rank 5 weight": "fk.conv2d(x, w[None])",
        "empty batch": "fk.conv2d(x[:0], w)",
        "empty channels": "fk.conv2d(x[:, :0], w[:, :0])",
        "negative stride view": "fk.conv2d(x[:, :, ::-1], w)",
        "activation bad": "fk.conv2d(x, w, activation='tanh')",
        "activation int": "fk.conv2d(x, w, activation=1)",
        "activation array": "fk.conv2d(x, w, activation=np.array(['relu', 'gelu']))",
        "stride array of 1000": "fk.conv2d(x, w, stride=np.ones(1000, np.int64))",
        "algo bad": "fk.conv2d(x, w, algo='winograd')",
        "padding same strided": "fk.conv2d(x, w, stride=2, padding='same')",
        "padding same even": "fk.conv2d(x, randn(3, 2, 2, 2), padding='same')",
        "padding str": "fk.conv2d(x, w, padding='full')",
        "padding triple": "fk.conv2d(x, w, padding=(1, 1, 1))",
        "padding float": "fk.conv2d(x, w, padding=1.0)",
        "padding None": "fk.conv2d(x, w, padding=None)",
        "stride list of str": "fk.conv2d(x, w, stride=['1', '1'])",
        "input None": "fk.conv2d(None, w)",
        "input list": "fk.conv2d(x.tolist(), w)",
        "weight None": "fk.conv2d(x, None)",
        "bwd dy wrong shape": "fk.conv2d_backward(dy[:, :, :2], x, w)",
        "bwd dy dtype": "fk.conv2d_backward(dy.astype(np.float16), x, w)",
        "bwd activation without bias": "fk.conv2d_backward(dy, x, w, activation='relu', padding=2**70)",
    }.items():
        add((f"conv {name}", expr, REJECT))
    for val in HUGE_INTS + NEGATIVE_INTS:
        if val >= 2**63 or val < 0:
            for opt in ("stride", "padding", "dilation", "groups"):
                add((f"conv {opt}={val}", f"fk.conv2d(x, w, {opt}={val})", REJECT))
        else:
            add((f"conv padding={val}", f"fk.conv2d(x, w, padding={val})", REJECT))
            add((f"conv dilation={val}", f"fk.conv2d(x, w, dilation={val})", REJECT))
            add((f"conv groups={val}", f"fk.conv2d(x, w, groups={val})", REJECT))
            add((f"conv_backward padding={val}", f"fk.conv2d_backward(dy, x, w, padding={val})", REJECT))
    return c


def pool_cases():
    c = []
    add = c.append
    for kw, ref in [
        ("2", "(2, 2)"),
        ("3, 1, 1", "(3, 3), (1, 1), (1, 1)"),
        ("(2, 3), (1, 2)", "(2, 3), (1, 2)"),
        ("2, 2, 0, 2", "(2, 2), (2, 2), (0, 0), (2, 2)"),
        ("3, 2, 1, ceil_mode=True", "(3, 3), (2, 2), (1, 1), ceil=True"),
        (f"2, {2**31}", f"(2, 2), ({2**31}, {2**31})"),
        (f"2, {2**63 - 1}", f"(2, 2), ({2**63 - 1}, {2**63 - 1})"),
        ("6", "(6, 6)"),
        ("1", "(1, 1)"),
    ]:
        add((f"max_pool2d {kw}", f"close(fk.max_pool2d(x, {kw}), ref_pool(x, 'max', {ref}))", OK))
    for kw, ref in [
        ("2", "(2, 2)"),
        ("3, 1, 1", "(3, 3), (1, 1), (1, 1)"),
        ("3, 1, 1, count_include_pad=False", "(3, 3), (1, 1), (1, 1), cip=False"),
        ("3, 2, 1, ceil_mode=True", "(3, 3), (2, 2), (1, 1), ceil=True"),
        ("2, divisor_override=3", "(2, 2), div=3"),
        (f"2, divisor_override={2**31}", f"(2, 2), div={2**31}"),
        (f"2, divisor_override={2**32 + 3}", f"(2, 2), div={2**32 + 3}"),
        (f"2, {2**32 + 3}", f"(2, 2), ({2**32 + 3}, {2**32 + 3})"),
    ]:
        add((f"avg_pool2d {kw}", f"close(fk.avg_pool2d(x, {kw}), ref_pool(x, 'avg', {ref}), 1e-5)", OK))
    add(("max_pool2d kernel np.int64", "close(fk.max_pool2d(x, np.int64(2)), ref_pool(x, 'max', (2, 2)))", OK))
    add(("max_pool2d kernel int array", "close(fk.max_pool2d(x, np.array([2, 3])), ref_pool(x, 'max', (2, 3)))", OK))
    add(("avg_pool2d stride []", "close(fk.avg_pool2d(x, 2, []), ref_pool(x, 'avg', (2, 2)))", OK))
    add(
        (
            "max_pool2d indices",
            "y2, i2 = fk.max_pool2d(x, 2, return_indices=True); assert i2.dtype == np.int64; close(np.take_along_axis(x.reshape(1, 2, -1), i2.reshape(1, 2, -1), 2).reshape(y2.shape), y2, 0)",
            OK,
        )
    )
    add(
        (
            "max_pool2d strided view",
            "xs = randn(2, 4, 12, 12)[::2, ::2, ::2, ::2]; close(fk.max_pool2d(xs, 2), ref_pool(xs, 'max', (2, 2)))",
            OK,
        )
    )
    add(
        (
            "max_pool2d broadcast",
            "xb = np.broadcast_to(x[:, :1], x.shape); close(fk.max_pool2d(xb, 2), ref_pool(xb, 'max', (2, 2)))",
            OK,
        )
    )
    add(
        (
            "max_pool2d_backward",
            """
            g = fk.max_pool2d_backward(dyp, x, idx, 2)
            want = np.zeros(x.shape); flat = want.reshape(1, 2, -1)
            for c_ in range(2):
                np.add.at(flat[0, c_], idx[0, c_].ravel(), dyp[0, c_].ravel())
            close(g, want)
            """,
            OK,
        )
    )
    add(
        (
            "max_pool2d_backward int32 indices",
            "close(fk.max_pool2d_backward(dyp, x, idx.astype(np.int32), 2), fk.max_pool2d_backward(dyp, x, idx, 2), 0)",
            OK,
        )
    )
    add(
        (
            "avg_pool2d_backward",
            "g = fk.avg_pool2d_backward(dyp, x, 2); close(g, np.repeat(np.repeat(dyp, 2, 2), 2, 3) / 4)",
            OK,
        )
    )
    add(
        (
            "avg_pool2d_backward broadcast dy",
            "fk.avg_pool2d_backward(np.broadcast_to(np.float32(1), dyp.shape), x, 2)",
            OK,
        )
    )
    # The reproducers (item 1) and their relatives.
    for name, expr in {
        "short indices": "np.zeros(100, np.int32)[:1]",
        "indices 2-D (6, 6)": "np.zeros((6, 6), np.int32)",
        "indices oversized": "np.zeros((1, 2, 4, 4), np.int32)",
        "indices flat": "idx.ravel()",
        "indices 2**32+3": f"np.full(idx.shape, {2**32 + 3}, np.int64)",
        "indices 2**31": f"np.full(idx.shape, {2**31}, np.int64)",
        "indices negative": "np.full(idx.shape, -1, np.int64)",
        "indices past the plane": "np.full(idx.shape, 36, np.int64)",
        "indices of another window": "np.full(idx.shape, 35, np.int64)",
        "indices float": "idx.astype(np.float32)",
        "indices bool": "idx > 0",
        "indices None": "None",
        "indices list": "idx.tolist()",
        "indices mmap page": "np.frombuffer(mmap.mmap(-1, 4096), np.int32)",
        "indices non-contiguous": "np.zeros((1, 2, 3, 6), np.int64)[..., ::2]",
    }.items():
        expect = OK if name in ("indices non-contiguous", "indices of another window") else REJECT
        add((f"max_pool2d_backward {name}", f"fk.max_pool2d_backward(dyp, x, {expr}, 2)", expect))
    add(
        (
            "max_pool2d_backward mmap 2000x2000",
            "xb = np.zeros((1, 1, 2000, 2000), np.float32); fk.max_pool2d_backward(np.ones((1, 1, 1000, 1000), np.float32), xb, np.frombuffer(mmap.mmap(-1, 4096), np.int32), 2)",
            REJECT,
        )
    )
    for name, expr in {
        "kernel 2**63+1 dilation 2": f"fk.max_pool2d(np.ones((1, 1, 6, 6), np.float32), {2**63 + 1}, dilation=2)",
        "kernel 2**63-1 dilation 2": f"fk.max_pool2d(np.ones((1, 1, 6, 6), np.float32), {2**63 - 1}, dilation=2)",
        "kernel 2**62": f"fk.max_pool2d(x, {2**62})",
        "kernel 0": "fk.max_pool2d(x, 0)",
        "kernel 7": "fk.max_pool2d(x, 7)",
        "stride 0": "fk.max_pool2d(x, 2, 0)",
        "padding > kernel/2": "fk.max_pool2d(x, 2, 1, 2)",
        "padding 2**62": f"fk.max_pool2d(x, 2, 1, {2**62})",
        "dilation 0": "fk.max_pool2d(x, 2, dilation=0)",
        "dilation 2**62": f"fk.max_pool2d(x, 2, dilation={2**62})",
        "ceil_mode str": "fk.max_pool2d(x, 2, ceil_mode='no')",
        "return_indices 1": "fk.max_pool2d(x, 2, return_indices=1)",
        "kernel float": "fk.max_pool2d(x, 2.0)",
        "kernel None": "fk.max_pool2d(x, None)",
        "kernel triple": "fk.max_pool2d(x, (2, 2, 2))",
        "kernel array of 3": "fk.max_pool2d(x, np.array([2, 2, 2]))",
        "kernel float array": "fk.max_pool2d(x, np.array([2.0, 2.0]))",
        "kernel 1000-element array": "fk.max_pool2d(x, np.ones(1000, np.int64))",
        "rank 3": "fk.max_pool2d(x[0], 2)",
        "float64": "fk.max_pool2d(x.astype(np.float64), 2)",
        "int32": "fk.max_pool2d(x.astype(np.int32), 2)",
        "empty": "fk.max_pool2d(x[:0], 2)",
        "empty plane": "fk.max_pool2d(x[:, :, :0], 2)",
        "negative stride view": "fk.max_pool2d(x[..., ::-1], 2)",
        "None": "fk.max_pool2d(None, 2)",
        "avg divisor 0": "fk.avg_pool2d(x, 2, divisor_override=0)",
        "avg divisor -1": "fk.avg_pool2d(x, 2, divisor_override=-1)",
        "avg divisor 2**63": f"fk.avg_pool2d(x, 2, divisor_override={2**63})",
        "avg divisor float": "fk.avg_pool2d(x, 2, divisor_override=2.0)",
        "avg divisor True": "fk.avg_pool2d(x, 2, divisor_override=True)",
        "avg count_include_pad None": "fk.avg_pool2d(x, 2, count_include_pad=None)",
        "avg kernel 2**63": f"fk.avg_pool2d(x, {2**63})",
        "avg padding 2**63-1": f"fk.avg_pool2d(x, 2, 1, {2**63 - 1})",
        "avg_backward input tuple": "fk.avg_pool2d_backward(dyp, (1, 2, 6, 6), 2)",
        "avg_backward dy wrong shape": "fk.avg_pool2d_backward(dyp[:, :, :2], x, 2)",
        "avg_backward dy float64": "fk.avg_pool2d_backward(dyp.astype(np.float64), x, 2)",
        "avg_backward input None": "fk.avg_pool2d_backward(dyp, None, 2)",
        "max_backward dy wrong shape": "fk.max_pool2d_backward(dyp[:, :1], x, idx, 2)",
        "max_backward kernel mismatch": "fk.max_pool2d_backward(dyp, x, idx, 3)",
    }.items():
        add((f"pool {name}", expr, REJECT))
    for val in HUGE_INTS + NEGATIVE_INTS:
        add((f"max_pool2d kernel={val}", f"fk.max_pool2d(x, {val})", REJECT))
        add((f"avg_pool2d padding={val}", f"fk.avg_pool2d(x, 2, 1, {val})", REJECT))
        add((f"max_pool2d dilation={val}", f"fk.max_pool2d(x, 2, dilation={val})", REJECT))
        add((f"max_pool2d_backward kernel={val}", f"fk.max_pool2d_backward(dyp, x, idx, {val})", REJECT))
    return c
