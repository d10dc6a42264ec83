# ruff: noqa: E501  (the case table: one-line code snippets, kept whole for reading)
"""Fuzz suite of the public Python API (issue 13): bad, edge and valid inputs through
every op and its backward, every option, numpy and torch-CPU arrays.

Each group of cases runs in a child Python (``python -c``) under an address-space limit
(RLIMIT_AS: what the interpreter uses once numpy / torch are imported, plus a budget)
and a per-case deadline (faulthandler's watchdog, which needs no GIL, kills a hung
child). A case fails the suite when the child dies (a signal, an abort), hangs, raises
an exception the case does not allow (MemoryError, OverflowError, AttributeError,
RuntimeError, ... where a TypeError / ValueError or a result is due), accepts an input
that must be rejected, or returns a value that differs from the reference (numpy /
torch computed here, in float64). Cases are grouped so that one child runs many; the
child prints a marker before each case, so a crash names its case. Groups run two at a
time (the CI machines have 2 cores).

``CASES`` is built by the ``_*_cases`` functions below; ``test_case_count`` reports
their number."""

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import flashkernels as fk

HERE = Path(__file__).resolve().parent
CASE_DEADLINE_S = 20.0
GiB = 2**30

# Expectations.
OK = "ok"  # returns; the code's own asserts check the values
REJECT = "reject"  # TypeError or ValueError
REJECT_OR_OOM = "reject_or_oom"  # TypeError, ValueError or MemoryError (a huge but valid size)

HUGE_INTS = [2**31, 2**32 + 3, 2**63, 2**70]
NEGATIVE_INTS = [-1, -(2**63)]
BAD_FLOATS = ["float('nan')", "float('inf')", "float('-inf')", "0.0", "-1.0", "1e-50", "1e300"]
WRONG_TYPES = ["None", "'a'", "1.5", "[1]", "object()"]

# ---------------------------------------------------------------------------------------
# What every child runs first: imports, inputs, and float64 references.

