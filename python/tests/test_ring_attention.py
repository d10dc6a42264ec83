"""Ring (context-parallel) attention, ``flashkernels.ring``: the LSE merge against
attention over the union of the keys (float64 reference, rows without keys included),
and ring_attention forward + backward on 2 and 3 gloo processes (CPU tensors, the CPU
reference) against single-process flashkernels on the whole sequence.

The multi-process tests start this file as a script (``--worker``), one process per
rank, with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
MASTER_PORT): localhost traffic only, and a deadline, so a hang fails instead of blocking.
Each rank checks its own shard and prints its errors as one JSON line. Skipped where
torch is not installed."""

import datetime
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import flashkernels as fk  # noqa: E402
from flashkernels import ring as ring_mod  # noqa: E402
from flashkernels.ring import merge_attention_states, ring_attention  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ring_attention.py"
TOL = 1e-5  # relative to the largest reference value; the CPU reference computes in f32
LAUNCH_DEADLINE_S = 45.0  # all ranks of one launch, start-up included
COLLECTIVE_TIMEOUT_S = 30.0
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}  # gloo on localhost

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def child_env(**extra):
    """os.environ for a child Python that imports the flashkernels this test imports
    (whatever put it on sys.path)."""
    path = [str(Path(fk.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **extra)


def rel_error(got, want):
    """max |got - want| / max |want|, in float64; inf where NaN or -inf rows disagree."""
    got, want = got.double(), want.double()
    same_inf = (got == want) & torch.isinf(want)  # -inf lse rows: equal is exact
    diff = torch.where(same_inf, torch.zeros_like(got), (got - want).abs())
    if torch.isnan(diff).any():
        return math.inf
    finite = want[torch.isfinite(want)]
    scale = finite.abs().max().clamp_min(1e-30) if finite.numel() else torch.tensor(1.0, dtype=torch.float64)
    return (diff.max() / scale).item()


# ---------------------------------------------------------------------------------------
# merge_attention_states


def masked_attention(q, k, v, mask, scale):
    """float64 (out (B, Nq, H, D), lse (B, H, Nq)) of q over the keys mask (Nq, Nk)
    allows; rows without keys give out 0, lse -inf (flashkernels' convention)."""
    q, k, v = (x.double() for x in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows without keys
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # 0 where masked
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def merge_case(seed=0, b=2, nq=12, nk=20, h=3, d=8):
    """q, k, v, a random key split (A, B) and a mask with rows that see no key in A
    (row 0), none in B (row 1), none at all (row 2)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
    perm = torch.randperm(nk, generator=g)
    in_a = torch.zeros(nk, dtype=torch.bool)
    in_a[perm[: nk // 2]] = True
    mask = torch.rand(nq, nk, generator=g) < 0.6
    mask[0] &= ~in_a
    mask[1] &= in_a
    mask[2] = False
    mask[3] = True
    assert mask[0].any() and mask[1].any()
    return q, k, v, in_a, mask, d**-0.5


def partials(q, k, v, in_a, mask, scale):
    a = masked_attention(q, k[:, in_a], v[:, in_a], mask[:, in_a], scale)
    b = masked_attention(q, k[:, ~in_a], v[:, ~in_a], mask[:, ~in_a], scale)
    return a, b


def test_merge_equals_attention_over_the_union_of_keys():
    q, k, v, in_a, mask, scale = merge_case()
    (out_a, lse_a), (out_b, lse_b) = partials(q, k, v, in_a, mask, scale)
    assert torch.isinf(lse_a[:, :, 0]).all() and torch.isinf(lse_b[:, :, 1]).all()
    want_out, want_lse = masked_attention(q, k, v, mask, scale)

    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)  # float64 throughout
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_error(out, want_out) < 1e-12
    assert rel_error(lse, want_lse) < 1e-12
    # Rows without keys: out 0, lse -inf, no NaN anywhere.
    assert (out[:, 2] == 0).all() and (lse[:, :, 2] == -math.inf).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # One side empty: the other side, unchanged.
    assert torch.equal(out[:, 0], out_b[:, 0]) and torch.equal(lse[:, :, 0], lse_b[:, :, 0])

    # Symmetric, and float32 (flashkernels' lse dtype) works to f32 precision.
    out_ba, lse_ba = merge_attention_states(out_b, lse_b, out_a, lse_a)
    assert rel_error(out_ba, out) < 1e-15 and rel_error(lse_ba, lse) < 1e-15
    out32, lse32 = merge_attention_states(out_a.float(), lse_a.float(), out_b.float(), lse_b.float())
    assert out32.dtype == torch.float32 and lse32.dtype == torch.float32
    assert rel_error(out32, want_out) < 1e-6 and rel_error(lse32, want_lse) < 1e-6
    # 16-bit outs with float32 lse: out keeps its dtype.
    out16, _ = merge_attention_states(out_a.bfloat16(), lse_a.float(), out_b.bfloat16(), lse_b.float())
    assert out16.dtype == torch.bfloat16 and rel_error(out16, want_out) < 2e-2


def test_merge_is_differentiable_without_nan():
    q, k, v, in_a, mask, scale = merge_case(seed=1)
    (out_a, lse_a), (out_b, lse_b) = partials(q, k, v, in_a, mask, scale)
    leaves = [x.clone().requires_grad_() for x in (out_a, lse_a, out_b, lse_b)]
    out, lse = merge_attention_states(*leaves)
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for x in leaves:
        assert torch.isfinite(x.grad).all()


def merge_by_average(out_a, lse_a, out_b, lse_b):
    return (out_a + out_b) / 2, torch.maximum(lse_a, lse_b)


def merge_by_max(out_a, lse_a, out_b, lse_b):
    a_wins = (lse_a >= lse_b).transpose(1, 2)[..., None]
    return torch.where(a_wins, out_a, out_b), torch.maximum(lse_a, lse_b)


def merge_unnormalised(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    w = lambda x: torch.exp(x).transpose(1, 2)[..., None]  # noqa: E731  (forgets to divide)
    return out_a * w(lse_a) + out_b * w(lse_b), lse


@pytest.mark.parametrize("wrong", [merge_by_average, merge_by_max, merge_unnormalised])
def test_the_merge_check_catches_wrong_merges(wrong):
    """The comparison above can fail: plausible wrong merges are far outside tolerance."""
    q, k, v, in_a, mask, scale = merge_case()
    (out_a, lse_a), (out_b, lse_b) = partials(q, k, v, in_a, mask, scale)
    want_out, want_lse = masked_attention(q, k, v, mask, scale)
    out, lse = wrong(out_a, lse_a, out_b, lse_b)
    assert max(rel_error(out, want_out), rel_error(lse, want_lse)) > 1e-3


def test_merge_of_flashkernels_halves_equals_flashkernels_on_all_keys():
    """Two flash_attn_func calls over disjoint key ranges (GQA, Nq != Nk), merged, are one
    call over all the keys."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 33, 4, 16, generator=g)
    k, v = (torch.randn(2, 70, 2, 16, generator=g) for _ in range(2))
    out_a, lse_a = fk.flash_attn_func(q, k[:, :45], v[:, :45], return_lse=True)
    out_b, lse_b = fk.flash_attn_func(q, k[:, 45:], v[:, 45:], return_lse=True)
    want_out, want_lse = fk.flash_attn_func(q, k, v, return_lse=True)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert rel_error(out, want_out) < TOL and rel_error(lse, want_lse) < TOL


def test_merge_rejects_mismatched_inputs():
    out = torch.zeros(2, 5, 3, 4)
    lse = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="one shape"):
        merge_attention_states(out, lse, out[:, :4], lse)
    with pytest.raises(ValueError, match=r"lse_b must be \(batch, heads, seqlen\)"):
        merge_attention_states(out, lse, out, lse.transpose(1, 2))
    with pytest.raises(ValueError, match="float32"):
        merge_attention_states(out, lse, out, lse.half())
    with pytest.raises(ValueError, match=r"out_a must be \(batch"):
        merge_attention_states(out[0], lse, out, lse)
    with pytest.raises(TypeError, match="torch.Tensor"):
        merge_attention_states(out.numpy(), lse, out, lse)


def test_package_exports_ring_lazily():
    """flashkernels.ring_attention / merge_attention_states are flashkernels.ring's, and
    neither `import flashkernels` nor `from flashkernels import *` imports torch (checked
    in a fresh interpreter)."""
    assert fk.ring_attention is ring_attention and fk.merge_attention_states is merge_attention_states
    assert "ring_attention" not in fk.__all__  # a star import would load torch
    code = (
        "import sys, flashkernels\n"
        "from flashkernels import *\n"
        "assert 'torch' not in sys.modules, 'torch imported by the package'\n"
        "assert not hasattr(flashkernels, 'ring'), 'flashkernels.ring loaded by the package'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------
# ring_attention in this process: argument checks, and a group of one.


def test_ring_attention_rejects_bad_shards():
    q = torch.zeros(1, 8, 4, 16)
    kv = torch.zeros(1, 8, 2, 16)
    cases = [
        ((q[0], kv, kv), "shard"),
        ((q, kv, kv[:, :, :1]), "k and v must have one shape"),
        ((q, kv[:, :6], kv[:, :6]), "same positions"),
        ((q, kv.double(), kv.double()), "one dtype"),
        ((q.double(), kv.double(), kv.double()), "float16, bfloat16 or float32"),
        ((q, torch.zeros(1, 8, 3, 16), torch.zeros(1, 8, 3, 16)), "multiple of"),
        ((q, torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8)), "head_dim"),
        ((q, torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)), "batch"),
        ((q[:, :0], kv[:, :0], kv[:, :0]), "empty"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ring_attention(*args)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ring_attention(q.numpy(), kv, kv)


@pytest.fixture
def group_of_one(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    for name, value in LOOPBACK.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ring_attention_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    q = torch.zeros(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


@pytest.mark.parametrize("causal", [False, True])
def test_ring_of_one_is_flash_attn_func(group_of_one, causal):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 21, 4, 16, generator=g)
    k, v = (torch.randn(2, 21, 2, 16, generator=g) for _ in range(2))
    dout = torch.randn(2, 21, 4, 16, generator=g)
    ring_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ring_attention(*ring_leaves, causal=causal, softmax_scale=0.2, return_lse=True)
    want, want_lse = fk.flash_attn_func(*ref_leaves, causal=causal, softmax_scale=0.2, return_lse=True)
    out.backward(dout)
    want.backward(dout)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    for got_leaf, ref_leaf in zip(ring_leaves, ref_leaves):
        assert torch.equal(got_leaf.grad, ref_leaf.grad)


# ---------------------------------------------------------------------------------------
# ring_attention on several processes.

# Shard lengths that are not multiples of 64 (the kernels' tile), GQA and MQA, a scale.
CASES = {
    "full": dict(b=2, n=100, h=4, hkv=4, d=32, causal=False, scale=None),
    "causal": dict(b=2, n=100, h=4, hkv=4, d=32, causal=True, scale=None),
    "causal_gqa_scale": dict(b=1, n=37, h=4, hkv=2, d=16, causal=True, scale=0.3),
    "mqa": dict(b=1, n=70, h=3, hkv=1, d=8, causal=False, scale=None),
}


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, world, deadline_s=LAUNCH_DEADLINE_S):
    """Runs `argv` as `world` ranks with torchrun's environment on localhost; returns
    (return codes, outputs). A rank that fails stops the others at once; past the
    deadline all are killed."""
    env = child_env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    env.update(LOOPBACK)
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"rank{r}.log"), "w+") for r in range(world)]
        procs = [
            subprocess.Popen(
                argv, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=logs[r], stderr=subprocess.STDOUT
            )
            for r in range(world)
        ]
        end = time.monotonic() + deadline_s
        timed_out = False
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > end:
                    timed_out = time.monotonic() > end
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        outputs = []
        for f in logs:
            f.seek(0)
            outputs.append(f.read())
            f.close()
    if timed_out:
        pytest.fail(f"{world} ranks did not finish in {deadline_s:.0f} s:\n" + "\n".join(outputs))
    return [p.returncode for p in procs], outputs


