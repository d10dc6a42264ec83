#!/usr/bin/env python
"""Writes the Reformer LSH attention golden fixtures under tests/fixtures/reformer/ from
Hugging Face's ``LSHSelfAttention`` (transformers 5.25; torch CPU, float64).

What it makes
-------------
One text file per case, ``tests/fixtures/reformer/<case>.txt``, in the format of the
Linformer fixtures (scripts/make_linformer_fixtures.py; read by
tests/reformer_common/mod.rs, which splits on whitespace):

- lines starting with ``#`` are comments (this command, the versions used);
- ``config key=value ...``: batch, seqlen, heads, head_dim, num_hashes, num_buckets,
  chunk_length, chunks_before, chunks_after, causal (0/1), hash_seed;
- per tensor, a line ``tensor <name> <f32|f64> <d0,d1,...>`` and then ONE line holding all
  values in row-major order: ``f32`` values with numpy's shortest round-trip float32
  digits, ``f64`` values with Python's ``repr`` (both round-trip exactly).

Tensors (B batch, N seqlen, H heads, D head_dim, R num_hashes, nb num_buckets):

- ``qk`` (B, N, H, D) f32: ``layer.query_key(x)`` split into heads; ``v`` likewise from
  ``layer.value(x)``. x and the weights are small dyadic rationals, so both are exact in
  float32 (asserted) and a float32 caller passes HF's values bit for bit;
- ``rotations`` (H, D, R, nb/2) f64: recovered as SPECS.md says, ``torch.manual_seed(
  hash_seed); torch.randn((H, D, R, nb/2), dtype=float64)`` (HF draws them in the model's
  dtype right after reseeding, at every hashing call); the script checks them by
  recomputing HF's buckets from qk and these rotations;
- ``attention_mask`` (B, N) f64, 1 = token, 0 = padded (HF's convention; flashkernels'
  key padding mask is ``attention_mask == 0``), only in padded cases;
- ``buckets`` (B, H, R, N) f64 (integer values, offset per round as HF returns them),
  absent for N <= C (HF's full-attention fallback returns none);
- ``out`` (B, N, H, D) f64: ``.hidden_states`` of the layer (before the output dense),
  split into heads. The script asserts that passing ``buckets=`` back reproduces it.

Regenerate (needs torch with a CPU build and transformers 5.25 with the few packages it
imports; install them outside the repository's environments, e.g.):

    $FK_TEST_PYTHON -m pip install --target /tmp/reformer-site --no-deps transformers==5.25.0 \
        huggingface_hub safetensors regex tokenizers tqdm pyyaml httpx httpcore truststore \
        anyio h11 idna sniffio certifi packaging filelock fsspec typing_extensions hf-xet
    PYTHONPATH=/tmp/reformer-site $FK_TEST_PYTHON scripts/make_reformer_fixtures.py

Cases are seeded, so a rerun writes the same files.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers
from transformers import ReformerConfig
from transformers.models.reformer.modeling_reformer import LSHSelfAttention

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reformer"
HEADS, HEAD_DIM = 2, 8

# (name, batch, N, C, num_hashes, num_buckets, chunks_before, chunks_after, causal, padded)
CASES = [
    ("n16_c4_h1_nb4", 2, 16, 4, 1, 4, 1, 0, False, False),
    ("n32_c8_h3_nb8_causal", 1, 32, 8, 3, 8, 1, 0, True, False),
    ("n24_c4_h3_nb6_padded", 2, 24, 4, 3, 6, 1, 0, False, True),
    ("n48_c16_h3_nb4_causal_padded", 2, 48, 16, 3, 4, 1, 0, True, True),
    ("n64_c16_h1_nb8_after1", 1, 64, 16, 1, 8, 1, 1, False, False),
    ("n12_c16_fallback_causal_padded", 2, 12, 16, 3, 4, 1, 0, True, True),
    ("n16_c16_fallback", 1, 16, 16, 1, 4, 1, 0, False, False),
]


def dyadic(gen: torch.Generator, shape, denom: float) -> torch.Tensor:
    return torch.randint(-16, 17, shape, generator=gen, dtype=torch.int64).to(torch.float64) / denom


def tensor_lines(name: str, arr: np.ndarray, kind: str) -> str:
    shape = ",".join(str(s) for s in arr.shape)
    flat = arr.reshape(-1)
    if kind == "f32":
        assert np.array_equal(flat.astype(np.float32).astype(np.float64), flat), f"{name} is not exact in float32"
        body = " ".join(str(x) for x in flat.astype(np.float32))
    else:
        body = " ".join(repr(float(x)) for x in flat)
    return f"tensor {name} {kind} {shape}\n{body}\n"


def hf_buckets_from(qk: np.ndarray, rot: np.ndarray, mask: np.ndarray | None, nb: int) -> np.ndarray:
    """HF's hashing from the saved tensors (first argmax of [xR, -xR], padding bucket)."""
    rotated = np.einsum("bnhd,hdrk->bhrnk", qk, rot)
    buckets = np.argmax(np.concatenate([rotated, -rotated], axis=-1), axis=-1)
    per_round = nb
    if mask is not None and mask.sum() < mask.size:
        per_round = nb + 1
        buckets = np.where(mask[:, None, None, :].astype(bool), buckets, nb)
    r = buckets.shape[2]
    return buckets + (np.arange(r) * per_round)[None, None, :, None]


