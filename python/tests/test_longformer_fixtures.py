"""Longformer golden fixtures (tests/fixtures/longformer/*.txt, issue 4) against an
independent float64 numpy reference. numpy only: CI has no torch / transformers.

The fixtures were written by scripts/make_longformer_fixtures.py from Hugging Face's
``LongformerSelfAttention`` (see that script's header for the format, the command and the
versions). These tests check that the files are well formed and that Hugging Face's output
(``out_hf``) follows the rules written in ../shared/SPECS.md "Longformer", recomputed here by
a vectorised implementation that shares no code with the generator's loop:

- non-global query i: keys {|i - j| <= w} UNION {global j}, minus padded keys (a global key
  inside the window counts once), with q, k, v;
- global query i: every non-padded key, with q_g, k_g, v_g;
- padded query rows: 0.

flashkernels' own op is compared with ``out_hf`` in test_longformer_api.py
(``test_hugging_face_fixtures``) and, on a GPU, in tests/gpu_longformer.rs.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "longformer"
NAMES = ["q", "k", "v", "q_g", "k_g", "v_g", "global_mask", "padding_mask", "out_hf", "out_ref"]
TOL = 1e-5


def parse(path: pathlib.Path):
    """Returns (config dict, {name: array}) from one fixture file."""
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith("config "), path
    cfg = {}
    for item in lines[0].split()[1:]:
        key, val = item.split("=")
        cfg[key] = float(val) if key == "scale" else int(val)
    tensors = {}
    rest = lines[1:]
    assert len(rest) % 2 == 0, path
    for head, body in zip(rest[0::2], rest[1::2]):
        tag, name, dtype, shape = head.split()
        assert tag == "tensor" and name not in tensors, head
        shape = tuple(int(s) for s in shape.split(","))
        vals = body.split()
        assert len(vals) == math.prod(shape), (name, len(vals), shape)
        if dtype == "bool":
            assert set(vals) <= {"0", "1"}, name
            arr = np.array([v == "1" for v in vals], dtype=bool)
        else:
            assert dtype == "f32", head
            arr = np.array(vals, dtype=np.float32)
        tensors[name] = arr.reshape(shape)
    return cfg, tensors


def _names():
    names = sorted(p.name for p in FIXTURES.glob("*.txt"))
    assert names, f"no fixtures in {FIXTURES}"
    return names


def _softmax_av(s, allowed, v):
    """s (B,H,N,N) scores, allowed (B,N,N), v (B,N,H,D) -> (B,N,H,D); rows with no allowed
    key give 0."""
    s = np.where(allowed[:, None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, den, out=np.zeros_like(p), where=den > 0)
    return np.einsum("bhij,bjhd->bihd", p, v)


def longformer_ref(
    t,
    w,
    scale,
    *,
    window_extra=0,
    local_sees_globals=True,
    double_count_globals=False,
    global_rows_use_global_proj=True,
):
    """Dense masked float64 Longformer. The keyword arguments produce deliberately WRONG
    variants (used to show the fixtures discriminate between rules)."""
    f = {k: t[k].astype(np.float64) for k in ("q", "k", "v", "q_g", "k_g", "v_g")}
    glob, pad = t["global_mask"], t["padding_mask"]
    n = glob.shape[1]
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    band = np.abs(i - j) <= w + window_extra  # (N, N)
    keys = ~pad[:, None, :]  # (B, 1, N)
    local = band[None] & keys
    if local_sees_globals:
        local = local | (glob[:, None, :] & keys)
    s = np.einsum("bihd,bjhd->bhij", f["q"], f["k"]) * scale
    if double_count_globals:
        # a global key inside the window contributes exp(s) twice: add log 2 to its score
        s = s + np.where((band[None] & glob[:, None, :])[:, None], np.log(2.0), 0.0)
    out_local = _softmax_av(s, local, f["v"])
    if global_rows_use_global_proj:
        sg = np.einsum("bihd,bjhd->bhij", f["q_g"], f["k_g"]) * scale
        out_glob = _softmax_av(sg, np.broadcast_to(keys, local.shape), f["v_g"])
    else:
        out_glob = _softmax_av(s, np.broadcast_to(keys, local.shape), f["v"])
    out = np.where(glob[:, :, None, None], out_glob, out_local)
    return np.where(pad[:, :, None, None], 0.0, out)


@pytest.mark.parametrize("name", _names())
def test_fixture_well_formed(name):
    cfg, t = parse(FIXTURES / name)
    assert list(t) == NAMES
    b, n, h, d, w = (cfg[k] for k in ("batch", "seqlen", "heads", "head_dim", "window"))
    assert cfg["dilation"] == 1 and cfg["causal"] == 0
    assert np.float32(cfg["scale"]) == np.float32(1.0 / math.sqrt(d))
    assert w >= 1 and n % (2 * w) == 0  # HF needs seqlen to be a multiple of attention_window = 2w
    for k in ("q", "k", "v", "q_g", "k_g", "v_g", "out_hf", "out_ref"):
        assert t[k].shape == (b, n, h, d) and t[k].dtype == np.float32, k
        assert np.isfinite(t[k]).all(), k
    glob, pad = t["global_mask"], t["padding_mask"]
    assert glob.shape == pad.shape == (b, n)
    assert not (glob & pad).any(), "a padded token is global"
    lengths = (~pad).sum(axis=1)
    for bb in range(b):  # padding is a suffix
        assert not pad[bb, : lengths[bb]].any() and pad[bb, lengths[bb] :].all()
    assert len(set(lengths.tolist())) == b, "padding lengths should differ per batch element"
    # padded query rows: HF outputs exactly 0 there, as flashkernels does
    assert (t["out_hf"][pad] == 0).all()
    assert (t["out_ref"][pad] == 0).all()


def test_fixtures_cover_global_placements():
    """Globals at the start, in the middle, at the last real token, inside another global's
    window, and a case without any global token."""
    seen = set()
    for name in _names():
        cfg, t = parse(FIXTURES / name)
        w = cfg["window"]
        glob, pad = t["global_mask"], t["padding_mask"]
        if not glob.any():
            seen.add("none")
        for bb in range(glob.shape[0]):
            length = int((~pad[bb]).sum())
            g = np.flatnonzero(glob[bb])
            if len(g) == 0:
                continue
            seen.add("start" if g[0] == 0 else "x")
            seen.add("end" if g[-1] == length - 1 else "x")
            if any(0 < x < length - 1 for x in g):
                seen.add("middle")
            if len(g) > 1 and np.diff(g).min() <= w:
                seen.add("inside_window")
    assert {"none", "start", "end", "middle", "inside_window"} <= seen, seen


@pytest.mark.parametrize("name", _names())
def test_hf_output_matches_spec_rules(name):
    cfg, t = parse(FIXTURES / name)
    ref = longformer_ref(t, cfg["window"], cfg["scale"])
    real = ~t["padding_mask"]
    err = np.abs(ref - t["out_hf"].astype(np.float64))[real].max()
    assert err <= TOL, f"{name}: max |ref - out_hf| = {err:.3e}"
    # the generator's own float64 reference (rounded to f32) agrees with this one
    err_ref = np.abs(ref - t["out_ref"].astype(np.float64)).max()
    assert err_ref <= 1e-6 * max(1.0, np.abs(ref).max()), f"{name}: out_ref off by {err_ref:.3e}"
    assert np.abs(t["out_ref"] - t["out_hf"])[real].max() <= TOL


@pytest.mark.parametrize("name", _names())
def test_fixtures_discriminate_wrong_rules(name):
    """Each plausible mistake moves the output far beyond the tolerance, so matching
    out_hf pins the rule rather than passing by accident."""
    cfg, t = parse(FIXTURES / name)
    w, scale = cfg["window"], cfg["scale"]
    real = ~t["padding_mask"]
    hf = t["out_hf"].astype(np.float64)
    variants = {"window w-1": dict(window_extra=-1), "window w+1": dict(window_extra=1), "scale 1": dict()}
    if t["global_mask"].any():
        variants.update(
            {
                "local rows ignore global keys": dict(local_sees_globals=False),
                "global key in window counted twice": dict(double_count_globals=True),
                "global rows use q/k/v": dict(global_rows_use_global_proj=False),
            }
        )
    for label, kw in variants.items():
        sc = 1.0 if label == "scale 1" else scale
        wrong = longformer_ref(t, w, sc, **kw)
        diff = np.abs(wrong - hf)[real].max()
        assert diff > 1e-3, f"{name}: variant '{label}' is indistinguishable ({diff:.2e})"
