#!/usr/bin/env python
"""Writes the Linformer golden fixtures under tests/fixtures/linformer/ from lucidrains'
``LinformerSelfAttention`` (PyPI ``linformer==0.2.3``; torch CPU, float64).

What it makes
-------------
One text file per case, ``tests/fixtures/linformer/<case>.txt``, in the format of the
Longformer fixtures (scripts/make_longformer_fixtures.py), readable without numpy or a
parser crate (tests/linformer.rs splits on whitespace):

- lines starting with ``#`` are comments (this command, the versions used);
- ``config key=value ...``: batch, seqlen (the input's N), n_max (the module's
  ``seq_len``), heads, heads_kv (1 with ``one_kv_head``), head_dim, k, share_kv (0/1),
  one_kv_head (0/1), scale (= head_dim ** -0.5, lucidrains' factor);
- per tensor, a line ``tensor <name> <f32|f64> <d0,d1,...>`` and then ONE line holding all
  values in row-major order, space-separated: ``f32`` values are written with numpy's
  shortest round-trip float32 digits (parsing them as f32 recovers the exact bits), ``f64``
  values with Python's ``repr`` (round-trips float64).

Tensors (B = batch, N = seqlen, H = heads, D = head_dim):

- ``q`` (B, N, H, D) f32: ``to_q(x)`` reshaped as the module does (heads split from the
  feature axis); ``k``, ``v`` (B, N, H_kv, D) f32: ``to_k(x)``, ``to_v(x)`` (``v`` absent with
  ``share_kv``: V = K there);
- ``e`` (1, k, n_max) f32: ``proj_k.T``, one projection shared by every head (lucidrains
  stores ``proj_k`` as (seq_len, k)); ``f`` (1, k, n_max): ``proj_v.T`` (absent with
  ``share_kv``: F = E);
- ``out`` (B, N, H, D) f64: the attention output before ``to_out``, captured by a forward
  pre-hook on ``to_out`` (the script asserts ``to_out(out)`` is the layer's output, and that
  an independent float64 evaluation of softmax(scale Q (E K)^T)(F V) from the saved
  tensors matches it to 1e-12).

Exactness: x and every weight are small dyadic rationals (x = i/8, weights and projections
= i/64 with |i| <= 16), so q, k, v, E and F are exactly representable in float32 (the
float64 matmuls producing them are exact; the script asserts it). The float64 output is
then lucidrains' result for exactly the float32 inputs saved, which a float32 caller can
pass bit for bit.

lucidrains 0.2.3 slices ``proj_k[:N]`` when the input is shorter than ``seq_len`` (its code
asserts only N <= seq_len), so the case with N < n_max checks flashkernels' "first N
columns of E and F" against it too. It has no key padding mask, no per-head projections
and no GQA beyond ``one_kv_head`` (H_kv = 1): those are checked against the f64
definition in tests/linformer.rs only.

Regenerate (needs torch with a CPU build and linformer 0.2.3, which needs nothing but
torch; install it outside the repository's environments, e.g.):

    $FK_TEST_PYTHON -m pip install --target /tmp/linformer-site linformer==0.2.3 --no-deps
    PYTHONPATH=/tmp/linformer-site $FK_TEST_PYTHON scripts/make_linformer_fixtures.py

Inputs come from a seeded generator per case, so a rerun writes the same files. Keep the
total under 400 KB (the script prints it; 367 KB now).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from linformer import LinformerSelfAttention

try:
    from importlib.metadata import version
except ImportError:  # pragma: no cover
    version = None

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "linformer"
DIM, HEADS = 32, 2

# (name, batch, N (input length), seq_len (n_max), k, share_kv, one_kv_head)
CASES = [
    ("n24_k8", 2, 24, 24, 8, False, False),
    ("n37_k16_share_kv", 1, 37, 37, 16, True, False),
    ("n37_k8_one_kv_head", 1, 37, 37, 8, False, True),
    ("n24_k16_share_kv_one_kv_head", 2, 24, 24, 16, True, True),
    ("n29_of37_k16", 1, 29, 37, 16, False, False),
    ("n24_k32_more_than_n", 1, 24, 24, 32, False, False),
]


def dyadic(gen: torch.Generator, shape, denom: float) -> torch.Tensor:
    """Integers in [-16, 16] over `denom`: exact in float32, and so are small sums of
    their products."""
    return torch.randint(-16, 17, shape, generator=gen, dtype=torch.int64).to(torch.float64) / denom


def assert_f32_exact(name: str, t: torch.Tensor) -> None:
    assert torch.equal(t.float().double(), t), f"{name} is not exactly representable in float32"


def independent(q, k, v, e, f, scale):
    """softmax(scale Q (E K)^T)(F V) in float64 from the saved tensors (numpy, per head)."""
    b, n, h, d = q.shape
    hkv = k.shape[2]
    kp = np.einsum("rn,bnhd->brhd", e[0][:, :n], k)
    vp = np.einsum("rn,bnhd->brhd", f[0][:, :n], v)
    out = np.zeros_like(q)
    max_score = 0.0
    for hh in range(h):
        g = hh // (h // hkv)
        s = scale * np.einsum("bnd,brd->bnr", q[:, :, hh], kp[:, :, g])
        max_score = max(max_score, float(np.abs(s).max()))
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        p = s / s.sum(axis=-1, keepdims=True)
        out[:, :, hh] = np.einsum("bnr,brd->bnd", p, vp[:, :, g])
    return out, max_score


def tensor_lines(name: str, arr: np.ndarray, kind: str) -> str:
    shape = ",".join(str(s) for s in arr.shape)
    flat = arr.reshape(-1)
    if kind == "f32":
        body = " ".join(str(x) for x in flat.astype(np.float32))  # shortest round-trip float32
    else:
        body = " ".join(repr(float(x)) for x in flat)
    return f"tensor {name} {kind} {shape}\n{body}\n"


def make_case(seed: int, case) -> tuple[str, str, float]:
    name, batch, n, seq_len, k, share_kv, one_kv_head = case
    torch.manual_seed(seed)
    layer = LinformerSelfAttention(
        dim=DIM, seq_len=seq_len, k=k, heads=HEADS, one_kv_head=one_kv_head, share_kv=share_kv
    ).double()
    layer.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in [layer.to_q, layer.to_k] + ([] if share_kv else [layer.to_v]):
            lin.weight.copy_(dyadic(gen, lin.weight.shape, 64.0))
        layer.proj_k.copy_(dyadic(gen, layer.proj_k.shape, 64.0))
        if not share_kv:
            layer.proj_v.copy_(dyadic(gen, layer.proj_v.shape, 64.0))
    x = dyadic(gen, (batch, n, DIM), 8.0)

    captured = {}
    hook = layer.to_out.register_forward_pre_hook(lambda _m, args: captured.__setitem__("o", args[0].detach().clone()))
    with torch.no_grad():
        y = layer(x)
        hook.remove()
        o = captured["o"]
        assert torch.equal(layer.to_out(o), y), "the captured attention output is not what to_out received"
        d_h, hkv = layer.dim_head, 1 if one_kv_head else HEADS
        q = layer.to_q(x).reshape(batch, n, HEADS, d_h)
        kk = layer.to_k(x).reshape(batch, n, hkv, d_h)
        vv = kk if share_kv else layer.to_v(x).reshape(batch, n, hkv, d_h)
        e = layer.proj_k.T.unsqueeze(0)
        f = e if share_kv else layer.proj_v.T.unsqueeze(0)
    for t_name, t in [("q", q), ("k", kk), ("v", vv), ("e", e), ("f", f)]:
        assert_f32_exact(t_name, t)
    out = o.reshape(batch, n, HEADS, d_h).numpy()
    scale = d_h**-0.5
    arrays = [a.detach().numpy().copy() for a in (q, kk, vv, e, f)]
    ref, max_score = independent(*arrays, scale)
    err = float(np.abs(ref - out).max())
    assert err <= 1e-12, f"{name}: independent float64 evaluation differs from lucidrains by {err:.3e}"

    lin_version = version("linformer") if version else "?"
    header = (
        f"# Linformer golden fixture {name!r} (issue 15), written by scripts/make_linformer_fixtures.py\n"
        "# regenerate: PYTHONPATH=<site with linformer==0.2.3> $FK_TEST_PYTHON scripts/make_linformer_fixtures.py\n"
        f"# oracle: linformer {lin_version} LinformerSelfAttention(dim={DIM}, seq_len={seq_len}, k={k}, "
        f"heads={HEADS}, one_kv_head={one_kv_head}, share_kv={share_kv}), eval, float64; torch {torch.__version__}, "
        f"numpy {np.__version__}, seed {seed}\n"
        "# q k v e f: exact float32 values (dyadic x and weights); e = proj_k.T, f = proj_v.T as (1, k, n_max); "
        "out: the attention output before to_out, float64\n"
        f"# max |independent float64 formula - out| = {err:.3e}; max |scaled score| = {max_score:.2f}\n"
    )
    config = (
        f"config batch={batch} seqlen={n} n_max={seq_len} heads={HEADS} heads_kv={hkv} head_dim={d_h} k={k} "
        f"share_kv={int(share_kv)} one_kv_head={int(one_kv_head)} scale={scale!r}\n"
    )
    body = tensor_lines("q", arrays[0], "f32") + tensor_lines("k", arrays[1], "f32")
    if not share_kv:
        body += tensor_lines("v", arrays[2], "f32")
    body += tensor_lines("e", arrays[3], "f32")
    if not share_kv:
        body += tensor_lines("f", arrays[4], "f32")
    body += tensor_lines("out", out, "f64")
    return name, header + config + body, max_score


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for seed, case in enumerate(CASES):
        name, text, max_score = make_case(seed, case)
        path = OUT / f"{name}.txt"
        path.write_text(text)
        total += len(text)
        print(f"{path.relative_to(OUT.parent.parent.parent)}: {len(text)} bytes, max |scaled score| {max_score:.2f}")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