PRELUDE = r'''
import math, mmap, os, sys
import numpy as np
import flashkernels as fk
sys.path.insert(0, TESTS_DIR)
from conftest import numpy_attention

rng = np.random.default_rng(0)
def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)

def close(got, want, tol=2e-5):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.size:
        err = np.nanmax(np.abs(got - want)) / max(np.abs(want).max(), 1e-30)
        assert err <= tol and np.array_equal(np.isnan(got), np.isnan(want)), f"error {err}"

def attn(q, k, v, **kw):
    return numpy_attention(q, k, v, **kw)[0]

def attn_grads(q, k, v, dout, causal=False, scale=None, window=(None, None)):
    """float64 (dq, dk, dv) of attention (B, N, H, D) by the softmax derivative."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    group = q.shape[2] // k.shape[2]
    kr, vr = (np.repeat(x, group, axis=2) for x in (k, v))
    out, lse = numpy_attention(q, k, v, causal=causal, scale=scale, window=window)
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, kr) * s
    with np.errstate(invalid="ignore"):
        p = np.where(np.isfinite(lse)[..., None], np.exp(logits - lse[..., None]), 0.0)
    from conftest import attention_mask
    p = p * attention_mask(q.shape[1], k.shape[1], causal=causal, window=window)
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    ds = p * (dp - (dout * out).sum(-1).transpose(0, 2, 1)[..., None])
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * s
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * s
    b, nk, hk, d = k.shape
    return dq, dk.reshape(b, nk, hk, group, d).sum(3), dv.reshape(b, nk, hk, group, d).sum(3)

def out_size(n, k, s, p, d, ceil=False):
    span = n + 2 * p - d * (k - 1) - 1
    if span < 0:
        return 0
    o = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (o - 1) * s >= n + p:
        o -= 1
    return o

def ref_conv(x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    p_, q_ = (out_size(h, r, stride[0], padding[0], dilation[0]), out_size(wd, s, stride[1], padding[1], dilation[1]))
    y = np.zeros((n, k, p_, q_))
    kg = k // groups
    for oi in range(p_):
        for oj in range(q_):
            for i in range(r):
                for j in range(s):
                    hi = oi * stride[0] - padding[0] + i * dilation[0]
                    wj = oj * stride[1] - padding[1] + j * dilation[1]
                    if 0 <= hi < h and 0 <= wj < wd:
                        for g in range(groups):
                            y[:, g * kg:(g + 1) * kg, oi, oj] += x[:, g * cg:(g + 1) * cg, hi, wj] @ w[g * kg:(g + 1) * kg, :, i, j].T
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y

def ref_pool(x, kind, k, stride=None, padding=(0, 0), dilation=(1, 1), ceil=False, cip=True, div=None):
    x = np.asarray(x, np.float64)
    stride = stride or k
    n, c, h, wd = x.shape
    p_, q_ = (out_size(h, k[0], stride[0], padding[0], dilation[0], ceil), out_size(wd, k[1], stride[1], padding[1], dilation[1], ceil))
    y = np.zeros((n, c, p_, q_))
    for oi in range(p_):
        for oj in range(q_):
            h0, w0 = oi * stride[0] - padding[0], oj * stride[1] - padding[1]
            vals, count = [], 0
            for i in range(k[0]):
                for j in range(k[1]):
                    hi, wj = h0 + i * dilation[0], w0 + j * dilation[1]
                    if kind == "avg" and hi < h + padding[0] and wj < wd + padding[1]:
                        count += 1
                    if 0 <= hi < h and 0 <= wj < wd:
                        vals.append(x[:, :, hi, wj])
            if kind == "max":
                y[:, :, oi, oj] = np.max(vals, axis=0)
            else:
                inside = len(vals)
                d = div if div else (count if cip else inside)
                y[:, :, oi, oj] = np.sum(vals, axis=0) / d
    return y

def rejects(f):
    try:
        f()
    except (TypeError, ValueError):
        return True
    return False

q, k, v = randn(1, 8, 2, 16), randn(1, 8, 2, 16), randn(1, 8, 2, 16)
k1, v1 = randn(1, 8, 1, 16), randn(1, 8, 1, 16)
o, lse = fk.flash_attn_func(q, k, v, return_lse=True)
dout = randn(1, 8, 2, 16)
x = randn(1, 2, 6, 6)
w = randn(3, 2, 3, 3)
b = randn(3)
dy = randn(1, 3, 4, 4)
y_max, idx = fk.max_pool2d(x, 2, return_indices=True)
dyp = randn(*y_max.shape)
cu = np.array([0, 3, 8], np.int32)
pq, pk, pv = randn(8, 2, 16), randn(8, 2, 16), randn(8, 2, 16)
'''

TORCH_PRELUDE = r"""
import torch
tq, tk, tv = (torch.from_numpy(a.copy()) for a in (q, k, v))
tx, tw, tb = (torch.from_numpy(a.copy()) for a in (x, w, b))
"""

# The child: runs the cases it reads from stdin, one JSON line per case.
CHILD = r"""
import faulthandler, json, os, resource, sys, traceback
spec = json.loads(sys.stdin.read())
ns = {"TESTS_DIR": spec["tests_dir"]}
exec(spec["prelude"], ns)
def vm_bytes():
    return int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
limit = vm_bytes() + spec["budget"]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(json.dumps({"limit": limit}), flush=True)
for name, code, expect in spec["cases"]:
    print(json.dumps({"start": name}), flush=True)
    faulthandler.dump_traceback_later(spec["deadline"], exit=True)
    env = dict(ns)
    try:
        exec(code, env)
        res = {"case": name, "outcome": "ok"}
    except BaseException as e:
        tb = traceback.format_exc(limit=3)[-600:]
        res = {"case": name, "outcome": "raised", "type": type(e).__name__, "msg": str(e)[:300], "tb": tb}
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(res), flush=True)
print(json.dumps({"done": True}), flush=True)
"""