def results_of(codes, outputs):
    if any(codes):
        pytest.fail(f"ranks exited with {codes}:\n" + "\n".join(outputs))
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out
        results.append(json.loads(lines[0][len("RESULT ") :]))
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_matches_one_process(world):
    codes, outputs = launch([sys.executable, __file__, "--worker"], world)
    results = results_of(codes, outputs)
    for rank, res in enumerate(results):
        cases = list(CASES) + (["subgroup"] if world == 3 and rank != 1 else [])
        for case in cases:
            errors = res[case]
            assert set(errors) == {"out", "lse", "dq", "dk", "dv"}
            bad = {name: e for name, e in errors.items() if not e < TOL}
            assert not bad, f"rank {rank}/{world}, case {case}: {errors}"
    # The same check catches a wrong ring: a merge that averages the blocks (forward and,
    # through out and lse, gradients) and a backward fed a wrong out (Delta = 0).
    for sabotage in ("average_merge", "zero_delta"):
        worst = {name: max(res[sabotage][name] for res in results) for name in results[0][sabotage]}
        assert any(e > 100 * TOL for e in worst.values()), (sabotage, worst)
    assert max(res["average_merge"]["out"] for res in results) > 100 * TOL
    assert max(res["zero_delta"]["dq"] for res in results) > 100 * TOL


