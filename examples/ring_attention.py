"""Ring (context-parallel) attention with flashkernels: a sequence sharded across
processes, checked against single-process attention on the whole sequence.

    torchrun --nproc_per_node=2 examples/ring_attention.py                  # gloo, CPU tensors
    torchrun --nproc_per_node=8 examples/ring_attention.py --backend nccl --device cuda

Every rank builds the same random (batch, seqlen, heads, head_dim) q, k, v and output
gradient (one seed), keeps its contiguous shard of the sequence (rank r: positions
[r * seqlen_local, (r + 1) * seqlen_local)), and runs ``ring_attention`` forward and
backward on it. The outputs and gradients are gathered and compared, on rank 0, with
``flashkernels.flash_attn_func`` forward + backward on the full sequence in one process.
Prints the errors (max |difference| / max |reference|) and exits non-zero, on every rank,
when one exceeds the tolerance. With ``--device cuda`` each rank uses GPU LOCAL_RANK, and
rank 0 computes the single-process reference, so the whole sequence must fit one GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import flashkernels
from flashkernels.ring import ring_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", help="torch.distributed backend: gloo (CPU) or nccl (CUDA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen-local", type=int, default=200, help="positions per rank (any length)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="fewer than --heads: grouped-query attention")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--softmax-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=None, help="default: 1e-4 for float32, 2e-2 for 16-bit types")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward + backward runs before the timed one")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails")
    return p.parse_args(argv)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def gather_seq(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's (B, N_local, ...) shard, concatenated along the sequence."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> bool:
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    b, n, h, hkv, d = args.batch, args.seqlen_local, args.heads, args.kv_heads, args.head_dim
    seqlen = world * n

    # The same full sequence on every rank (one seed); each keeps its shard.
    g = torch.Generator().manual_seed(args.seed)
    q, k, v, dout = (
        torch.randn(b, seqlen, heads, d, generator=g).to(device=device, dtype=dtype) for heads in (h, hkv, hkv, h)
    )
    mine = slice(rank * n, (rank + 1) * n)
    q_l, k_l, v_l = (x[:, mine].clone().requires_grad_() for x in (q, k, v))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(args.warmup, 0) + 1):  # warm-up runs first: they set up the connections
        for x in (q_l, k_l, v_l):
            x.grad = None
        sync()
        dist.barrier()
        start = time.perf_counter()
        out_l = ring_attention(q_l, k_l, v_l, causal=args.causal, softmax_scale=args.softmax_scale)
        out_l.backward(dout[:, mine])
        sync()
        elapsed = time.perf_counter() - start

    shards = {"out": out_l, "dq": q_l.grad, "dk": k_l.grad, "dv": v_l.grad}
    got = {name: gather_seq(x, world) for name, x in shards.items()}
    ok = torch.ones(1, dtype=torch.int32, device=device)
    if rank == 0:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flashkernels.flash_attn_func(*leaves, softmax_scale=args.softmax_scale, causal=args.causal)
        out.backward(dout)
        want = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
        errors: Dict[str, float] = {name: rel_error(got[name], want[name]) for name in want}
        passed = all(e <= tol for e in errors.values())  # (NaN fails)
        print(
            f"ring attention: {world} ranks ({args.backend}, {device.type}), batch {b}, seqlen {seqlen} = "
            f"{world} x {n}, heads {h}/{hkv}, head_dim {d}, {'causal' if args.causal else 'full'}, "
            f"{str(dtype).rpartition('.')[2]}"
        )
        print(f"  ring forward + backward: {elapsed * 1e3:.1f} ms on rank 0 (after {args.warmup} warm-up runs)")
        listed = ", ".join(f"{name} {e:.2e}" for name, e in errors.items())
        print(f"  max |error| / max |reference| vs one process: {listed}")
        print(f"  {'ok' if passed else 'FAILED'} (tolerance {tol:.0e})", flush=True)
        ok.fill_(int(passed))
    dist.broadcast(ok, src=0)
    return bool(ok.item())


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # a single-process run without torchrun
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        args.backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        ok = run(args, rank, world, device)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