def _child_env():
    path = [str(Path(fk.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_group(group):
    prelude = PRELUDE + (TORCH_PRELUDE if group["torch"] else "") + group.get("setup", "")
    spec = dict(
        tests_dir=str(HERE),
        prelude=prelude,
        budget=group["budget"],
        deadline=CASE_DEADLINE_S,
        cases=[(c[0], textwrap.dedent(c[1]), c[2]) for c in group["cases"]],
    )
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [sys.executable, "-c", CHILD],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=CASE_DEADLINE_S * 2 + 3 * len(group["cases"]) + 30,
            env=_child_env(),
        )
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b""), (e.stderr or b""), "timeout"
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    return dict(out=out, err=err, rc=rc, seconds=time.monotonic() - t0)


def _judge(group, run):
    """The failures of a group's run, one line each."""
    results, started = {}, None
    for line in run["out"].splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "start" in msg:
            started = msg["start"]
        elif "case" in msg:
            results[msg["case"]] = msg
            started = None
    failures = []
    if started is not None or run["rc"] not in (0,):
        where = f"while running case {started!r}" if started else "outside any case"
        failures.append(
            f"child died (rc={run['rc']}) {where}: crash, abort, hang or memory limit\n" + run["err"][-2000:]
        )
    for name, _code, expect in group["cases"]:
        r = results.get(name)
        if r is None:
            if started is None and not failures:
                failures.append(f"{name}: no result")
            continue
        if expect == OK:
            if r["outcome"] != "ok":
                failures.append(f"{name}: valid input raised {r['type']}: {r['msg']}\n{r['tb']}")
            continue
        allowed = {REJECT: ("TypeError", "ValueError"), REJECT_OR_OOM: ("TypeError", "ValueError", "MemoryError")}.get(
            expect, expect if isinstance(expect, tuple) else (expect,)
        )
        if r["outcome"] == "ok":
            failures.append(f"{name}: accepted silently, must raise {'/'.join(allowed)}")
        elif r["type"] not in allowed:
            failures.append(f"{name}: raised {r['type']} ({r['msg']}), must raise {'/'.join(allowed)}\n{r['tb']}")
        elif len(r["msg"]) > 1000 or "array(" in r["msg"] or "tensor(" in r["msg"]:
            failures.append(f"{name}: the message prints an array: {r['msg'][:200]}")
    return failures


# ---------------------------------------------------------------------------------------
# The cases: (name, code, expectation).


def _attention_cases():
    c = []
    add = c.append
    # Valid inputs against the float64 reference.
    for causal in (False, True):
        add(
            (
                f"fwd causal={causal}",
                f"close(fk.flash_attn_func(q, k, v, causal={causal}), attn(q, k, v, causal={causal}))",
                OK,
            )
        )
    for win in [(0, 0), (2, 1), (-1, 0), (0, -1), (3, 3)]:
        ref_win = tuple(None if s == -1 else s for s in win)
        add(
            (
                f"fwd window {win}",
                f"close(fk.flash_attn_func(q, k, v, window_size={win}), attn(q, k, v, window={ref_win}))",
                OK,
            )
        )
    for big in HUGE_INTS:
        add(
            (
                f"fwd window ({big}, 0) unbounded",
                f"close(fk.flash_attn_func(q, k, v, window_size=({big}, 0)), attn(q, k, v, window=(None, 0)))",
                OK,
            )
        )
        add(
            (
                f"fwd window (1, {big})",
                f"close(fk.flash_attn_func(q, k, v, window_size=(1, {big})), attn(q, k, v, window=(1, None)))",
                OK,
            )
        )
    for s in ("0.5", "1e-3", "1e3", "np.float32(0.25)", "2.0**-140"):
        add(
            (
                f"fwd scale {s}",
                f"close(fk.flash_attn_func(q, k, v, softmax_scale={s}), attn(q, k, v, scale=float({s})), 1e-4)",
                OK,
            )
        )
    add(("fwd gqa", "close(fk.flash_attn_func(q, k1, v1), attn(q, k1, v1))", OK))
    add(("fwd nq<nk", "close(fk.flash_attn_func(q[:, :3], k, v, causal=True), attn(q[:, :3], k, v, causal=True))", OK))
    add(
        (
            "fwd nq>nk",
            "close(fk.flash_attn_func(q, k[:, :3], v[:, :3], causal=True), attn(q, k[:, :3], v[:, :3], causal=True))",
            OK,
        )
    )
    add(("fwd nq=1", "close(fk.flash_attn_func(q[:, :1], k, v), attn(q[:, :1], k, v))", OK))
    add(
        (
            "fwd d=8",
            "close(fk.flash_attn_func(q[..., :8], k[..., :8], v[..., :8]), attn(q[..., :8], k[..., :8], v[..., :8]))",
            OK,
        )
    )
    add(
        (
            "fwd float16",
            "close(fk.flash_attn_func(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)), attn(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)), 2e-3)",
            OK,
        )
    )
    add(
        (
            "fwd bfloat16",
            "import ml_dtypes; bq = q.astype(ml_dtypes.bfloat16); close(fk.flash_attn_func(bq, bq, bq), attn(bq, bq, bq), 2e-2)",
            OK,
        )
    )
    add(
        (
            "fwd heads-first memory",
            "qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3); close(fk.flash_attn_func(qt, k, v), attn(q, k, v))",
            OK,
        )
    )
    add(
        (
            "fwd strided view",
            "big = randn(2, 16, 4, 32); qs = big[::2, ::2, ::2, :16]; close(fk.flash_attn_func(qs, qs, qs), attn(qs, qs, qs))",
            OK,
        )
    )
    add(
        (
            "fwd broadcast k/v",
            "kb = np.broadcast_to(k[:, :1], k.shape); close(fk.flash_attn_func(q, kb, kb), attn(q, kb, kb))",
            OK,
        )
    )
    add(
        (
            "fwd read-only",
            "qr = q.copy(); qr.flags.writeable = False; close(fk.flash_attn_func(qr, k, v), attn(q, k, v))",
            OK,
        )
    )
    add(("fwd lse", "out, l = fk.flash_attn_func(q, k, v, return_lse=True); close(l, numpy_attention(q, k, v)[1])", OK))
    add(
        (
            "fwd window hides all keys",
            "close(fk.flash_attn_func(q[:, :2], k, v, window_size=(0, 0), causal=True), attn(q[:, :2], k, v, window=(0, 0), causal=True))",
            OK,
        )
    )
    add(
        (
            "sdpa",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)), attn(q, k, v).swapaxes(1, 2))",
            OK,
        )
    )
    add(
        (
            "sdpa is_causal np.bool_",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=np.bool_(True)), attn(q, k, v, causal=True).swapaxes(1, 2))",
            OK,
        )
    )
    add(
        (
            "sdpa gqa",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k1.swapaxes(1, 2), v1.swapaxes(1, 2), enable_gqa=True), attn(q, k1, v1).swapaxes(1, 2))",
            OK,
        )
    )
    add(
        (
            "sdpa scale",
            "close(fk.scaled_dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), scale=0.3), attn(q, k, v, scale=0.3).swapaxes(1, 2))",
            OK,
        )
    )
    # Bad arrays.
    bad_arrays = {
        "rank 3": "q[0]",
        "rank 5": "q[None]",
        "rank 0": "np.float32(1)",
        "float64": "q.astype(np.float64)",
        "int32": "q.astype(np.int32)",
        "bool": "q > 0",
        "complex64": "q.astype(np.complex64)",
        "list": "q.tolist()",
        "None": "None",
        "str": "'q'",
        "float": "1.0",
        "empty seq": "q[:, :0]",
        "empty batch": "q[:0]",
        "empty heads": "q[:, :, :0]",
        "empty head_dim": "q[..., :0]",
        "head_dim 7": "q[..., :7]",
        "head_dim 512": "randn(1, 8, 2, 512)",
        "last stride 2": "randn(1, 8, 2, 32)[..., ::2]",
        "negative stride seq": "q[:, ::-1]",
        "negative stride head_dim": "q[..., ::-1]",
        "zero stride head_dim": "np.broadcast_to(q[..., :1], q.shape)",
        "heads not a multiple": "randn(1, 8, 3, 16)",
        "batch mismatch": "randn(2, 8, 2, 16)",
        "head_dim mismatch": "randn(1, 8, 2, 32)",
        "matrix": "np.matrix(np.ones((2, 2), np.float32))",
    }
    for what, expr in bad_arrays.items():
        for arg in ("q", "k"):
            call = f"fk.flash_attn_func({expr}, k, v)" if arg == "q" else f"fk.flash_attn_func(q, {expr}, v)"
            if what in ("heads not a multiple",) and arg == "q":
                call = "fk.flash_attn_func(randn(1, 8, 3, 16), k, v)"
            add((f"fwd {arg} {what}", call, REJECT))
    add(("fwd k and v shapes differ", "fk.flash_attn_func(q, k, v[:, :4])", REJECT))
    add(("fwd q, k dtypes differ", "fk.flash_attn_func(q, k.astype(np.float16), v)", REJECT))
    # Bad options.
    for val in [
        "(-2, 0)",
        "(0, -2)",
        "(1,)",
        "(1, 2, 3)",
        "None",
        "1",
        "'ab'",
        "(1.5, 0)",
        "(True, 0)",
        "(0, None)",
        f"({-(2**63)}, 0)",
        "(np.float32(1), 0)",
    ]:
        add((f"fwd window_size={val}", f"fk.flash_attn_func(q, k, v, window_size={val})", REJECT))
    for val in BAD_FLOATS + ["'a'", "True", "[1.0]", "1j", "10**400", "-0.0"]:
        add((f"fwd softmax_scale={val}", f"fk.flash_attn_func(q, k, v, softmax_scale={val})", REJECT))
        add((f"sdpa scale={val}", f"fk.scaled_dot_product_attention(q, k, v, scale={val})", REJECT))
    for val in ["'no'", "1", "0", "None", "1.0", "[True]", "np.array([True, False])"]:
        add((f"fwd causal={val}", f"fk.flash_attn_func(q, k, v, causal={val})", REJECT))
        add((f"sdpa is_causal={val}", f"fk.scaled_dot_product_attention(q, k, v, is_causal={val})", REJECT))
        add((f"fwd return_lse={val}", f"fk.flash_attn_func(q, k, v, return_lse={val})", REJECT))
    for val in ["0.1", "1", "'a'", "None", "float('nan')", "np.array([0.0, 0.0])"]:
        add((f"fwd dropout_p={val}", f"fk.flash_attn_func(q, k, v, dropout_p={val})", REJECT))
    add(("sdpa attn_mask", "fk.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((8, 8), bool))", REJECT))
    add(
        (
            "sdpa gqa without enable_gqa",
            "fk.scaled_dot_product_attention(q.swapaxes(1, 2), k1.swapaxes(1, 2), v1.swapaxes(1, 2))",
            REJECT,
        )
    )
    add(("sdpa enable_gqa='yes'", "fk.scaled_dot_product_attention(q, k, v, enable_gqa='yes')", REJECT))
    add(("fwd unknown keyword", "fk.flash_attn_func(q, k, v, windows=(1, 1))", REJECT))
    return c