def test_example_script_runs_under_torchrun_environment():
    codes, outputs = launch([sys.executable, str(EXAMPLE), "--seqlen-local", "45", "--causal", "--timeout", "30"], 2)
    assert codes == [0, 0], "\n".join(outputs)
    assert "max |error|" in outputs[0] and " ok (tolerance" in outputs[0], outputs[0]


def test_example_exits_nonzero_past_tolerance(monkeypatch):
    """The example's verdict, in this process (a group of one): 0 within tolerance, 1
    past it (a negative tolerance no error can meet)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    spec = importlib.util.spec_from_file_location("ring_attention_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    env = dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **LOOPBACK)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    small = ["--seqlen-local", "20", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--warmup", "0"]
    assert example.main(small + ["--causal"]) == 0
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert example.main(small + ["--tol", "-1"]) == 1


# ---------------------------------------------------------------------------------------
# The worker (one rank), run as `python test_ring_attention.py --worker`.


def run_case(rank, world, spec, seed, group=None):
    b, n, h, hkv, d = (spec[x] for x in ("b", "n", "h", "hkv", "d"))
    causal, scale = spec["causal"], spec["scale"]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, world * n, h, d, generator=g)
    k, v = (torch.randn(b, world * n, hkv, d, generator=g) for _ in range(2))
    dout = torch.randn(b, world * n, h, d, generator=g)

    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    want, want_lse = fk.flash_attn_func(*ref, softmax_scale=scale, causal=causal, return_lse=True)
    want.backward(dout)

    mine = slice(rank * n, (rank + 1) * n)
    shard = [x[:, mine].clone().requires_grad_() for x in (q, k, v)]
    out, lse = ring_attention(*shard, causal=causal, softmax_scale=scale, group=group, return_lse=True)
    out.backward(dout[:, mine])
    pairs = {
        "out": (out, want[:, mine]),
        "lse": (lse, want_lse[:, :, mine]),
        "dq": (shard[0].grad, ref[0].grad[:, mine]),
        "dk": (shard[1].grad, ref[1].grad[:, mine]),
        "dv": (shard[2].grad, ref[2].grad[:, mine]),
    }
    return {name: rel_error(got, w.detach()) for name, (got, w) in pairs.items()}


def worker():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        results = {name: run_case(rank, world, spec, seed) for seed, (name, spec) in enumerate(CASES.items())}
        if world == 3:
            # A group that is not the world: global ranks 0 and 2 (group ranks 0 and 1).
            sub = dist.new_group([0, 2])
            if rank != 1:
                results["subgroup"] = run_case(dist.get_rank(sub), 2, CASES["causal_gqa_scale"], 50, group=sub)

        # Sabotaged rings, to show that the comparison above notices.
        real_merge, real_backward = ring_mod._merge, ring_mod.attention_backward
        ring_mod._merge = merge_by_average
        try:
            results["average_merge"] = run_case(rank, world, CASES["full"], 100)
        finally:
            ring_mod._merge = real_merge
        ring_mod.attention_backward = lambda q, k, v, out, lse, dout, **kw: real_backward(
            q, k, v, torch.zeros_like(out), lse, dout, **kw
        )
        try:
            results["zero_delta"] = run_case(rank, world, CASES["causal"], 101)
        finally:
            ring_mod.attention_backward = real_backward
    finally:
        dist.destroy_process_group()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker()
    sys.stderr.flush()
    os._exit(0)  # skips torch's interpreter teardown (seconds on a loaded machine)
