#!/usr/bin/env python
"""Writes the Longformer golden fixtures under tests/fixtures/longformer/ from Hugging
Face's ``LongformerSelfAttention`` (CPU, float32).

What it makes
-------------
One text file per case, ``tests/fixtures/longformer/<case>.txt``, readable without numpy,
torch or any parser crate (python/tests/test_longformer_fixtures.py reads them with numpy
only; a Rust test can split on whitespace):

- lines starting with ``#`` are comments (this command, the versions used);
- ``config key=value ...``: batch, seqlen, heads, head_dim, window (ONE-sided w; HF's
  ``attention_window`` is 2w), dilation=1, causal=0, scale (= 1/sqrt(head_dim), the factor
  HF applies to the query before q.k);
- per tensor, a line ``tensor <name> <f32|bool> <d0,d1,...>`` and then ONE line holding all
  values in row-major order, space-separated. Floats are written with the shortest decimal
  string that round-trips to the same float32 (numpy's ``repr(np.float32(x))`` digits),
  so parsing them as f32 recovers the exact bits; bools are 0/1.

Tensors (B = batch, N = seqlen, H = heads, D = head_dim):

- ``q k v`` (B, N, H, D): the module's ``query/key/value`` Linear layers applied to the
  hidden states, UNscaled (HF divides the query by sqrt(D) internally; use ``scale``).
- ``q_g k_g v_g`` (B, N, H, D): ``query_global/key_global/value_global`` applied to the
  hidden states (all rows; only the global rows of q_g are used).
- ``global_mask`` (B, N) bool: True for global tokens; ``padding_mask`` (B, N) bool: True
  for PADDED positions (padding is at the end of each sequence, lengths differ per batch
  element).
- ``out_hf`` (B, N, H, D): HF's output (B, N, H*D) reshaped; ``out_ref`` (B, N, H, D): an
  independent float64 dense masked reference computed here from the saved q, k, v, q_g,
  k_g, v_g and masks, rounded to float32. The script asserts |out_ref - out_hf| <= 1e-5.

The semantics HF implements (checked by that assertion; it equals ../shared/SPECS.md
"Longformer"):

- non-global, non-padded query i: softmax(scale * q[i] . k[j]) over keys
  j in {|i - j| <= w, 0 <= j < N, not padded} UNION {global j}, weighted sum of v[j]; a
  global key inside the window counts once (HF removes every non-zero-mask key, i.e.
  padded AND global ones, from the sliding-window band and adds the global keys back
  through a separate score block computed with the ordinary q/k/v);
- global query i: softmax(scale * q_g[i] . k_g[j]) over every non-padded key j, weighted
  sum of v_g[j] (HF recomputes these rows from the hidden states and overwrites them);
- padded query rows: HF zeroes their attention probabilities, so its output there is
  exactly 0.0, which is also flashkernels' convention (no difference to record).

Regenerate (needs torch and transformers; the committed files were written with
transformers 5.24.0, torch 2.15.0+cu132 run on CPU, numpy 2.4.6, Python 3.11, from
/work/torchenv; each file's header repeats the versions):

    /work/torchenv/bin/pip install transformers     # once
    /work/torchenv/bin/python scripts/make_longformer_fixtures.py

Inputs come from a seeded generator (torch.manual_seed per case), so a rerun with the same
torch/transformers writes the same files. Keep the total under 300 KB (the script prints
it).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import transformers
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "longformer"
CMD = "/work/torchenv/bin/python scripts/make_longformer_fixtures.py"

# (name, N, w (one-sided), H, D, lengths per batch element, global positions per batch element)
CASES = [
    # globals at start, middle, end (of the real tokens), and 8 inside 7's window
    ("n16_w2_h2_d4", 16, 2, 2, 4, (16, 13), ((0, 7, 8, 15), (0, 6, 12))),
    # adjacent globals, one at the very end; the second element has one global fewer
    ("n32_w4_h3_d8", 32, 4, 3, 8, (32, 27), ((0, 1, 16, 18, 31), (3, 13, 24, 26))),
    # window of 6 each side: globals deep inside each other's windows
    ("n24_w6_h2_d4", 24, 6, 2, 4, (24, 17), ((0, 5, 11, 23), (2, 9, 16))),
    # no global token at all (HF's is_global_attn=False path), padding only
    ("n16_w4_h2_d4_noglobal", 16, 4, 2, 4, (16, 10), ((), ())),
]

B = 2


def reference(q, k, v, qg, kg, vg, glob, pad, w, scale):
    """Dense masked float64 reference, per SPECS.md "Longformer"."""
    q, k, v, qg, kg, vg = (np.asarray(a, np.float64) for a in (q, k, v, qg, kg, vg))
    b_, n, h, d = q.shape
    out = np.zeros((b_, n, h, d))
    idx = np.arange(n)
    for b in range(b_):
        keep = ~pad[b]
        for i in range(n):
            if pad[b, i]:
                continue
            if glob[b, i]:
                allowed = keep
                qq, kk, vv = qg[b, i], kg[b], vg[b]
            else:
                allowed = ((np.abs(idx - i) <= w) | glob[b]) & keep
                qq, kk, vv = q[b, i], k[b], v[b]
            s = np.einsum("hd,jhd->hj", qq, kk) * scale
            s = np.where(allowed[None, :], s, -np.inf)
            s -= s.max(axis=1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=1, keepdims=True)
            out[b, i] = np.einsum("hj,jhd->hd", p, vv)
    return out


def fmt(name, arr):
    arr = np.asarray(arr)
    shape = ",".join(str(s) for s in arr.shape)
    if arr.dtype == np.bool_:
        body = " ".join("1" if x else "0" for x in arr.reshape(-1))
        return f"tensor {name} bool {shape}\n{body}\n"
    a32 = arr.astype(np.float32).reshape(-1)
    body = " ".join(str(x) for x in a32)  # numpy's shortest round-trip float32 digits
    # round-trip check: the decimal strings recover the exact float32 bits
    back = np.array(body.split(), dtype=np.float32)
    assert np.array_equal(back.view(np.uint32), a32.view(np.uint32)), name
    return f"tensor {name} f32 {shape}\n{body}\n"


def make_case(seed, name, n, w, h, d, lengths, globals_):
    torch.manual_seed(seed)
    cfg = LongformerConfig(
        hidden_size=h * d,
        num_attention_heads=h,
        intermediate_size=4 * h * d,
        num_hidden_layers=1,
        attention_window=[2 * w],
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    attn = LongformerSelfAttention(cfg, layer_id=0).eval().float()
    # sharper softmaxes than the default init gives, so the masks matter numerically
    with torch.no_grad():
        for lin in (attn.query, attn.key, attn.value, attn.query_global, attn.key_global, attn.value_global):
            lin.weight.normal_(0.0, 1.5 / math.sqrt(h * d))
            lin.bias.normal_(0.0, 0.1)
    hs = torch.randn(B, n, h * d, dtype=torch.float32) * 1.5

    pad = np.zeros((B, n), bool)
    glob = np.zeros((B, n), bool)
    for b in range(B):
        pad[b, lengths[b] :] = True
        for g in globals_[b]:
            assert g < lengths[b], (name, b, g)
            glob[b, g] = True
    m = np.zeros((B, n), np.float32)
    m[pad] = -10000.0
    m[glob] = 10000.0
    mt = torch.from_numpy(m)

    with torch.no_grad():
        out = attn(
            hs,
            attention_mask=mt,
            is_index_masked=mt < 0,
            is_index_global_attn=mt > 0,
            is_global_attn=bool((mt > 0).any()),
        )[0]
        proj = {
            nm: getattr(attn, lin)(hs).reshape(B, n, h, d).numpy()
            for nm, lin in (
                ("q", "query"),
                ("k", "key"),
                ("v", "value"),
                ("q_g", "query_global"),
                ("k_g", "key_global"),
                ("v_g", "value_global"),
            )
        }
    out_hf = out.reshape(B, n, h, d).numpy()
    scale = 1.0 / math.sqrt(d)
    ref = reference(proj["q"], proj["k"], proj["v"], proj["q_g"], proj["k_g"], proj["v_g"], glob, pad, w, scale)

    err = np.abs(ref - out_hf)[~pad].max()
    pad_max = np.abs(out_hf[pad]).max() if pad.any() else 0.0
    assert err <= 1e-5, (name, err)
    assert pad_max == 0.0, (name, "HF padded rows not zero", pad_max)
    print(f"{name}: max |ref - hf| on real rows = {err:.2e}; max |hf| on padded rows = {pad_max}")

    header = (
        f"# Longformer golden fixture '{name}' (issue 4), written by scripts/make_longformer_fixtures.py\n"
        f"# regenerate: {CMD}\n"
        f"# oracle: transformers {transformers.__version__} LongformerSelfAttention "
        f"(attention_window=[{2 * w}], layer_id=0, eval, float32), torch {torch.__version__}, "
        f"numpy {np.__version__}, seed {seed}\n"
        f"# q k v q_g k_g v_g: unscaled projections (B,N,H,D); padding_mask True = padded; "
        f"out_hf: HF output reshaped (B,N,H,D); out_ref: float64 dense reference rounded to f32\n"
        f"# max |out_ref - out_hf| (real rows, float64 ref) = {err:.3e}; HF padded rows are exactly 0\n"
    )
    config = (
        f"config batch={B} seqlen={n} heads={h} head_dim={d} window={w} dilation=1 causal=0 scale={np.float32(scale)}\n"
    )
    body = "".join(
        fmt(nm, arr)
        for nm, arr in (
            ("q", proj["q"]),
            ("k", proj["k"]),
            ("v", proj["v"]),
            ("q_g", proj["q_g"]),
            ("k_g", proj["k_g"]),
            ("v_g", proj["v_g"]),
            ("global_mask", glob),
            ("padding_mask", pad),
            ("out_hf", out_hf),
            ("out_ref", ref),
        )
    )
    path = OUT / f"{name}.txt"
    path.write_text(header + config + body)
    return path.stat().st_size


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for seed, case in enumerate(CASES):
        total += make_case(seed, *case)
    print(f"total {total / 1024:.1f} KB in {OUT}")
    assert total < 300 * 1024, total


if __name__ == "__main__":
    main()