def _backward_cases():
    c = []
    add = c.append
    for causal in (False, True):
        add(
            (
                f"bwd causal={causal}",
                f"""
                o2, l2 = fk.flash_attn_func(q, k, v, causal={causal}, return_lse=True)
                got = fk.attention_backward(q, k, v, o2, l2, dout, causal={causal})
                for g, r in zip(got, attn_grads(q, k, v, dout, causal={causal})):
                    close(g, r, 1e-4)
                """,
                OK,
            )
        )
    add(
        (
            "bwd gqa window",
            """
            o2, l2 = fk.flash_attn_func(q, k1, v1, window_size=(2, 1), return_lse=True)
            got = fk.attention_backward(q, k1, v1, o2, l2, dout, window_size=(2, 1))
            for g, r in zip(got, attn_grads(q, k1, v1, dout, window=(2, 1))):
                close(g, r, 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "bwd huge window",
            f"""
            got = fk.attention_backward(q, k, v, o, lse, dout, window_size=({2**70}, {2**63}))
            for g, r in zip(got, attn_grads(q, k, v, dout)):
                close(g, r, 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "bwd broadcast dout rows",
            "d1 = np.broadcast_to(dout[:, :1], dout.shape); got = fk.attention_backward(q, k, v, o, lse, d1); [close(g, r, 1e-4) for g, r in zip(got, attn_grads(q, k, v, d1))]",
            OK,
        )
    )
    # numpy arrays need a unit-stride last dimension (documented; torch gradients are copied).
    add(
        (
            "bwd fully broadcast dout",
            "fk.attention_backward(q, k, v, o, lse, np.broadcast_to(np.float32(1), q.shape))",
            REJECT,
        )
    )
    for name, expr in {
        "lse float64": "lse.astype(np.float64)",
        "lse float16": "lse.astype(np.float16)",
        "lse wrong shape": "lse[:, :, :4]",
        "lse rank 2": "lse[0]",
        "lse None": "None",
        "lse list": "lse.tolist()",
    }.items():
        add((f"bwd {name}", f"fk.attention_backward(q, k, v, o, {expr}, dout)", REJECT))
    for name, expr in {
        "out wrong shape": "fk.attention_backward(q, k, v, o[:, :4], lse, dout)",
        "dout wrong shape": "fk.attention_backward(q, k, v, o, lse, dout[:, :4])",
        "dout float16": "fk.attention_backward(q, k, v, o, lse, dout.astype(np.float16))",
        "dout int": "fk.attention_backward(q, k, v, o, lse, dout.astype(np.int32))",
        "out None": "fk.attention_backward(q, k, v, None, lse, dout)",
        "q empty": "fk.attention_backward(q[:, :0], k, v, o, lse, dout)",
        "scale nan": "fk.attention_backward(q, k, v, o, lse, dout, softmax_scale=float('nan'))",
        "causal str": "fk.attention_backward(q, k, v, o, lse, dout, causal='yes')",
        "window bad": "fk.attention_backward(q, k, v, o, lse, dout, window_size=(-5, 0))",
        "cu_seqlens one of two": "fk.attention_backward(pq, pk, pv, o[0], lse[0], dout[0], cu_seqlens_q=cu)",
    }.items():
        add((f"bwd {name}", expr, REJECT))
    # Varlen.
    add(
        (
            "varlen fwd+bwd",
            """
            out, l = fk.flash_attn_varlen_func(pq, pk, pv, cu, cu, 5, 5, causal=True, return_lse=True)
            for s0, s1 in ((0, 3), (3, 8)):
                close(out[s0:s1], attn(pq[None, s0:s1], pk[None, s0:s1], pv[None, s0:s1], causal=True)[0])
            g = fk.attention_backward(pq, pk, pv, out, l, pq, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
            for s0, s1 in ((0, 3), (3, 8)):
                ref = attn_grads(pq[None, s0:s1], pk[None, s0:s1], pv[None, s0:s1], pq[None, s0:s1], causal=True)
                for got, r in zip(g, ref):
                    close(got[s0:s1], r[0], 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "varlen list offsets",
            "close(fk.flash_attn_varlen_func(pq, pk, pv, [0, 8], [0, 8], 8, 8), attn(pq[None], pk[None], pv[None])[0])",
            OK,
        )
    )
    add(
        (
            "varlen empty sequence",
            "out = fk.flash_attn_varlen_func(pq, pk, pv, [0, 0, 8], [0, 0, 8], 8, 8); close(out, attn(pq[None], pk[None], pv[None])[0])",
            OK,
        )
    )
    add(("varlen huge max_seqlen", f"fk.flash_attn_varlen_func(pq, pk, pv, cu, cu, {2**70}, {2**64})", OK))
    for name, (cq, ck, mq) in {
        "decreasing": ("[0, 5, 3]", "cu", "8"),
        "not from 0": ("[1, 8]", "[0, 8]", "8"),
        "past the end": ("[0, 9]", "[0, 8]", "9"),
        "short of the end": ("[0, 7]", "[0, 8]", "8"),
        "one offset": ("[0]", "[0]", "8"),
        "empty": ("[]", "[]", "8"),
        "lengths differ": ("[0, 8]", "cu", "8"),
        "int64 array": ("cu.astype(np.int64)", "cu", "8"),
        "float array": ("cu.astype(np.float32)", "cu", "8"),
        "2-D array": ("cu[None]", "cu", "8"),
        "2**31 offset": (f"[0, {2**31}]", "[0, 8]", "8"),
        "2**70 offset": (f"[0, {2**70}]", "[0, 8]", "8"),
        "negative offset": ("[0, -3]", "[0, 8]", "8"),
        "strings": ("['0', '8']", "[0, 8]", "8"),
        "None": ("None", "cu", "8"),
        "max_seqlen too small": ("cu", "cu", "2"),
        "max_seqlen negative": ("cu", "cu", "-1"),
        "max_seqlen float": ("cu", "cu", "5.0"),
        "max_seqlen None": ("cu", "cu", "None"),
        "max_seqlen bool": ("cu", "cu", "True"),
    }.items():
        add((f"varlen {name}", f"fk.flash_attn_varlen_func(pq, pk, pv, {cq}, {ck}, {mq}, 8)", REJECT))
    add(("varlen q rank 4", "fk.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)", REJECT))
    return c


def _longformer_cases():
    c = []
    add = c.append
    # Valid: a window covering the sequence without globals is dense attention.
    add(("lf window >= N is dense", "close(fk.longformer_attention(q, k, v, 8), attn(q, k, v))", OK))
    add(
        (
            "lf causal window >= N",
            "close(fk.longformer_attention(q, k, v, 8, causal=True), attn(q, k, v, causal=True))",
            OK,
        )
    )
    for big in HUGE_INTS:
        add((f"lf window {big}", f"close(fk.longformer_attention(q, k, v, {big}), attn(q, k, v))", OK))
        add(
            (
                f"lf dilation {big}",
                f"close(fk.longformer_attention(q, k, v, 1, dilation={big}), fk.longformer_attention(q, k, v, 1, dilation=8))",
                OK,
            )
        )
    add(("lf window 0 is self-attention", "close(fk.longformer_attention(q, k, v, 0), v)", OK))
    add(
        (
            "lf all global is dense",
            "close(fk.longformer_attention(q, k, v, 0, global_tokens=np.ones((1, 8), bool)), attn(q, k, v))",
            OK,
        )
    )
    add(
        (
            "lf global lists",
            "a = fk.longformer_attention(q, k, v, 1, global_tokens=[[0, 5]]); m = np.zeros((1, 8), bool); m[0, [0, 5]] = True; close(a, fk.longformer_attention(q, k, v, 1, global_tokens=m), 0)",
            OK,
        )
    )
    add(("lf dilation per head", "fk.longformer_attention(q, k, v, 1, dilation=[1, 2])", OK))
    add(
        (
            "lf padding mask",
            "m = np.zeros((1, 8), bool); m[0, 6:] = True; out = fk.longformer_attention(q, k, v, 8, padding_mask=m); close(out[:, :6], attn(q[:, :6], k[:, :6], v[:, :6])); assert not out[:, 6:].any()",
            OK,
        )
    )
    add(("lf global_qkv", "fk.longformer_attention(q, k, v, 1, global_tokens=[[2]], global_qkv=(q, k, v))", OK))
    add(
        (
            "lf backward dense",
            """
            out, l = fk.longformer_attention(q, k, v, 8, return_lse=True)
            g = fk.longformer_attention_backward(q, k, v, out, l, dout, 8)
            for a, r in zip(g, attn_grads(q, k, v, dout)):
                close(a, r, 1e-4)
            """,
            OK,
        )
    )
    add(
        (
            "lf backward global_qkv",
            "out, l = fk.longformer_attention(q, k, v, 1, global_tokens=[[2]], global_qkv=(q, k, v), return_lse=True); g = fk.longformer_attention_backward(q, k, v, out, l, dout, 1, global_tokens=[[2]], global_qkv=(q, k, v)); assert len(g) == 6",
            OK,
        )
    )
    for name, expr in {
        "window -1": "fk.longformer_attention(q, k, v, -1)",
        "window 1.5": "fk.longformer_attention(q, k, v, 1.5)",
        "window None": "fk.longformer_attention(q, k, v, None)",
        "window True": "fk.longformer_attention(q, k, v, True)",
        "window -2**63": f"fk.longformer_attention(q, k, v, {-(2**63)})",
        "dilation 0": "fk.longformer_attention(q, k, v, 1, dilation=0)",
        "dilation -1": "fk.longformer_attention(q, k, v, 1, dilation=-1)",
        "dilation empty": "fk.longformer_attention(q, k, v, 1, dilation=[])",
        "dilation 3 heads": "fk.longformer_attention(q, k, v, 1, dilation=[1, 1, 1])",
        "dilation float": "fk.longformer_attention(q, k, v, 1, dilation=1.5)",
        "dilation str": "fk.longformer_attention(q, k, v, 1, dilation='1')",
        "causal str": "fk.longformer_attention(q, k, v, 1, causal='no')",
        "scale 0": "fk.longformer_attention(q, k, v, 1, scale=0.0)",
        "scale 1e-50": "fk.longformer_attention(q, k, v, 1, scale=1e-50)",
        "scale nan": "fk.longformer_attention(q, k, v, 1, scale=float('nan'))",
        "scale str": "fk.longformer_attention(q, k, v, 1, scale='a')",
        "global index 8": "fk.longformer_attention(q, k, v, 1, global_tokens=[[8]])",
        "global index -9": "fk.longformer_attention(q, k, v, 1, global_tokens=[[-9]])",
        "global index 2**70": f"fk.longformer_attention(q, k, v, 1, global_tokens=[[{2**70}]])",
        "global duplicate": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1, 1]])",
        "global bool list": "fk.longformer_attention(q, k, v, 1, global_tokens=[[True, False]])",
        "global two sequences for batch 1": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1], [2]])",
        "global mask wrong shape": "fk.longformer_attention(q, k, v, 1, global_tokens=np.ones((1, 7), bool))",
        "global mask float": "fk.longformer_attention(q, k, v, 1, global_tokens=np.ones((1, 8), np.float32))",
        "global str": "fk.longformer_attention(q, k, v, 1, global_tokens='all')",
        "global and padded": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], padding_mask=np.ones((1, 8), bool))",
        "padding mask rank 3": "fk.longformer_attention(q, k, v, 1, padding_mask=np.ones((1, 8, 1), bool))",
        "global_qkv two": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], global_qkv=(q, k))",
        "global_qkv wrong shape": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], global_qkv=(q[:, :4], k, v))",
        "global_qkv None inside": "fk.longformer_attention(q, k, v, 1, global_tokens=[[1]], global_qkv=(q, None, v))",
        "gqa": "fk.longformer_attention(q, k1, v1, 1)",
        "q rank 3": "fk.longformer_attention(q[0], k[0], v[0], 1)",
        "q float64": "fk.longformer_attention(q.astype(np.float64), k, v, 1)",
        "empty": "fk.longformer_attention(q[:, :0], k[:, :0], v[:, :0], 1)",
        "negative stride": "fk.longformer_attention(q[:, ::-1], k, v, 1)",
        "bwd lse float64": "fk.longformer_attention_backward(q, k, v, o, lse.astype(np.float64), dout, 1)",
        "bwd dout wrong shape": "fk.longformer_attention_backward(q, k, v, o, lse, dout[:, :4], 1)",
        "bwd out None": "fk.longformer_attention_backward(q, k, v, None, lse, dout, 1)",
        "return_lse str": "fk.longformer_attention(q, k, v, 1, return_lse='yes')",
    }.items():
        add((f"lf {name}", expr, REJECT))
    return c


def _conv_cases():
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


def _pool_cases():
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


def _torch_cases():
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


def _memory_cases():
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


def _random_cases(seed=13, n_attention=40, n_conv=40):
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


GROUPS = {
    "attention": dict(cases=_attention_cases(), torch=False, budget=2 * GiB),
    "attention_backward_varlen": dict(cases=_backward_cases(), torch=False, budget=2 * GiB),
    "longformer": dict(cases=_longformer_cases(), torch=False, budget=2 * GiB),
    "conv": dict(cases=_conv_cases(), torch=False, budget=2 * GiB),
    "pool": dict(cases=_pool_cases(), torch=False, budget=2 * GiB),
    "torch": dict(cases=_torch_cases(), torch=True, budget=2 * GiB),
    "random": dict(cases=_random_cases(), torch=False, budget=2 * GiB),
    # The 3 GiB array is address space only; 1 GiB on top of it for everything else.
    "memory": dict(cases=_memory_cases(), torch=False, budget=4 * GiB),
}
CASES = [case for g in GROUPS.values() for case in g["cases"]]


@pytest.fixture(scope="module")
def runs():
    """Every group's run, two children at a time."""
    names = list(GROUPS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(lambda n: _run_group(GROUPS[n]), names)))


def test_case_names_are_unique():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_case_count():
    print(f"\nfuzz cases: {len(CASES)} in {len(GROUPS)} groups")
    assert len(CASES) >= 400


@pytest.mark.parametrize("group", list(GROUPS))
def test_fuzz_group(runs, group):
    if GROUPS[group]["torch"]:
        pytest.importorskip("torch")
    run = runs[group]
    failures = _judge(GROUPS[group], run)
    assert not failures, f"{len(failures)} of {len(GROUPS[group]['cases'])} cases failed:\n\n" + "\n\n".join(failures)
