"""Ctrl-C stops long CPU calls (issue 13, item 6): while a CPU reference runs without the
GIL, it takes the GIL back at most every ~100 ms to run Python's signal handlers, and a
KeyboardInterrupt stops the call and propagates.

Each case runs in a child Python that starts a call sized to take several seconds, has a
thread send SIGINT to the process 0.3 s in (what Ctrl-C does; the thread runs because
the call released the GIL), and reports how long after the signal the
KeyboardInterrupt reached Python."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flashkernels as fk

CHILD = r"""
import json, os, signal, sys, threading, time
import numpy as np
import flashkernels as fk

rng = np.random.default_rng(0)
def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)

SETUP

fired = []
def ctrl_c():
    fired.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)
threading.Timer(0.3, ctrl_c).start()
t0 = time.monotonic()
try:
    CALL
    print(json.dumps({"finished": time.monotonic() - t0}))
except KeyboardInterrupt:
    now = time.monotonic()
    print(json.dumps({"interrupted": now - (fired[0] if fired else t0), "after": now - t0}))
"""

CASES = {
    "attention forward": ("q = randn(1, 4096, 4, 64)", "fk.flash_attn_func(q, q, q)"),
    "attention backward": (
        "q = randn(1, 3072, 4, 64); o, l = fk.flash_attn_func(q[:, :8], q[:, :8], q[:, :8], return_lse=True)\n"
        "o = randn(1, 3072, 4, 64); l = np.zeros((1, 4, 3072), np.float32)",
        "fk.attention_backward(q, q, q, o, l, o)",
    ),
    "longformer forward": ("q = randn(1, 8192, 4, 64)", "fk.longformer_attention(q, q, q, 2048)"),
    "conv2d": ("x = randn(4, 64, 96, 96); w = randn(64, 64, 5, 5)", "fk.conv2d(x, w, padding=2)"),
    "conv2d_backward": (
        "x = randn(4, 64, 96, 96); w = randn(64, 64, 5, 5)",
        "fk.conv2d_backward(x, x, w, padding=2)",
    ),
    "max_pool2d": ("x = randn(1, 1, 1024, 1024)", "fk.max_pool2d(x, 255, 1, 127)"),
}


def _child_env():
    path = [str(Path(fk.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


@pytest.mark.parametrize("name", list(CASES))
def test_ctrl_c_stops_a_long_cpu_call(name):
    setup, call = CASES[name]
    code = CHILD.replace("SETUP", setup).replace("CALL", call)
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_child_env(),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert "finished" not in result, (
        f"the call finished in {result['finished']:.2f} s, before the signal: make it longer"
    )
    # Within ~1 s of the signal (checks run every ~100 ms; slack for a loaded machine).
    assert result["interrupted"] < 1.5, result
