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

This module is the harness; the cases are in _fuzz_cases_*.py, the test in test_fuzz.py."""

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def run_groups(groups):
    """Every group's run, two children at a time."""
    names = list(groups)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(lambda n: _run_group(groups[n]), names)))


def check_group(group, run):
    failures = _judge(group, run)
    assert not failures, f"{len(failures)} of {len(group['cases'])} cases failed:\n\n" + "\n\n".join(failures)