def make_case(seed: int, case) -> tuple[str, str]:
    name, batch, n, c, n_hashes, nb, before, after, causal, padded = case
    hidden = HEADS * HEAD_DIM
    hash_seed = 1000 + seed
    config = ReformerConfig(
        attn_layers=["lsh"],
        hidden_size=hidden,
        num_attention_heads=HEADS,
        attention_head_size=HEAD_DIM,
        lsh_attn_chunk_length=c,
        num_hashes=n_hashes,
        num_buckets=nb,
        lsh_num_chunks_before=before,
        lsh_num_chunks_after=after,
        is_decoder=causal,
        hash_seed=hash_seed,
        lsh_attention_probs_dropout_prob=0.0,
    )
    layer = LSHSelfAttention(config, layer_idx=0).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (layer.query_key, layer.value):
            lin.weight.copy_(dyadic(gen, lin.weight.shape, 16.0))
    x = dyadic(gen, (batch, n, hidden), 8.0)
    mask = None
    if padded:
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[0, -3:] = 0  # the tail of the first sequence
        mask[0, n // 2] = 0  # and one in the middle
    with torch.no_grad():
        res = layer(x, attention_mask=mask)
        out = res.hidden_states.reshape(batch, n, HEADS, HEAD_DIM)
        qk = layer.query_key(x).reshape(batch, n, HEADS, HEAD_DIM)
        v = layer.value(x).reshape(batch, n, HEADS, HEAD_DIM)
        torch.manual_seed(hash_seed)
        rot = torch.randn((HEADS, HEAD_DIM, n_hashes, nb // 2), dtype=torch.float64)
        buckets = res.buckets
        if buckets is not None:
            again = layer(x, attention_mask=mask, buckets=buckets).hidden_states
            assert torch.equal(again.reshape(out.shape), out), f"{name}: given buckets change the output"
            mine = hf_buckets_from(qk.numpy(), rot.numpy(), None if mask is None else mask.numpy(), nb)
            assert np.array_equal(mine, buckets.numpy()), f"{name}: recovered rotations do not give HF's buckets"
        else:
            assert n <= c, f"{name}: no buckets for N > C"
    header = (
        f"# Reformer LSH attention golden fixture {name!r} (issue 16), written by scripts/make_reformer_fixtures.py\n"
        "# regenerate: PYTHONPATH=<site with transformers==5.25.0> $FK_TEST_PYTHON scripts/make_reformer_fixtures.py\n"
        f"# oracle: transformers {transformers.__version__} LSHSelfAttention(ReformerConfig(attn_layers=['lsh'], "
        f"hidden_size={hidden}, num_attention_heads={HEADS}, attention_head_size={HEAD_DIM}, "
        f"lsh_attn_chunk_length={c}, "
        f"num_hashes={n_hashes}, num_buckets={nb}, lsh_num_chunks_before={before}, lsh_num_chunks_after={after}, "
        f"is_decoder={causal}, hash_seed={hash_seed}, lsh_attention_probs_dropout_prob=0.0), "
        "layer_idx=0).double().eval(); "
        f"torch {torch.__version__}, numpy {np.__version__}, seed {seed}\n"
        "# qk v: exact float32 values; rotations: torch.manual_seed(hash_seed); torch.randn((H, D, R, nb/2), float64); "
        "attention_mask: 1 = token; buckets: HF's (offset per round); out: hidden_states before the output dense\n"
    )
    cfg = (
        f"config batch={batch} seqlen={n} heads={HEADS} head_dim={HEAD_DIM} num_hashes={n_hashes} num_buckets={nb} "
        f"chunk_length={c} chunks_before={before} chunks_after={after} causal={int(causal)} hash_seed={hash_seed}\n"
    )
    body = tensor_lines("qk", qk.numpy(), "f32") + tensor_lines("v", v.numpy(), "f32")
    body += tensor_lines("rotations", rot.numpy(), "f64")
    if mask is not None:
        body += tensor_lines("attention_mask", mask.numpy().astype(np.float64), "f64")
    if buckets is not None:
        body += tensor_lines("buckets", buckets.numpy().astype(np.float64), "f64")
    body += tensor_lines("out", out.numpy(), "f64")
    return name, header + cfg + body


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for seed, case in enumerate(CASES):
        name, text = make_case(seed, case)
        path = OUT / f"{name}.txt"
        path.write_text(text)
        total += len(text)
        print(f"{path.relative_to(OUT.parent.parent.parent)}: {len(text)} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
